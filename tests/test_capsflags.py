"""The edit of libvirt's capabilities cache (vmrun/capsflags.py, docs/libvirt-internals.md).

vmrun removes the flag `cpu-unavailable-features` from the capabilities libvirt probed, so
that `createXML` checks the guest CPU with 2 QMP calls instead of ~400.  That is a lever
inside libvirt's private cache, so these tests fail loudly when libvirt changes under it:
a libvirt or QEMU version the edit was not verified for, a fresh probe without the flag,
a libvirt that probes again when it reads the edited file, or a guest whose CPU is not
what it was.  Everything here runs the real libvirt and QEMU of this host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lxml import etree

from conftest import cmdline, vmrun, write_stack
from vmrun import capsflags, domain, host, manifest, roots
from vmrun.layout import StackPaths, VMPaths

# What both scripts below begin with: libvirt's event loop running, as in vmrun's driver
# (the embedded driver wants one), and `connect(root, then)`, which opens the embedded
# driver on `root` on the CPU vmrun uses (vmrun/proc/affinity.py) and calls `then(conn)`
# before it leaves that CPU.
LIBVIRT_PREAMBLE = r"""
import json, os, socket, sys, threading, time
from pathlib import Path
import libvirt
from vmrun.proc import affinity
libvirt.virEventRegisterDefaultImpl()
def loop():
    while True:
        libvirt.virEventRunDefaultImpl()
threading.Thread(target=loop, daemon=True).start()
def connect(root, then=lambda conn: None):
    with affinity.one_cpu():
        conn = libvirt.open(f"qemu:///embed?root={root}")
        then(conn)
    return conn
"""

# A probe exactly like vmrun's probe driver's (vmrun/proc/driver.py: probe), without the
# driver protocol: libvirt probes QEMU into the root's cache, on the CPU vmrun uses.
PROBE = LIBVIRT_PREAMBLE + r"""
root, emulator = sys.argv[1:3]
connect(root, lambda conn: conn.getDomainCapabilities(emulator, "x86_64", "q35", "qemu"))
os._exit(0)  # libvirt's event thread may block in one more iteration
"""

# Start one guest in a root (createXML, paused, as vmrun's driver does), read its live
# domain and QEMU's command line, let it run to its poweroff reading its console.
START = LIBVIRT_PREAMBLE + r"""
root, xml, console_path, out = sys.argv[1:5]
conn = connect(root)
started = time.monotonic()
dom = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
create = time.monotonic() - started
try:
    live = dom.XMLDesc()
    pidfile = Path(root, "run", "qemu", "m.pid")  # the domain is named m
    argv = Path("/proc", pidfile.read_text().strip(), "cmdline").read_bytes().split(b"\0")
    console = socket.socket(socket.AF_UNIX)
    console.connect(console_path)
    console.settimeout(90)
    dom.resume()
    seen = b""
    while chunk := console.recv(4096):
        seen += chunk
finally:  # libvirt daemonized QEMU: it would outlive this process
    try:
        dom.destroy()
    except libvirt.libvirtError:
        pass  # gone already: the guest powered off
Path(out).write_text(json.dumps({"create": create, "live": live, "console": seen.decode(
    errors="replace"), "argv": [a.decode(errors="replace") for a in argv]}))
