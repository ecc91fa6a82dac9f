"""libvirt's capabilities cache: one probe per cold stack, none in a warm root.

A regression guard for start-up speed (docs/performance.md) that does not time anything:
libvirt probes QEMU again (0.6-0.8 s) when a root's cached capabilities were made with
another CPU's CPUID data; vmrun opens every root on the same CPU (vmrun/proc/affinity.py).
If libvirt changes what it compares, these tests say so.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from conftest import cmdline, vmrun, write_stack
from vmrun import host, roots
from vmrun.layout import StackPaths
from vmrun.proc import affinity


def test_one_cpu_pins_every_thread_and_gives_them_back() -> None:
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("one CPU: nothing to pin")
    seen: dict[str, set[int]] = {}
    with affinity.one_cpu():
        seen["main"] = os.sched_getaffinity(0)
        worker = threading.Thread(target=lambda: seen.__setitem__(
            "new", os.sched_getaffinity(0)))
        worker.start()
        worker.join()
    assert seen == {"main": {min(allowed)}, "new": {min(allowed)}}
    assert os.sched_getaffinity(0) == allowed


def roots_keep_the_cache(guest: Path, tmp_path: Path, runs: int) -> None:
    """`runs` runs of a 3-VM stack; after each, every root holds the host's cache as it
    is (libvirt did not probe QEMU again in it)."""
    manifest = write_stack(tmp_path, guest, {f"v{i}": {"cmdline": cmdline()} for i in range(3)})
    cache = roots.caps_cache_dir(host.check("tcg"))
    for _ in range(runs):
        proc = vmrun("up", str(manifest), timeout=150)
        assert proc.returncode == 0, proc.stderr
        cached = {path.name: path.read_bytes() for path in cache.glob("*.xml")}
        assert cached, f"no capabilities cached in {cache}"
        for vm in ("v0", "v1", "v2"):
            caps_dir = StackPaths(tmp_path / ".vmrun" / "t").vm(vm).caps_dir
            in_root = {path.name: path.read_bytes() for path in caps_dir.glob("*.xml")}
            assert in_root == cached, f"libvirt probed QEMU again in {vm}'s root"


@pytest.mark.timeout(200)
def test_warm_roots_keep_the_cached_capabilities(guest: Path, tmp_path: Path) -> None:
    roots_keep_the_cache(guest, tmp_path, runs=2)


@pytest.mark.timeout(200)
def test_a_reinstalled_qemu_is_probed_once_not_in_every_root(
        guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reinstall (or a restored machine) changes the ctime of QEMU's binary and not its
    mtime; libvirt compares the ctime, and so must the cache's key, or every root of
    every run probes again.  The cache of the earlier install is removed then: libvirt
    would never take it again.  (A cache of the test's own, warm before the reinstall.)"""
    monkeypatch.setenv("VMRUN_CAPS_CACHE", str(tmp_path / "caps-cache"))
    roots_keep_the_cache(guest, tmp_path, runs=1)
    earlier = roots.caps_cache_dir(host.check("tcg"))
    assert earlier.is_dir()
    qemu = host.check("tcg").qemu
    before = os.stat(qemu)
    os.chmod(qemu, before.st_mode)  # the ctime only, as a reinstall does
    after = os.stat(qemu)
    assert (after.st_mtime_ns, after.st_ctime_ns != before.st_ctime_ns) == \
        (before.st_mtime_ns, True)
    roots_keep_the_cache(guest, tmp_path, runs=1)
    assert roots.caps_cache_dir(host.check("tcg")) != earlier
    assert not earlier.exists() and not earlier.with_name(f"{earlier.name}.lock").exists()


def test_only_caches_of_an_earlier_install_of_the_binary_are_removed(tmp_path: Path) -> None:
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_bytes(b"x")
    ctime = int(os.stat(qemu).st_ctime)

    def cache(name: str, emulator: Path, qemuctime: int | None) -> Path:
        directory = tmp_path / "base" / name
        directory.mkdir(parents=True)
        (directory.parent / f"{name}.lock").touch()
        stamp = f"<qemuctime>{qemuctime}</qemuctime>" if qemuctime is not None else ""
        (directory / "x.xml").write_text(f"<qemuCaps><emulator>{emulator}</emulator>{stamp}"
                                         "<selfvers>9000000</selfvers><version>7002000</version>"
                                         "<arch>x86_64</arch></qemuCaps>")
        return directory

    earlier = cache("earlier", qemu, ctime - 100)
    kept = [cache("now", qemu, ctime), cache("other", tmp_path / "qemu-system-arm", ctime - 100),
            cache("unstamped", qemu, None), cache("new", qemu, ctime - 100)]
    (tmp_path / "base" / "broken").mkdir()
    (tmp_path / "base" / "broken" / "x.xml").write_text("<qemuCaps><emulator>")
    roots._remove_outdated(tmp_path / "base", str(qemu), keep=kept[-1])
    assert not earlier.exists() and not (tmp_path / "base" / "earlier.lock").exists()
    assert all(path.is_dir() for path in kept) and (tmp_path / "base" / "broken").is_dir()
    assert (tmp_path / "base" / "now.lock").exists()


def test_the_cache_key_has_what_libvirt_compares(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("qemu", "driver.so")}
    for path in files.values():
        path.write_bytes(b"x")
    the_host = host.Host(qemu=str(files["qemu"]), libvirt_driver=str(files["driver.so"]),
                         accel=host.check("tcg").accel)
    keys = {roots.caps_cache_dir(the_host)}
    for path in files.values():
        os.chmod(path, 0o700)  # ctime, not mtime
        keys.add(roots.caps_cache_dir(the_host))
    assert len(keys) == 3
