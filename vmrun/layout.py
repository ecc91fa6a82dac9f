"""Every name vmrun gives a file, directory, socket or interface: nowhere else.

    <state_dir>/<stack>/            mode 0700
        .vmrun-stack                marks a directory vmrun made (nothing else is touched)
        last-run.json               outcome of the last run (or of the one running)
        up.log                      the background supervisor's output (`up --detach`)
        forward.log                 the port forwarder's messages
        probe.log                   the capabilities probe's messages
        zygote.log                  the driver zygote's messages (vmrun/proc/zygote.py)
        vms/<vm>/console.log        the VM's whole console of the last run
        vms/<vm>/driver.log         the driver's and libvirt's messages (this run's)
        vms/<vm>/driver.log.1       the same of the run before
        vms/<vm>/disk-N.qcow2       overlay or blank disk of the VM's disks[N] (N from 0)
        vms/<vm>/disk-N.json        what that disk was made from
        vms/<vm>/seed.iso           the cloud-init NoCloud seed
        vms/<vm>/root               libvirt's embedded root (or a link to a short one)
        ssh/                        mode 0700: what `vmrun ssh`, `exec` and `cp` use
        ssh/id_ed25519(.pub)        the stack's key pair (made by the first `up`; 0600)
        ssh/known_hosts             the guests' host keys, as their consoles showed them
        ssh/hosts.json              each VM's address and user, the stack's namespace
    <short root base>/stacks/<hash of the stack's directory>/    mode 0700
        lock                        held (flock) by the running supervisor; holds its pid
        control.sock                the running supervisor's control socket (0600)
        state-dir                   the stack's directory, for people
    <root>/
        etc/qemu.conf               written by vmrun
        cache/qemu/capabilities/    QEMU's capabilities (copied from the host's cache)
        run/qemu/<vm>.pid           libvirt's pidfile of the VM's QEMU
        console.sock                QEMU's serial console (the driver connects)
        attach.sock                 the driver's console relay (`vmrun console` connects)
        shares/<tag>                a shared folder's mount point (bound in the driver only)
        .vmrun-link                 in a short root: the state-dir link that points to it

UNIX socket paths are limited to 108 bytes and libvirt puts the QEMU monitor socket
under the root, so a root whose path would be too long lives in a short directory
under /run/vmrun (or the user's runtime directory) and is linked from the state dir.
A running stack's lock and control socket live there too, not in the state directory:
a stack stays findable (`ps`, `down`) even when its state directory is deleted.

Those directories must be the user's own and private (`private_dir`): a base another
user could write into (a /tmp directory made first by someone else) is refused.

Runtime names outside the state directory: the stack's network namespace
(`netns_name`), one bridge per network in it (`bridge_name`), one tap per NIC
(`tap_name`).  QEMU's capabilities are cached per host in `caps_cache_base()`.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from vmrun.errors import HostError
from vmrun.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

# Room left under the root: "/lib/qemu/domain-NNNN-<20 chars>/monitor.sock" and more.
ROOT_PATH_MAX = 48
CONTROL_SOCKET = "control.sock"
MANIFEST_NAMES = ("stack.toml", "vmrun.toml")  # a stack's manifest, when none is named
OWNER_FILE = ".vmrun-link"


def private_dir(path: Path) -> Path:
    """Make `path` (mode 0700) if needed and check that it is a directory of this user's
    that no one else can write to (not a symlink); HostError (exit 3) otherwise.  Like
    ssh and tmux, refuse rather than write where another user can interfere."""
    with contextlib.suppress(FileExistsError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise HostError(f"cannot use {path}: {exc.strerror}") from None
    problem = None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        problem = "it is not a directory (or is a symbolic link)"
    elif st.st_uid != os.geteuid():
        problem = f"it belongs to uid {st.st_uid}, not to you (uid {os.geteuid()})"
    elif st.st_mode & 0o022:
        problem = f"others can write to it (mode {stat.S_IMODE(st.st_mode):o})"
    if problem:
        raise HostError(f"refusing to use {path}: {problem}",
                        hint="remove it, or set XDG_RUNTIME_DIR to a directory of your own")
    return path


def remove(path: Path) -> None:
    """Remove what is at `path` (a file, a socket, a link, or a directory vmrun's stale
    state left there); nothing there is fine."""
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass
    except IsADirectoryError:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def short_root_base() -> Path:
    if os.geteuid() == 0:
        return Path("/run/vmrun")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "vmrun" if runtime else Path(f"/tmp/vmrun-{os.getuid()}")


def nat_socket_base() -> Path:
    """Where passt's sockets live.  As root, passt runs as `nobody`, who must reach its
    socket's directory: a base of root's (mode 0711: others may pass, not list) holding
    one directory of nobody's per VM.  Otherwise a directory of the user's."""
    return Path("/run/vmrun-nat") if os.geteuid() == 0 else short_root_base() / "nat"


@contextlib.contextmanager
def short_socket_path(socket: Path) -> Iterator[str]:
    """A path to `socket` short enough for bind()/connect() however deep its directory:
    /proc/self/fd/N/NAME, N an O_PATH descriptor of the directory, open meanwhile."""
    fd = os.open(socket.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{socket.name}"
    finally:
        os.close(fd)


def caps_cache_base() -> Path:
    """Where QEMU's capabilities are cached, one directory per QEMU and libvirt build:
    $VMRUN_CAPS_CACHE if set (a CI cache, a test's own), else the user's cache."""
    if os.environ.get("VMRUN_CAPS_CACHE"):
        return Path(os.environ["VMRUN_CAPS_CACHE"]).expanduser().absolute()
    if os.geteuid() == 0:
        base = Path("/var/cache/vmrun")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmrun"
    return base / "qemu-capabilities"


def netns_name(stack_dir: Path) -> str:
    """The stack's network namespace: unique per state directory."""
    return "vmrun-" + _digest(str(stack_dir), 12)


def ssh_alias(stack: str, vm: str) -> str:
    """A VM's name for ssh: its `Host` in `vmrun ssh --config`, its known_hosts entry."""
    return f"{vm}.{stack}"


def bridge_name(network: str) -> str:
    """The bridge of a network, in the stack's namespace (at most 15 characters)."""
    return f"vr-{network}"


def tap_name(mac: str) -> str:
    """A NIC's tap: named after the MAC, unique in the stack (each VM's libvirt would
    otherwise call its taps vnet0, vnet1, ... and clash in the shared namespace)."""
    return "vt" + mac.replace(":", "")[6:]


def _digest(text: str, length: int) -> str:
    """The first `length` hex digits of the SHA-256 of `text`."""
    import hashlib  # not for `vmrun --help`

    return hashlib.sha256(text.encode()).hexdigest()[:length]


class VMPaths(Record):  # a frozen value class (vmrun/record.py)
    name: str
    dir: Path
    root_link: Path  # <dir>/root: the root itself, or a link to it
    root: Path  # the path libvirt is given (short)

    def __init__(self, name: str, dir: Path, root_link: Path, root: Path) -> None:
        self._set(name=name, dir=dir, root_link=root_link, root=root)

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def driver_log(self) -> Path:
        return self.dir / "driver.log"

    @property
    def previous_driver_log(self) -> Path:
        return self.dir / "driver.log.1"

    @property
    def seed(self) -> Path:
        return self.dir / "seed.iso"

    def disk(self, index: int) -> Path:
        return self.dir / f"disk-{index}.qcow2"

    @property
    def nat_socket(self) -> Path:
        """passt's socket for the VM's NAT NIC, in a directory of its own (see nat.py)."""
        digest = _digest(str(self.root), 16)
        return nat_socket_base() / digest / "passt.sock"

    @property
    def nat_log(self) -> Path:
        return self.dir / "passt.log"

    @property
    def nvram(self) -> Path:
        """The VM's UEFI variables (boot = "uefi"), kept between runs like an overlay."""
        return self.dir / "nvram.fd"

    @property
    def console_socket(self) -> Path:
        return self.root / "console.sock"

    @property
    def attach_socket(self) -> Path:
        return self.root / "attach.sock"

    @property
    def qemu_conf(self) -> Path:
        return self.root / "etc" / "qemu.conf"

    @property
    def caps_dir(self) -> Path:
        return self.root / "cache" / "qemu" / "capabilities"

    def share(self, tag: str) -> Path:
        """Where the driver bind-mounts a shared folder (in its own mount namespace
        only): the directory libvirt's virtiofsd serves (vmrun/shares.py)."""
        return self.root / "shares" / tag

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def pidfile(self) -> Path:
        """libvirt's pidfile of the VM's QEMU (the domain is named after the VM)."""
        return self.root / "run" / "qemu" / f"{self.name}.pid"

    @property
    def owner_file(self) -> Path:
        return self.root / OWNER_FILE


class StackPaths(Record):  # a frozen value class (vmrun/record.py)
    dir: Path

    def __init__(self, dir: Path) -> None:
        self._set(dir=dir)

    @property
    def marker(self) -> Path:
        return self.dir / ".vmrun-stack"

    @property
    def runtime(self) -> Path:
        """The running stack's own directory outside the state directory."""
        digest = _digest(str(self.dir), 16)
        return short_root_base() / "stacks" / digest

    @property
    def lock(self) -> Path:
        return self.runtime / "lock"

    def is_ours(self) -> bool:
        """The directory is missing, or vmrun made it (stacks of earlier versions have no
        marker but a lock)."""
        if not os.path.lexists(self.dir):
            return True
        return self.dir.is_dir() and not self.dir.is_symlink() and (
            self.marker.exists() or (self.dir / "lock").exists())

    @property
    def control_socket(self) -> Path:
        return self.runtime / CONTROL_SOCKET

    @property
    def last_run(self) -> Path:
        return self.dir / "last-run.json"

    @property
    def up_log(self) -> Path:
        return self.dir / "up.log"

    @property
    def forward_log(self) -> Path:
        return self.dir / "forward.log"

    @property
    def probe_log(self) -> Path:
        return self.dir / "probe.log"

    @property
    def zygote_log(self) -> Path:
        return self.dir / "zygote.log"

    @property
    def vms_dir(self) -> Path:
        return self.dir / "vms"

    @property
    def ssh_dir(self) -> Path:
        return self.dir / "ssh"

    @property
    def ssh_key(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def ssh_public_key(self) -> Path:
        return self.ssh_dir / "id_ed25519.pub"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    @property
    def ssh_hosts(self) -> Path:
        return self.ssh_dir / "hosts.json"

    def vm(self, name: str) -> VMPaths:
        vm_dir = self.vms_dir / name
        link = vm_dir / "root"
        if len(str(link)) <= ROOT_PATH_MAX:
            root = link
        else:
            digest = _digest(str(link), 16)
            root = short_root_base() / digest
        return VMPaths(name=name, dir=vm_dir, root_link=link, root=root)

    def probe_root(self) -> Path:
        """A short root of its own for this supervisor's capabilities probe."""
        return short_root_base() / f"probe-{os.getpid()}"
