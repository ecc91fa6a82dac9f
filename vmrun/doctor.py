"""`vmrun doctor`: can this host run guests, and if not, what to do about it.

Checks in the spirit of virt-host-validate.  Each one returns a `Check`; a failing
*required* check means guests cannot run (exit status 3), a failing optional one is a
warning.  Nothing here prints and nothing is left behind: the CLI renders the result.
libvirt is imported lazily, inside the checks that need it.
"""

from __future__ import annotations

import glob
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vmrun import host, layout
from vmrun.errors import EXIT_HOST, EXIT_OK, HostError

MIN_PYTHON = (3, 11)
VERSION_TIMEOUT = 10.0  # seconds for `qemu-... --version`
_BUILD_HINT = "build it: `.venv/bin/pip install -e .` in the vmrun checkout (or `make setup`)"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    required: bool = True

    @property
    def status(self) -> str:
        """The table's word: ok, FAIL (required, failed) or warn (optional, failed)."""
        if self.ok:
            return "ok"
        return "FAIL" if self.required else "warn"


def check_python() -> Check:
    version = ".".join(str(v) for v in sys.version_info[:3])
    ok = sys.version_info >= MIN_PYTHON
    wanted = ".".join(str(v) for v in MIN_PYTHON)
    return Check("python", ok, f"Python {version} ({sys.executable})",
                 None if ok else f"use Python {wanted} or newer")


def check_libvirt_python() -> Check:
    try:
        import libvirt  # noqa: F401
    except (ImportError, OSError) as exc:
        return Check("libvirt-python", False, f"the libvirt Python binding cannot be imported "
                     f"({exc})", host.SETUP_HINT)
    try:
        version = importlib.metadata.version("libvirt-python")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    return Check("libvirt-python", True, f"libvirt-python {version}")


def _libvirt_version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def check_libvirt() -> Check:
    try:
        import libvirt
    except (ImportError, OSError):
        return Check("libvirt", False, "unknown: needs the libvirt Python binding",
                     host.SETUP_HINT)
    try:
        number = int(libvirt.getVersion())
    except libvirt.libvirtError as exc:
        return Check("libvirt", False, f"libvirt.getVersion() failed: {exc}", host.SETUP_HINT)
    return Check("libvirt", True, f"libvirt library {_libvirt_version(number)}")


def check_qemu_driver() -> Check:
    found = sorted(glob.glob(host.LIBVIRT_QEMU_DRIVER_GLOB))
    if not found:
        return Check("libvirt-qemu-driver", False,
                     f"libvirt's QEMU driver is not installed (no {host.LIBVIRT_QEMU_DRIVER_GLOB})",
                     "install the Debian package libvirt-daemon-driver-qemu; " + host.SETUP_HINT)
    return Check("libvirt-qemu-driver", True, found[0])


