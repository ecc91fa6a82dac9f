"""Each VM's embedded libvirt root: its directory, its qemu.conf, its capabilities cache.

libvirt probes QEMU's capabilities (about 4 s) the first time a root is used; the result
is kept per host and QEMU build (keyed by the QEMU binary and libvirt's QEMU driver) and
copied into every new root, so a cold stack of N VMs pays one probe, not N.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from vmrun import host
from vmrun.layout import VMPaths, short_root_base

OWNER_FILE = ".vmrun-link"  # in a short root: the state-dir link that points to it

QEMU_CONF_ROOT = """\
# Written by vmrun for its embedded driver root.
stdio_handler = "file"
user = "root"
group = "root"
security_driver = "none"
namespaces = []
remember_owner = 0
"""
QEMU_CONF_USER = """\
# Written by vmrun for its embedded driver root.
stdio_handler = "file"
"""


def write_qemu_conf(paths: VMPaths) -> None:
    paths.qemu_conf.parent.mkdir(parents=True, exist_ok=True)
    paths.qemu_conf.write_text(QEMU_CONF_ROOT if os.geteuid() == 0 else QEMU_CONF_USER)


def prepare(paths: VMPaths) -> None:
    """Make the VM's root (or its short root and the link to it) and fresh logs."""
    paths.dir.mkdir(parents=True, exist_ok=True)
    if paths.root != paths.root_link:
        paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not paths.root_link.is_symlink() or paths.root_link.readlink() != paths.root:
            if paths.root_link.is_symlink() or paths.root_link.is_file():
                paths.root_link.unlink()
            elif paths.root_link.is_dir():
                shutil.rmtree(paths.root_link)
            paths.root_link.symlink_to(paths.root)
        (paths.root / OWNER_FILE).write_text(str(paths.root_link) + "\n")
    else:
        paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_qemu_conf(paths)
    paths.console_log.write_bytes(b"")
    with open(paths.driver_log, "ab") as log:
        log.write(f"--- vmrun driver log, {time.ctime()} ---\n".encode())


def collect_garbage() -> list[Path]:
    """Remove short roots whose VM state directory is gone (deleted without `vmrun clean`).

    Each short root names the link that points to it; while the VM's directory exists the
    root is kept.  Returns the roots removed.
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
        if not link.parent.exists():
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
    return removed


def caps_cache_dir(the_host: host.Host) -> Path:
    """Where QEMU's capabilities are cached for this host's QEMU and libvirt build."""
    key = []
    for path in (the_host.qemu, the_host.libvirt_driver):
        st = os.stat(path)
        key.append(f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("|".join(key).encode()).hexdigest()[:16]
    if os.geteuid() == 0:
        base = Path("/var/cache/vmrun")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmrun"
    return base / "qemu-capabilities" / digest


def install_caps(cache: Path, paths: VMPaths) -> None:
    """Copy the cached capabilities into a VM's root."""
    paths.caps_dir.mkdir(parents=True, exist_ok=True)
    for cached in cache.glob("*.xml"):
        shutil.copy2(cached, paths.caps_dir / cached.name)
