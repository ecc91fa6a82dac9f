"""Which characters libvirt's XML can hold: the one check that both the manifest's
converters (vmrun/convert.py) and the light identity reader (vmrun/identity.py) make."""

from __future__ import annotations

import re

# XML 1.0 characters: tab, newline, carriage return, and the rest of Unicode except the
# C0 controls, lone surrogates (undecodable bytes of a file name or of the environment),
# U+FFFE and U+FFFF.  lxml refuses any other character in text or attributes.  Spelled
# as the characters refused, not as the complement of those allowed: compiling a class of
# all of Unicode took `re` 6 ms at each start of `vmrun check` and `vmrun ps`.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_unsafe(text: str) -> str | None:
    """The first character of `text` that XML 1.0 cannot hold, or None."""
    match = _NOT_XML.search(text)
    return match.group() if match else None