os._exit(0)
"""


def _env(log: Path, monitor: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    if monitor:  # every QMP command libvirt sends, at level info
        env["LIBVIRT_LOG_FILTERS"] = "1:qemu.qemu_monitor"
        env["LIBVIRT_LOG_OUTPUTS"] = f"1:file:{log}"
    else:
        env["LIBVIRT_LOG_OUTPUTS"] = f"3:file:{log}"
    return env


def libvirt_probe(paths: VMPaths) -> bool:
    """Make libvirt probe (or load) the capabilities of the root `paths.root`."""
    proc = subprocess.run([sys.executable, "-c", PROBE, str(paths.root), host.check("tcg").qemu],
                          env=_env(paths.root.parent / f"{paths.root.name}.log"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return True


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (QEMU's sockets live in the roots made in it)."""
    path = Path(tempfile.mkdtemp(prefix="capsf-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def probed() -> Iterator[tuple[str, bytes]]:
    """(name, contents) of the capabilities cache libvirt writes in a fresh root now."""
    base = Path(tempfile.mkdtemp(prefix="capsf-", dir="/tmp"))
    try:
        paths = VMPaths(name="probe", dir=base / "p", root_link=base / "p", root=base / "p")
        roots.write_qemu_conf(paths)
        libvirt_probe(paths)
        found = sorted(paths.caps_dir.glob("*.xml"))
        assert len(found) == 1, f"libvirt wrote {found}, expected one x86_64 file"
        yield found[0].name, found[0].read_bytes()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _tree(data: bytes) -> etree._Element:
    return etree.fromstring(data)


def _changed(data: bytes, change: Callable[[etree._Element], None]) -> bytes:
    root = _tree(data)
    change(root)
    return etree.tostring(root)


def _set(tag: str, text: str) -> Callable[[etree._Element], None]:
    def change(root: etree._Element) -> None:
        element = root.find(tag)
        assert element is not None
        element.text = text
    return change


# --- the guard: what the edit is verified for ----------------------------------------------


def test_this_libvirt_and_qemu_are_the_ones_the_edit_is_verified_for(
        probed: tuple[str, bytes], tmp_path: Path) -> None:
    import libvirt

    (tmp_path / "caps.xml").write_bytes(probed[1])
    head = capsflags.head(tmp_path / "caps.xml")
    loud = ("vmrun removes libvirt's cpu-unavailable-features flag from its capabilities "
            "cache only for the libvirt and QEMU versions it was verified for "
            "(vmrun/capsflags.py, docs/libvirt-internals.md).  Read libvirt's "
            "qemuProcessFetchGuestCPU and virQEMUCapsLoadCache again, run this test file, "
            "and extend LIBVIRT_VERIFIED / QEMU_VERIFIED if all still holds.  Found: ")
    assert libvirt.getVersion() in capsflags.LIBVIRT_VERIFIED, \
        loud + f"libvirt {libvirt.getVersion()}"
    assert head.refusal() is None, loud + str(head.refusal())
    assert head.flags == 1, (
        "a fresh probe no longer sets cpu-unavailable-features: libvirt or QEMU changed "
        "under vmrun/capsflags.py (the edit does nothing now; is the CPU check still slow?)")


# --- the edit itself, on a file libvirt just wrote -----------------------------------------


def test_the_edit_removes_that_flag_and_nothing_else(probed: tuple[str, bytes],
                                                     tmp_path: Path) -> None:
    _, data = probed
    edited = capsflags.edit(data)
    expected = _tree(data)
    [flag] = [f for f in expected.iterchildren("flag") if f.get("name") == capsflags.FLAG]
    expected.remove(flag)
    assert etree.tostring(_tree(edited), method="c14n") == \
        etree.tostring(expected, method="c14n")
    before, after = capsflags.flags(_tree(data)), capsflags.flags(_tree(edited))
    assert [f for f in before if f not in after] == [capsflags.FLAG]
    assert len(after) == len(before) - 1 and "canonical-cpu-features" in after
    assert len(edited) < len(data) and edited.endswith(b"</qemuCaps>\n")

    file = tmp_path / "caps.xml"
    file.write_bytes(data)
    assert capsflags.pending(file)
    file.write_bytes(edited)
    assert not capsflags.pending(file)  # nothing more to do: the edit is done once
    with pytest.raises(capsflags.Unverified, match="no cpu-unavailable-features flag"):
        capsflags.edit(edited)


@pytest.mark.parametrize(("change", "reason"), [
    (_set("selfvers", "9001000"), "libvirt 9.1.0 is not verified"),
    (_set("selfvers", "8000000"), "libvirt 8.0.0 is not verified"),
    (_set("version", "8000000"), "QEMU 8.0.0 is not verified"),
    (_set("version", "7001000"), "QEMU 7.1.0 is not verified"),
    (_set("arch", "aarch64"), "arch 'aarch64'"),
    (lambda root: root.insert(8, etree.Element("flag", name=capsflags.FLAG)), "2 cpu-unavail"),
    (lambda root: root.remove(root.find("selfvers")), "no libvirt version"),
])
def test_a_file_the_edit_is_not_verified_for_stays_as_it_is(
        probed: tuple[str, bytes], tmp_path: Path,
        change: Callable[[etree._Element], None], reason: str) -> None:
    data = _changed(probed[1], change)
    with pytest.raises(capsflags.Unverified, match=reason):
        capsflags.edit(data)
    file = tmp_path / "caps.xml"
    file.write_bytes(data)
    assert not capsflags.pending(file)
    file.write_bytes(b"<qemuCaps><selfvers>9000000</selfvers>")  # cut short
    assert not capsflags.pending(file)
    with pytest.raises(capsflags.Unverified, match="not XML"):
        capsflags.edit(file.read_bytes())


# --- a real guest, started as vmrun's driver starts it -------------------------------------


def _start(base: Path, name: str, caps: tuple[str, bytes], xml_for: Callable[[Path], str],
           ) -> tuple[dict[str, object], list[str]]:
    """Start the guest in a fresh root holding `caps`; its result and libvirt's QMP
    commands.  The root's cache must be as it was afterwards (libvirt did not probe)."""
    root = base / name
    paths = VMPaths(name=name, dir=root, root_link=root, root=root)
    roots.write_qemu_conf(paths)
    paths.caps_dir.mkdir(parents=True)
    (paths.caps_dir / caps[0]).write_bytes(caps[1])
    out, log = base / f"{name}.json", base / f"{name}.log"
    proc = subprocess.run([sys.executable, "-c", START, str(root), xml_for(root),
                           str(root / "console.sock"), str(out)],
                          env=_env(log, monitor=True), capture_output=True, text=True,
                          timeout=150)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in paths.caps_dir.iterdir()] == [caps[0]]
    assert (paths.caps_dir / caps[0]).read_bytes() == caps[1], \
        f"libvirt probed QEMU again in the {name} root: it did not take its cache"
    sent = [line.split("msg=", 1)[1] for line in log.read_text().splitlines()
            if "QEMU_MONITOR_SEND_MSG" in line]
    result: dict[str, object] = json.loads(out.read_text())
    argv = [str(a).replace(str(root), "ROOT") for a in result["argv"]]  # type: ignore
    # the same but for the uuid libvirt made up
    result["argv"] = [a for i, a in enumerate(argv) if i == 0 or argv[i - 1] != "-uuid"]
    return result, sent


def _qom_gets(sent: list[str]) -> list[str]:
    calls = [json.loads(m) for m in sent]
    return [c["arguments"]["property"] for c in calls if c["execute"] == "qom-get"]


@pytest.mark.timeout(400)
def test_a_guest_starts_with_the_edited_cache_and_the_same_cpu(
        guest: Path, probed: tuple[str, bytes], short_dir: Path) -> None:
    stack = manifest.load(write_stack(short_dir, guest, {"m": {"cmdline": cmdline("hi")}}))
    [vm] = stack.vms

    def xml_for(root: Path) -> str:
        return domain.to_string(domain.build(vm, "tcg", root / "console.sock"))

    name, data = probed
    as_probed, sent_probed = _start(short_dir, "o", (name, data), xml_for)
    edited, sent_edited = _start(short_dir, "e", (name, capsflags.edit(data)), xml_for)

    for result in (as_probed, edited):  # the guest ran: it said hi and powered off
        lines = [line.strip() for line in str(result["console"]).splitlines()]
        assert "hi" in lines and any("Power down" in line for line in lines), lines
    # What the edit is for: libvirt's old 2-call path instead of one call per property.
    gets_probed, gets_edited = _qom_gets(sent_probed), _qom_gets(sent_edited)
    assert len(gets_probed) > 100, (
        f"with the flag, libvirt now sends {len(gets_probed)} qom-get calls: its CPU check "
        "changed (vmrun/capsflags.py may be unnecessary)")
    assert gets_edited == ["feature-words", "filtered-features"], gets_edited
    # And what it must not change: the guest's CPU, in libvirt's live domain and for QEMU.
    cpus = [etree.tostring(_tree(str(r["live"]).encode()).find("cpu"), method="c14n")
            for r in (as_probed, edited)]
    assert cpus[0] == cpus[1]
    assert b"<model fallback=\"forbid\">qemu64</model>" in cpus[0]
    assert as_probed["argv"] == edited["argv"]
    assert "-cpu" in edited["argv"]  # type: ignore[operator]
    print(f"createXML: {as_probed['create']:.3f} s as probed, {edited['create']:.3f} s edited")


# --- vmrun's own use of it ------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_a_cold_cache_is_probed_checked_and_edited_once(
        probed: tuple[str, bytes], short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = short_dir / "cache"
    monkeypatch.setattr(roots, "caps_cache_dir", lambda the_host: cache)
    calls: list[bool] = []

    def probe(paths: VMPaths, checking: bool) -> bool:
        calls.append(checking)
        return libvirt_probe(paths)

    the_host = host.check("tcg")
    assert roots.ensure_caps(the_host, short_dir / "p", probe) == cache
    # One probe, and one more driver that only loads the edited file (it must not probe)
    assert calls == [False, True]
    [file] = cache.glob("*.xml")
    assert capsflags.head(file).flags == 0 and not capsflags.pending_in(cache)
    assert not (cache / capsflags.REFUSED_MARKER).exists()
    assert file.read_bytes() == capsflags.edit(probed[1])  # same probe, same edit
    assert not (short_dir / "p").exists()

    assert roots.ensure_caps(the_host, short_dir / "p", probe) == cache
    assert len(calls) == 2  # warm: nothing runs


@pytest.mark.timeout(400)
def test_an_edit_libvirt_does_not_take_is_undone_for_good(
        probed: tuple[str, bytes], short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback: libvirt, given an edited file it rejects, probes again; vmrun then
    keeps the file as libvirt wrote it and does not try again."""
    cache = short_dir / "cache"
    cache.mkdir()
    name, data = probed
    (cache / name).write_bytes(data)
    real_edit = capsflags.edit

    def bad_edit(original: bytes) -> bytes:  # a flag this libvirt does not know
        return _changed(real_edit(original), lambda root: root.find("flag").set(
            "name", "vmrun-no-such-flag"))

    monkeypatch.setattr(capsflags, "edit", bad_edit)
    calls: list[bool] = []

    def probe(paths: VMPaths, checking: bool) -> bool:
        calls.append(checking)
        return libvirt_probe(paths)

    roots._edit_caps(cache, short_dir / "p", probe)
    assert calls == [True]  # the check of the edited file
    assert (cache / name).read_bytes() == data
    assert "libvirt rewrote" in (cache / capsflags.REFUSED_MARKER).read_text()
    assert capsflags.pending(cache / name) and not capsflags.pending_in(cache)
    roots._edit_caps(cache, short_dir / "p", probe)
    assert len(calls) == 1  # not tried again


@pytest.mark.timeout(300)
def test_vmrun_up_starts_guests_with_the_edited_cache_and_no_probe(
        guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first `vmrun up` on a host (its cache empty: a private one, $VMRUN_CAPS_CACHE,
    since the host's is warm once any stack ran) probes QEMU and edits the file, libvirt
    having taken the edited file; the guest starts with it, and libvirt does not probe in
    its root.  The second `up` copies the cache as it is."""
    manifest_path = write_stack(tmp_path, guest, {"v": {"cmdline": cmdline("hi")}})
    monkeypatch.setenv("VMRUN_CAPS_CACHE", str(tmp_path / "caps-cache"))
    cache = roots.caps_cache_dir(host.check("tcg"))
    for run in ("cold", "warm"):
        proc = vmrun("up", str(manifest_path), timeout=150)
        assert proc.returncode == 0, proc.stderr
        assert re.search(r"^v +\| hi$", proc.stdout, re.M), proc.stdout
        probed = "vmrun: probing QEMU's capabilities" in proc.stderr
        assert probed == (run == "cold"), (run, proc.stderr)
        marker = cache / capsflags.REFUSED_MARKER
        assert not marker.exists(), marker.read_text()
        cached = {path.name: path.read_bytes() for path in cache.glob("*.xml")}
        assert cached and not capsflags.pending_in(cache), f"{cache} was not edited"
        assert all(capsflags.head(path).flags == 0 for path in cache.glob("*.xml"))
        caps_dir = StackPaths(tmp_path / ".vmrun" / "t").vm("v").caps_dir
        in_root = {path.name: path.read_bytes() for path in caps_dir.glob("*.xml")}
        assert in_root == cached, "libvirt probed QEMU again: it did not take the edited cache"