def _version_line(binary: str) -> str:
    """The first line of `binary --version`; raises OSError or SubprocessError."""
    proc = subprocess.run([binary, "--version"], capture_output=True, text=True,
                          timeout=VERSION_TIMEOUT, check=True, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    return lines[0] if lines else "(no version printed)"


def _check_binary(name: str, binary: str, required: bool) -> Check:
    path = shutil.which(binary, path="/usr/bin:/usr/local/bin:" + os.environ.get("PATH", ""))
    if path is None:
        return Check(name, False, f"{binary} is not installed", host.SETUP_HINT, required)
    try:
        version = _version_line(path)
    except subprocess.TimeoutExpired:
        return Check(name, False, f"`{path} --version` did not answer in {VERSION_TIMEOUT:g}s",
                     host.SETUP_HINT, required)
    except (OSError, subprocess.SubprocessError) as exc:
        return Check(name, False, f"`{path} --version` failed: {exc}", host.SETUP_HINT,
                     required)
    return Check(name, True, f"{version} ({path})", None, required)


def check_qemu() -> Check:
    return _check_binary("qemu", host.QEMU_BINARY, required=True)


def check_qemu_img() -> Check:
    return _check_binary("qemu-img", "qemu-img", required=True)


def check_accounts() -> Check:
    if os.geteuid() != 0:
        return Check("libvirt-qemu-account", True,
                     "not running as root: the libvirt-qemu user and group are not needed",
                     required=False)
    try:
        host.check_accounts()
    except HostError as exc:
        return Check("libvirt-qemu-account", False, exc.message, exc.hint)
    return Check("libvirt-qemu-account", True, "the libvirt-qemu user and group exist")


def check_kvm() -> Check:
    accel = host.choose_accel("auto")
    if accel.name == "kvm":
        return Check("kvm", True, f'KVM is usable: accel = "auto" will use kvm ({host.KVM_DEVICE})',
                     required=False)
    return Check("kvm", False,
                 f'{accel.reason}; accel = "auto" will use tcg (software emulation, slower)',
                 "guests still run under TCG; for KVM enable VT-x/AMD-V in the firmware (or "
                 "nested virtualisation for a VM host) and load kvm_intel or kvm_amd",
                 required=False)


def _writable(path: Path, what: str) -> tuple[bool, str, str | None]:
    """Whether `path` can be used as a directory: it, or its nearest existing ancestor
    (where it would be created), is a directory a file can be created in."""
    ancestor = path
    try:
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return (False, f"{what} {path}: {ancestor} is not a directory",
                    f"choose another {what}, or remove or rename the file {ancestor}")
        fd, probe = tempfile.mkstemp(prefix=".vmrun-doctor-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return (False, f"{what} {path}: cannot create a file in {ancestor} ({exc.strerror})",
                f"make {ancestor} writable for this user, or choose another {what}")
    if ancestor == path:
        return True, f"{what} {path} is writable", None
    return True, f"{what} {path} does not exist yet; it can be created in {ancestor}", None


def check_state_dir(state_dir: Path | None = None) -> Check:
    path = (state_dir if state_dir is not None else Path(".vmrun")).absolute()
    return Check("state-dir", *_writable(path, "state directory"))


def check_fastsig() -> Check:
    try:
        module = importlib.import_module("vmrun._fastsig")
    except ImportError as exc:
        return Check("fastsig", False, f"the compiled extension vmrun._fastsig is missing ({exc})",
                     _BUILD_HINT)
    return Check("fastsig", True, f"vmrun._fastsig ({getattr(module, '__file__', '?')})")


def check_short_roots() -> Check:
    base = layout.short_root_base()
    ok, detail, fix = _writable(base, "short-root directory")
    # A short root is <base>/<16 hex digits>; it must stay as short as a root in a state dir.
    longest = len(str(base)) + 17
    if ok and longest > layout.ROOT_PATH_MAX:
        return Check("short-roots", False,
                     f"{base} is too long for short roots ({longest} > {layout.ROOT_PATH_MAX} "
                     "characters): QEMU's monitor socket path would not fit",
                     "set XDG_RUNTIME_DIR to a shorter directory", required=True)
    return Check("short-roots", ok, detail, fix)


def _guarded(name: str, required: bool, check: Callable[[], Check]) -> Check:
    try:
        return check()
    except Exception as exc:  # a doctor reports a broken check instead of crashing
        return Check(name, False, f"the check itself failed: {exc!r}",
                     "report this as a vmrun bug", required)


def run_checks(state_dir: Path | None = None) -> list[Check]:
    """Run every host check, in a fixed order; never raises."""
    checks: list[tuple[str, bool, Callable[[], Check]]] = [
        ("python", True, check_python),
        ("libvirt-python", True, check_libvirt_python),
        ("libvirt", True, check_libvirt),
        ("libvirt-qemu-driver", True, check_qemu_driver),
        ("qemu", True, check_qemu),
        ("qemu-img", True, check_qemu_img),
        ("libvirt-qemu-account", os.geteuid() == 0, check_accounts),
        ("kvm", False, check_kvm),
        ("state-dir", True, lambda: check_state_dir(state_dir)),
        ("fastsig", True, check_fastsig),
        ("short-roots", True, check_short_roots),
    ]
    return [_guarded(name, required, check) for name, required, check in checks]


def passed(checks: list[Check]) -> bool:
    """True when every required check passed: guests can run."""
    return all(c.ok or not c.required for c in checks)


def exit_code(checks: list[Check]) -> int:
    return EXIT_OK if passed(checks) else EXIT_HOST


def report_json(checks: list[Check]) -> dict[str, Any]:
    return {"ok": passed(checks),
            "checks": [{**asdict(c), "status": c.status} for c in checks]}


def format_table(checks: list[Check]) -> str:
    """One line per check (status, name, detail), an indented `fix:` line under failures."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"      {'':<{width}}  fix: {c.fix}")
    return "\n".join(lines)
