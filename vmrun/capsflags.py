"""One edit of libvirt's private capabilities cache: start guests without a slow CPU check.

libvirt (9.0) checks a guest's CPU once QEMU runs, inside `createXML`.  When the cached
capabilities carry the flag `cpu-unavailable-features` it does so with one `qom-get` QMP
call per CPU property (about 400: 0.2 s of every VM's start here); without the flag it
reads two properties (`feature-words`, `filtered-features`) instead, and the domain it
ends up with is the same for the CPUs vmrun asks for.  `edit()` removes that flag from a
cache file (libvirt's `cache/qemu/capabilities/*.xml`), and only from a file written by a
libvirt and for a QEMU whose code and result were checked (`LIBVIRT_VERIFIED`,
`QEMU_VERIFIED`): anything else is left as libvirt wrote it.  docs/libvirt-internals.md
says why this is safe, what was checked, and how it is kept honest (tests/test_capsflags.py).

vmrun.roots applies it to the host's capabilities cache once, after libvirt has shown it
accepts the edited file (see `roots.ensure_caps`); the supervisor never imports libvirt,
so the versions are read from the file (`<selfvers>`: libvirt refuses a cache file whose
version is not its own, so this is the version that will read it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lxml import etree

FLAG = "cpu-unavailable-features"
# LIBVIR_VERSION_NUMBER (major * 1000000 + minor * 1000 + micro) of the libvirt builds
# whose source was read (src/qemu/qemu_process.c: qemuProcessFetchGuestCPU) and whose
# guests were started with and without the flag.
LIBVIRT_VERIFIED = frozenset({9_000_000})
# (major, minor) of the QEMU builds checked likewise: the 2-call path needs the x86 CPU's
# `feature-words` and `filtered-features` properties.
QEMU_VERIFIED = frozenset({(7, 2)})
ARCH = "x86_64"
# Set in a cache directory when libvirt did not accept the edited file: not tried again.
REFUSED_MARKER = "capsflags-refused"

# read before the decision, in this order (emulator and qemuctime: roots' clean-up)
_HEAD = ("emulator", "qemuctime", "selfvers", "version", "arch")


class Unverified(Exception):
    """This cache file is not one the edit is verified for (the reason says why)."""


def _parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


@dataclasses.dataclass
class Head:
    """What the decision needs from a cache file (all of it precedes its <cpudata>)."""

    tag: str = ""
    emulator: str | None = None
    qemuctime: str | None = None
    selfvers: str | None = None
    version: str | None = None
    arch: str | None = None
    flags: int = 0  # <flag name=FLAG/> elements

    def refusal(self) -> str | None:
        """Why the flag must stay (None: the edit is verified for this file)."""
        if self.tag != "qemuCaps":
            return f"root element <{self.tag}>, expected <qemuCaps>"
        if self.selfvers is None or not self.selfvers.strip().isdigit():
            return f"no libvirt version (<selfvers>: {self.selfvers!r})"
        if int(self.selfvers) not in LIBVIRT_VERIFIED:
            return f"libvirt {_dotted(int(self.selfvers))} is not verified"
        if self.version is None or not self.version.strip().isdigit():
            return f"no QEMU version (<version>: {self.version!r})"
        qemu = int(self.version)
        if (qemu // 1_000_000, qemu // 1000 % 1000) not in QEMU_VERIFIED:
            return f"QEMU {_dotted(qemu)} is not verified"
        if (self.arch or "").strip() != ARCH:
            return f"arch {self.arch!r}, expected {ARCH}"
        if self.flags > 1:
            return f"{self.flags} {FLAG} flags"
        return None


def _dotted(version: int) -> str:
    return f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"


def _head_of(root: etree._Element) -> Head:
    head = Head(tag=str(root.tag))
    for name in _HEAD:
        setattr(head, name, root.findtext(name))
    head.flags = len(_flag_elements(root))
    return head


def head(path: Path) -> Head:
    """The head of the cache file `path`, read only as far as its <arch> (cheap)."""
    found = Head()
    with open(path, "rb") as file:
        for event, element in etree.iterparse(file, events=("start", "end"),
                                              resolve_entities=False, no_network=True):
            if event == "start":
                if element.getparent() is None:
                    found.tag = str(element.tag)
                continue
            parent = element.getparent()
            if parent is None or parent.getparent() is not None:
                continue  # the root itself, or deeper than its children
            if element.tag == "flag" and element.get("name") == FLAG:
                found.flags += 1
            elif element.tag in _HEAD:
                setattr(found, str(element.tag), element.text)
                if element.tag == _HEAD[-1]:
                    break
    return found


def pending(path: Path) -> bool:
    """Whether `path` still has the flag and is a file the edit is verified for."""
    try:
        found = head(path)
    except (OSError, etree.XMLSyntaxError):
        return False
    return found.flags == 1 and found.refusal() is None


def pending_in(cache: Path) -> list[Path]:
    """The cache files of directory `cache` to edit (none once libvirt refused an edit)."""
    if (cache / REFUSED_MARKER).exists():
        return []
    return [path for path in sorted(cache.glob("*.xml")) if pending(path)]


def flags(root: etree._Element) -> list[str]:
    """The names of the <flag/> elements of a cache file's root, in order."""
    return [flag.get("name") or "" for flag in root.iterchildren("flag")]


def _flag_elements(root: etree._Element) -> list[etree._Element]:
    return [flag for flag in root.iterchildren("flag") if flag.get("name") == FLAG]


def edit(data: bytes) -> bytes:
    """The cache file `data` without the flag, verified: the result parses, has every
    element the original has but that one flag, and nothing else.  Raises Unverified
    (the file must then stay as it is) when `data` is not a file the edit is verified
    for, or the result is not what it should be."""
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise Unverified(f"not XML: {exc}") from None
    reason = _head_of(root).refusal()
    if reason is None and FLAG not in flags(root):
        reason = f"no {FLAG} flag"
    if reason is not None:
        raise Unverified(reason)
    before = flags(root)
    elements = sum(1 for _ in root.iter())
    [flag] = _flag_elements(root)
    root.remove(flag)  # its tail (the indentation of the next line) goes with it
    result = etree.tostring(root, encoding="UTF-8", xml_declaration=False)
    if data.endswith(b"\n"):
        result += b"\n"
    # Verify: what libvirt will read is the original but for that one element.
    again = etree.fromstring(result, _parser())
    expected = [name for name in before if name != FLAG]
    if (flags(again) != expected or len(before) != len(expected) + 1
            or etree.tostring(again, method="c14n") != etree.tostring(root, method="c14n")
            or sum(1 for _ in again.iter()) != elements - 1):
        raise Unverified("the edited file is not the original without the flag")
    return result
