"""Each VM's embedded libvirt root: its directory, its qemu.conf, its capabilities cache.

libvirt probes QEMU's capabilities (0.8-0.9 s here) the first time a root is used; the result
is kept per host and QEMU build (keyed by what libvirt checks the file against) and
copied into every new root, so a cold stack of N VMs pays one probe, not N.  That cache is
kept without libvirt's `cpu-unavailable-features` flag where this is verified to be safe
(vmrun/capsflags.py, docs/libvirt-internals.md): 0.2 s less in every VM's start.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from vmrun import host, procs
from vmrun.errors import HostError
from vmrun.layout import OWNER_FILE, VMPaths, caps_cache_base, private_dir, short_root_base
from vmrun.proc import affinity

# QEMU's loadable modules (Debian's path), whose directory's mtime libvirt compares
QEMU_MODULE_DIRS = "/usr/lib/*/qemu"

# As root: no cgroups for the guests (`cgroup_controllers`).  vmrun sets no limits, and
# moving QEMU and each vCPU thread into libvirt's cgroups took ~45 ms of every start
# (docs/performance.md); a killed run also left them behind (vmrun/cgroups.py).
QEMU_CONF_ROOT = """\
# Written by vmrun for its embedded driver root.
stdio_handler = "file"
user = "root"
group = "root"
security_driver = "none"
namespaces = []
remember_owner = 0
cgroup_controllers = []
"""
QEMU_CONF_USER = """\
# Written by vmrun for its embedded driver root.
stdio_handler = "file"
"""


def write_file(path: Path, data: bytes, append: bool = False) -> None:
    """Write `path` without following a symbolic link there (O_NOFOLLOW)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (
        os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def write_qemu_conf(paths: VMPaths) -> None:
    paths.qemu_conf.parent.mkdir(parents=True, exist_ok=True)
    write_file(paths.qemu_conf,
               (QEMU_CONF_ROOT if os.geteuid() == 0 else QEMU_CONF_USER).encode())


def prepare(paths: VMPaths) -> None:
    """Make the VM's root (or its short root and the link to it) and fresh logs."""
    paths.dir.mkdir(parents=True, exist_ok=True)
    if paths.root != paths.root_link:
        private_dir(short_root_base())
        private_dir(paths.root)
        if not paths.root_link.is_symlink() or paths.root_link.readlink() != paths.root:
            if paths.root_link.is_symlink() or paths.root_link.is_file():
                paths.root_link.unlink()
            elif paths.root_link.is_dir():
                shutil.rmtree(paths.root_link)
            paths.root_link.symlink_to(paths.root)
        write_file(paths.owner_file, f"{paths.root_link}\n".encode())
    else:
        paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_qemu_conf(paths)
    write_file(paths.console_log, b"")
    # One run's driver log and the one before it, not every run's (it grew for ever).
    with contextlib.suppress(FileNotFoundError):
        os.replace(paths.driver_log, paths.previous_driver_log)
    write_file(paths.driver_log, f"--- vmrun driver log, {time.ctime()} ---\n".encode())


def collect_garbage() -> list[Path]:
    """Remove short roots whose VM state directory is gone (deleted without `vmrun clean`).

    Each short root names the link that points to it; while the VM's directory exists the
    root is kept, and so is a root a process still uses (a running stack whose state
    directory was deleted).  Returns the roots removed.
    """
    base = short_root_base()
    removed: list[Path] = []
    try:
        candidates = list(base.iterdir())
    except OSError:
        return removed
    for root in candidates:
        try:
            link = Path((root / OWNER_FILE).read_text().strip())
        except OSError:
            continue  # not ours, or not finished: leave it
        if not link.parent.exists() and not procs.using(root):
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
    return removed


def caps_cache_dir(the_host: host.Host) -> Path:
    """Where QEMU's capabilities are cached for this host's QEMU and libvirt build.

    The key holds what libvirt (9.0) compares before it trusts a cached file, so that a
    change of any of it means a new cache, probed once, instead of a stale one that every
    root probes again on every run:
    - the CPU probes and drivers open roots on (vmrun/proc/affinity.py): the CPUID data;
    - the *ctime* of QEMU's binary (`qemuctime`) and of libvirt's QEMU driver
      (`selfctime`): a reinstall or a restored machine changes them and not the mtime;
    - the mtime of QEMU's module directory (`qemumoddirmtime`);
    - the kernel (`kernelVersion`).
    """
    key = [f"cpu{affinity.cpu()}", " ".join(os.uname()[2:4])]
    for path in (the_host.qemu, the_host.libvirt_driver):
        st = os.stat(path)
        key.append(f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
    for moddir in sorted(glob.glob(QEMU_MODULE_DIRS)):
        key.append(f"{moddir}:{os.stat(moddir).st_mtime_ns}")
    digest = hashlib.sha256("|".join(key).encode()).hexdigest()[:16]
    return caps_cache_base() / digest


# probe(paths, checking): run a probe driver on the fresh root `paths`; whether it did.
# `checking`: the root holds a cache already, which libvirt should take (and not probe).
Probe = Callable[[VMPaths, bool], bool]


def ensure_caps(the_host: host.Host, probe_root: Path, probe: Probe) -> Path | None:
    """The host's capabilities cache, probed first if there is none.

    `probe` runs a probe driver on a fresh root at `probe_root` and says whether it
    succeeded; another stack probing at the same time is waited for (a file lock).
    None when the probe did not succeed (each root then probes for itself).  A cache
    that still has the flag vmrun/capsflags.py removes is edited here, once, after a
    second probe driver has shown that libvirt takes the edited file as it is.
    """
    from vmrun import capsflags  # (lxml) imported when needed: after the zygote started

    cache = caps_cache_dir(the_host)
    if any(cache.glob("*.xml")) and not capsflags.pending_in(cache):
        return cache
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lock = open(cache.parent / f"{cache.name}.lock", "w")  # noqa: SIM115
    except OSError as exc:
        raise _unusable(cache.parent, exc) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another stack may be probing right now
        if not any(cache.glob("*.xml")):
            found = _probe_into(probe_root, probe)
            if not found:
                return None
            _write_all(found, cache)
            _remove_outdated(cache.parent, the_host.qemu, keep=cache)
        _edit_caps(cache, probe_root, probe)
    return cache


def _remove_outdated(base: Path, qemu: str, keep: Path) -> None:
    """Remove the caches of `base` probed with an earlier install of the QEMU binary
    `qemu` (and their locks): libvirt compares the binary's ctime with the one a file
    records, and a ctime never goes back, so no run takes their files again.  A cache of
    another binary, or one that cannot be read, stays."""
    from lxml import etree

    from vmrun import capsflags

    try:
        ctime = str(int(os.stat(qemu).st_ctime))
        caches = [path for path in base.iterdir() if path.is_dir() and path != keep
                  and not path.is_symlink() and ".tmp" not in path.name]
    except OSError:
        return
    for cache in caches:
        try:
            heads = [capsflags.head(path) for path in cache.glob("*.xml")]
        except (OSError, etree.XMLSyntaxError):
            continue
        if heads and all(h.emulator == qemu and h.qemuctime not in (None, ctime)
                         for h in heads):
            shutil.rmtree(cache, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(cache.with_name(f"{cache.name}.lock"))


def _probe_into(probe_root: Path, probe: Probe,
                files: dict[str, bytes] | None = None) -> dict[str, bytes] | None:
    """Run `probe` on a fresh root at `probe_root` holding the cache `files` (name ->
    contents), if any; the cache files the root has afterwards (None: no success)."""
    paths = VMPaths(name="probe", dir=probe_root, root_link=probe_root, root=probe_root)
    shutil.rmtree(probe_root, ignore_errors=True)
    try:
        write_qemu_conf(paths)
        if files:
            paths.caps_dir.mkdir(parents=True)
            for name, data in files.items():
                write_file(paths.caps_dir / name, data)
        if not probe(paths, bool(files)):
            return None
        return {path.name: path.read_bytes() for path in sorted(paths.caps_dir.glob("*.xml"))}
    finally:
        shutil.rmtree(probe_root, ignore_errors=True)


def _edit_caps(cache: Path, probe_root: Path, probe: Probe) -> None:
    """Remove the flag of vmrun/capsflags.py from the cache files of `cache` that still
    have it, if libvirt reads the edited files without probing QEMU again; otherwise
    leave them and mark the cache (capsflags.REFUSED_MARKER), so that no run tries again.
    """
    from vmrun import capsflags

    todo = capsflags.pending_in(cache)
    if not todo:
        return
    try:
        files = {path.name: path.read_bytes() for path in sorted(cache.glob("*.xml"))}
        edited = {path.name: capsflags.edit(files[path.name]) for path in todo}
    except capsflags.Unverified as exc:
        _refuse(cache, str(exc))
        return
    except OSError:
        return  # gone meanwhile (vmrun clean?): the next run sees
    seen = _probe_into(probe_root, probe, files | edited)
    if seen is None:
        return  # no answer (a signal, a driver that failed): the next run tries again
    changed = sorted(name for name, data in edited.items() if seen.get(name) != data)
    if changed:  # libvirt probed again: it did not take the edited file
        _refuse(cache, f"libvirt rewrote the edited {', '.join(changed)}")
        return
    for name, data in edited.items():
        _replace(cache / name, data)


def _replace(path: Path, data: bytes) -> None:
    """Replace `path` by `data` at once (a stack copying it sees the old or the new)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write_file(tmp, data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: the file stays as libvirt wrote it


def _refuse(cache: Path, reason: str) -> None:
    from vmrun import capsflags

    with contextlib.suppress(OSError):
        write_file(cache / capsflags.REFUSED_MARKER,
                   f"{capsflags.FLAG} kept: {reason}\n".encode())


def _unusable(where: Path, exc: OSError) -> HostError:
    return HostError(f"cannot write {where}: {exc.strerror or exc}",
                     hint="free some space (or fix the permissions) and run again")


def _copy_all(files: list[Path], target: Path) -> None:
    """Copy `files` into a new directory `target`, whole or not at all."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for path in files:
            shutil.copy2(path, tmp / path.name)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _unusable(target, exc) from None


def _write_all(files: dict[str, bytes], target: Path) -> None:
    """Write `files` (name -> contents) into a new directory `target`, whole or not at all."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, data in files.items():
            write_file(tmp / name, data)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _unusable(target, exc) from None


def install_caps(cache: Path, paths: VMPaths) -> None:
    """Copy the cached capabilities into a VM's root (exit 3 on a full disk)."""
    _copy_all(sorted(cache.glob("*.xml")), paths.caps_dir)
