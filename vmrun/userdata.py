"""cloud-init user-data: the user's own, with vmrun's parts added (one MIME multipart).

vmrun adds to a seed's user-data what it knows of the stack: the mounts of the shared
folders (vmrun/shares.py), the stack's SSH key (vmrun/access.py), the names of the other
VMs (vmrun/names.py).  They go in parts of their own, after the user's part, which is
kept as it is: cloud-config, a script, a MIME multipart already (then ours are more parts
of it), gzip-compressed (cloud-init ungzips only the whole, so it is ungzipped here).
A cloud-config part of ours says how it merges (its `Merge-Type` header: APPEND), so that
it adds to the user's lists (bootcmd, ssh_authorized_keys) rather than replacing them.
Without parts of ours, the user-data is the user's file, byte for byte.
"""

from __future__ import annotations

import contextlib
import email
import email.encoders
import email.message
import email.policy
import gzip
from dataclasses import dataclass
from email.mime.multipart import MIMEMultipart

# Lists (bootcmd, ssh_authorized_keys) are appended to, not replaced.
APPEND = "list(append)+dict(no_replace,recurse_list)+str()"


@dataclass(frozen=True)
class Part:
    content_type: str  # "text/cloud-config", "text/cloud-boothook", ...
    filename: str
    payload: bytes
    merge_type: str | None = None

    def message(self) -> email.message.Message:
        part = email.message.Message()
        part["Content-Type"] = self.content_type
        part["MIME-Version"] = "1.0"
        if self.merge_type:
            part["Merge-Type"] = self.merge_type
        part["Content-Disposition"] = f'attachment; filename="{self.filename}"'
        if _plain(self.payload):  # readable as it is, in the seed and on the console
            part["Content-Transfer-Encoding"] = "7bit"
            part.set_payload(self.payload.decode("ascii"))
        else:
            part.set_payload(self.payload)
            email.encoders.encode_base64(part)
        return part


def _plain(payload: bytes) -> bool:
    """ASCII text with lines MIME carries as they are (no NUL, CR or overlong line)."""
    return payload.isascii() and b"\0" not in payload and b"\r" not in payload and \
        all(len(line) <= 998 for line in payload.split(b"\n"))


def compose(original: bytes, parts: list[Part]) -> bytes:
    """`original` with `parts` after it; `original` itself when there are none."""
    if not parts:
        return original
    data = original
    if data[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError):
            data = gzip.decompress(data)
    outer: email.message.Message = MIMEMultipart()
    if b"mime-version:" in data[:4096].lower():  # how cloud-init tells MIME
        message = email.message_from_bytes(data, policy=email.policy.compat32)
        if message.is_multipart():
            outer = message  # ours are more parts of it
        else:
            outer.attach(message)
    elif data.strip():
        # cloud-init finds the type of an x-not-multipart part from its first line
        outer.attach(Part("text/x-not-multipart", "user-data", data).message())
    for part in parts:
        outer.attach(part.message())
    return outer.as_bytes()
