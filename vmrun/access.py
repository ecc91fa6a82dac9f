"""Logging in to guests: the stack's SSH key, host keys from the console, ssh options.

How it fits together (docs/access.md, "Logging in and running commands"):

* `up` makes the stack's key pair once (`ssh-keygen -t ed25519`, `<state>/ssh/id_ed25519`,
  mode 0600) and adds its public key to every cloud-init seed's user-data (`key_config`,
  a part vmrun/userdata.py adds).
  Not as NoCloud vendor-data: cloud-init 22.4 does read vendor-data from a NoCloud seed,
  but merges the two configs key by key with the user's winning, so a user-data with its
  own `ssh_authorized_keys` would drop ours.  The user-data becomes a MIME multipart: the
  user's own part as it was, then a cloud-config part that appends our key (its
  `Merge-Type` header: userdata.APPEND): the user's keys keep working.
* The supervisor shows every console line to a `ConsoleWatch`: the host keys cloud-init
  prints (`-----BEGIN SSH HOST KEY KEYS-----` ... `-----END ...`) replace the VM's lines in
  `<state>/ssh/known_hosts`, under the alias `VM.STACK` (ssh's `HostKeyAlias`), and the
  user whose authorized keys hold the stack's key (cloud-init's "Authorized keys from ...
  for user NAME" table) is kept as the VM's login when `ssh_user` is not set.  Host keys
  live in the guest's disk: they are kept while its disks are, and forgotten at `up` for
  a VM whose disks are all made anew (`--fresh`, `ephemeral`, no disk at all).
* `vmrun ssh`, `exec` and `cp` run OpenSSH's `ssh`/`scp` (argv lists) with options that
  name those files, `StrictHostKeyChecking=yes`, and `vmrun _proxy NETNS %h %p` as the
  ProxyCommand: a short-lived process that enters the stack's network namespace, connects
  to the VM's private address and relays stdin/stdout.  No host port is needed.
* What those verbs need of the running stack is written at `up` into
  `<state>/ssh/hosts.json` (addresses, namespace, users), so they read no manifest beyond
  its identity.

Nothing here prints; the CLI does.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import selectors
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmrun.errors import HostError, UsageError, VmrunError
from vmrun.layout import StackPaths, netns_name, ssh_alias

if TYPE_CHECKING:
    from vmrun.manifest import Identity, Stack

SSH = "ssh"
SCP = "scp"
SSH_KEYGEN = "ssh-keygen"
SSH_PORT = 22
EXIT_CONNECT = 255  # what ssh exits with when it cannot connect
BEGIN_KEYS = "-----BEGIN SSH HOST KEY KEYS-----"
END_KEYS = "-----END SSH HOST KEY KEYS-----"
MAX_KEYS = 16  # host keys kept of one block
MAX_BLOCK_LINES = 64  # a block without its END line after this many lines is dropped
CONNECT_TIMEOUT = 10.0
DEFAULT_USER = "root"  # when neither ssh_user nor cloud-init names one
NETNS_RE = re.compile(r"vmrun-[0-9a-f]{12}\Z")
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ssh-dss", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
             "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
             "sk-ecdsa-sha2-nistp256@openssh.com")
_KEY_RE = re.compile(r"(\S+) ([A-Za-z0-9+/]{16,8192}={0,2})(?: .*)?\Z")
_USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\$?\Z")
_TABLE_HEADER_RE = re.compile(r"Authorized keys from \S+ for user ([a-z_][a-z0-9_.-]{0,31})\Z")


class ConnectError(VmrunError):
    """vmrun cannot connect to the guest: exit status 255, as ssh's own."""

    exit_code = EXIT_CONNECT


# --- the stack's key ----------------------------------------------------------------------

def key_comment(stack_name: str) -> str:
    """The stack key's comment: the console parser finds the key's line by it."""
    return f"vmrun-{stack_name}"


def ensure_key(paths: StackPaths, stack_name: str) -> str | None:
    """The stack's public key, made on the first call (`ssh-keygen -t ed25519`); None when
    OpenSSH's ssh-keygen is not installed (then nothing can log in with it anyway)."""
    paths.ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(paths.ssh_dir, 0o700)
    keygen = shutil.which(SSH_KEYGEN)
    if not paths.ssh_key.exists():
        if keygen is None:
            return None
        for path in (paths.ssh_key, paths.ssh_public_key):
            path.unlink(missing_ok=True)
        _keygen([keygen, "-q", "-t", "ed25519", "-N", "", "-C", key_comment(stack_name),
                 "-f", str(paths.ssh_key)])
    os.chmod(paths.ssh_key, 0o600)
    if not paths.ssh_public_key.exists():
        if keygen is None:
            return None
        public = _keygen([keygen, "-y", "-f", str(paths.ssh_key)])
        paths.ssh_public_key.write_text(f"{public.strip()} {key_comment(stack_name)}\n")
    return paths.ssh_public_key.read_text().strip()


def _keygen(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"ssh-keygen failed: {exc}") from None
    if proc.returncode != 0:
        raise HostError(f"{' '.join(argv[:3])} ... failed: {proc.stderr.strip()}")
    return proc.stdout


# --- user-data ----------------------------------------------------------------------------

def key_config(public_key: str) -> str:
    """The cloud-config that gives the default user `public_key`; its part appends it to
    the user's own keys (userdata.APPEND, vmrun/seed.py)."""
    return ("#cloud-config\n"
            "# added by vmrun: the stack's SSH key (vmrun ssh, exec, cp)\n"
            "ssh_authorized_keys:\n"
            f"  - {json.dumps(public_key)}\n")


# --- what ssh needs of the stack: hosts.json ---------------------------------------------

@dataclass(frozen=True)
class Host:
    """What `vmrun ssh` needs of one VM (an entry of hosts.json)."""

    address: str | None  # on its first private network
    ssh_user: str | None  # from the manifest
    login: str | None = None  # the user cloud-init gave the stack's key

    @property
    def user(self) -> str:
        return self.ssh_user or self.login or DEFAULT_USER


def read_hosts(paths: StackPaths) -> dict[str, Any] | None:
    try:
        data = json.loads(paths.ssh_hosts.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def host_of(data: dict[str, Any], vm: str) -> Host | None:
    entry = data.get("vms", {}).get(vm)
    if not isinstance(entry, dict):
        return None
    return Host(address=entry.get("address"), ssh_user=entry.get("ssh_user"),
                login=entry.get("login"))


def netns_of(data: dict[str, Any]) -> str | None:
    """The stack's network namespace as hosts.json names it, if it is a name vmrun gives."""
    netns = data.get("netns")
    return netns if isinstance(netns, str) and NETNS_RE.match(netns) else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def _disk_ids(stack: Stack, name: str) -> dict[int, tuple[int, int] | None]:
    """The identity of each of the VM's overlaid disks (None: not there)."""
    vm, paths = stack.vm(name), stack.paths.vm(name)
    ids: dict[int, tuple[int, int] | None] = {}
    for index, disk in enumerate(vm.disks):
        if disk.overlaid:
            try:
                st = os.stat(paths.disk(index))
                ids[index] = (st.st_dev, st.st_ino)
            except OSError:
                ids[index] = None
    return ids


class Preparation:
    """`up`'s part, around the supervisor's preparation of the VMs: the key first (seeds
    need it), then, once the disks are made, what a VM's new disks make stale."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.public_key = ensure_key(stack.paths, stack.name)
        self.before = {vm.name: _disk_ids(stack, vm.name) for vm in stack.vms}

    def finish(self) -> None:
        """Write hosts.json; forget the host keys and login of every VM whose disks were
        not kept (made anew, or none: a new boot's host keys are new ones)."""
        paths = self.stack.paths
        old = read_hosts(paths) or {}
        kept = set()
        for vm in self.stack.vms:
            before, after = self.before[vm.name], _disk_ids(self.stack, vm.name)
            if after and all(before.get(i) is not None and before.get(i) == after[i]
                             for i in after):
                kept.add(vm.name)
        vms = {}
        for vm in self.stack.vms:
            previous = host_of(old, vm.name) if vm.name in kept else None
            vms[vm.name] = {"address": vm.address,
                            "ssh_user": vm.ssh_user,
                            "login": previous.login if previous else None}
        data = {"stack": self.stack.name,
                "netns": netns_name(self.stack.state_dir) if self.stack.networks else None,
                "vms": vms}
        _write_atomic(paths.ssh_hosts, json.dumps(data, indent=2) + "\n")
        aliases = {ssh_alias(self.stack.name, name) for name in kept}
        update_known_hosts(paths.known_hosts, lambda alias: alias in aliases, [])


# --- known_hosts ----------------------------------------------------------------------------

def update_known_hosts(path: Path, keep: Callable[[str], bool],
                       entries: Iterable[str]) -> None:
    """Rewrite known_hosts: the lines whose host `keep` accepts, then `entries`."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    new = [line for line in lines if line.split(" ", 1)[0] and keep(line.split(" ", 1)[0])]
    new += list(entries)
    if new != lines or not path.exists():
        _write_atomic(path, "".join(line + "\n" for line in new))


def known_aliases(path: Path) -> set[str]:
    try:
        return {line.split(" ", 1)[0] for line in path.read_text().splitlines() if line}
    except OSError:
        return set()


def host_key(line: str) -> str | None:
    """`TYPE BASE64` of a public key line (its comment dropped), or None when the line is
    not a well-formed public key (the blob must name its own type)."""
    match = _KEY_RE.match(line.strip())
    if match is None or match.group(1) not in KEY_TYPES:
        return None
    kind, blob = match.group(1), match.group(2)
    try:
        raw = base64.b64decode(blob, validate=True)
    except ValueError:
        return None
    size = int.from_bytes(raw[:4], "big")
    if raw[4:4 + size] != kind.encode():
        return None
    return f"{kind} {blob}"


@dataclass
class Found:
    """What a console line completed: the VM's host keys, or its login user."""

    host_keys: list[str] | None = None
    login: str | None = None


class ConsoleParser:
    """Pure: reads one VM's console lines for cloud-init's host key block and its table
    of the users' authorized keys (the user holding `comment`'s key is the login)."""

    def __init__(self, comment: str) -> None:
        self.comment = comment
        self.block: list[str] | None = None  # inside a host key block
        self.block_lines = 0
        self.table_user: str | None = None  # inside a user's authorized keys table

    def feed(self, line: str) -> Found | None:
        text = line.strip()
        if self.block is not None:
            if END_KEYS in text:
                keys, self.block = self.block, None
                return Found(host_keys=keys) if keys else None
            self.block_lines += 1
            if self.block_lines > MAX_BLOCK_LINES:
                self.block = None
                return None
            key = host_key(text)
            if key is not None and key not in self.block and len(self.block) < MAX_KEYS:
                self.block.append(key)
            return None
        if BEGIN_KEYS in text:
            self.block, self.block_lines = [], 0
            return None
        if "ci-info:" not in text:
            return None
        body = text.split("ci-info:", 1)[1].strip()
        if body.startswith("+") and re.search("[A-Za-z]", body):  # a table's title
            header = _TABLE_HEADER_RE.fullmatch(body.strip("+").strip())
            self.table_user = header.group(1) if header else None
        elif body.startswith("|") and self.table_user is not None:
            cells = [cell.strip() for cell in body.strip("|").split("|")]
            if cells[-1] == self.comment:
                return Found(login=self.table_user)
        elif not body.startswith("+"):
            self.table_user = None
        return None


class ConsoleWatch:
    """The supervisor's hook: every console line of every VM goes through `line`; the
    host keys go to known_hosts, the login user to hosts.json.  Never raises."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.parsers = {vm.name: ConsoleParser(key_comment(stack.name)) for vm in stack.vms}

    def line(self, vm: str, line: str) -> None:
        parser = self.parsers.get(vm)
        if parser is None:
            return
        found = parser.feed(line)
        if found is None:
            return
        paths = self.stack.paths
        with contextlib.suppress(OSError):
            if found.host_keys:
                alias = ssh_alias(self.stack.name, vm)
                update_known_hosts(paths.known_hosts, lambda host: host != alias,
                                   [f"{alias} {key}" for key in found.host_keys])
            if found.login:
                data = read_hosts(paths)
                entry = (data or {}).get("vms", {}).get(vm)
                if isinstance(entry, dict) and entry.get("login") != found.login:
                    entry["login"] = found.login
                    _write_atomic(paths.ssh_hosts, json.dumps(data, indent=2) + "\n")


# --- reaching a VM ------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One VM, as ssh reaches it."""

    alias: str  # VM.STACK: the Host of the config, the HostKeyAlias
    address: str
    user: str
    netns: str
    paths: StackPaths


def vmrun_command() -> list[str]:
    """How ssh runs this vmrun (the ProxyCommand): the `vmrun` script beside this Python
    (a venv's), else this Python with `-m vmrun`."""
    script = Path(sys.executable).with_name("vmrun")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "vmrun"]


def _config_word(value: str) -> str:
    """A value for ssh's config or -o: `%` doubled (ssh expands %-tokens in file and
    command options), quoted when it has blanks or quotes."""
    value = value.replace("%", "%%")
    if re.search(r"[\s\"'\\]", value):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def proxy_command(netns: str) -> str:
    """The ProxyCommand (ssh hands it to the user's shell: each word quoted)."""
    words = [shlex.quote(word).replace("%", "%%") for word in vmrun_command()]
    return " ".join([*words, "_proxy", netns, "%h", "%p"])


def options(target: Target) -> list[tuple[str, str]]:
    """The ssh options of `target`, in ssh_config's names."""
    paths = target.paths
    return [("HostName", target.address),
            ("User", target.user),
            ("IdentityFile", _config_word(str(paths.ssh_key))),
            ("IdentitiesOnly", "yes"),
            ("UserKnownHostsFile", _config_word(str(paths.known_hosts))),
            ("GlobalKnownHostsFile", "/dev/null"),
            ("StrictHostKeyChecking", "yes"),
            ("HostKeyAlias", target.alias),
            ("CheckHostIP", "no"),
            ("ProxyCommand", proxy_command(target.netns))]


def option_args(target: Target) -> list[str]:
    args = []
    for name, value in options(target):
        args += ["-o", f"{name}={value}"]
    return args


def config(targets: Iterable[Target], missing: Iterable[str] = ()) -> str:
    """An ssh_config snippet: one `Host VM.STACK` block per target."""
    out = []
    for target in targets:
        out.append(f"Host {target.alias}")
        out += [f"    {name} {value}" for name, value in options(target)]
        out.append("")
    out += [f"# {line}" for line in missing]
    return "\n".join(out).rstrip("\n") + "\n"


def ssh_argv(target: Target, command: list[str], tty: bool, batch: bool) -> list[str]:
    """ssh to `target`: an interactive shell, or `command` (its words joined by ssh with
    spaces and run by the user's shell in the guest, as with plain ssh)."""
    argv = [shutil.which(SSH) or SSH, *option_args(target)]
    if batch:
        argv += ["-o", "BatchMode=yes", "-T"]
    elif tty and command:
        argv.append("-t")
    return [*argv, "--", target.alias, *command]


def parse_cp_arg(word: str, vm_names: Iterable[str]) -> tuple[str | None, str]:
    """`VM:path` -> (VM, path); a local path -> (None, path)."""
    head, sep, tail = word.partition(":")
    if sep and "/" not in head and head in set(vm_names):
        return head, tail
    return None, word


def scp_argv(target: Target, src: tuple[str | None, str], dest: tuple[str | None, str],
             recursive: bool) -> list[str]:
    def word(side: tuple[str | None, str]) -> str:
        vm, path = side
        if vm is not None:
            return f"{target.alias}:{path}"
        if ":" in path.split("/", 1)[0]:  # scp would take "a:b" for a host
            return "./" + path
        return path

    argv = [shutil.which(SCP) or SCP, "-q", *option_args(target), "-o", "BatchMode=yes"]
    if recursive:
        argv.append("-r")
    return [*argv, "--", word(src), word(dest)]


def require_ssh() -> None:
    if shutil.which(SSH) is None or shutil.which(SCP) is None:
        raise HostError("OpenSSH's ssh and scp are not installed",
                        hint="apt-get install openssh-client (make setup does)")


def target(stack: Identity, vm: str, wait: float,
           note: Callable[[str], None] = lambda text: None, running: bool = False) -> Target:
    """The running VM `vm` as ssh reaches it, once its host keys are known (waiting up to
    `wait` seconds for the guest to print them); ConnectError (255) when it cannot be
    reached, UsageError (2) when it never can (no private network).  `running`: the
    caller knows the stack runs (a driver's readiness check, which cannot see the
    supervisor from inside the stack's PID namespace): no check of the stack's state."""
    from vmrun import client, operate
    from vmrun import protocol as p

    paths = stack.paths
    data = read_hosts(paths)
    if data is None or not paths.ssh_key.exists():
        why = ("was never started" if data is None else
               "has no SSH key (OpenSSH's ssh-keygen was missing when it started)")
        raise ConnectError(f'stack "{stack.name}" {why}',
                           hint=f"start it with: vmrun up --detach {stack.path}")
    host = host_of(data, vm)
    if host is None:
        raise ConnectError(f'VM "{vm}" was not part of the stack when it started',
                           hint=f"restart the stack: vmrun down {stack.path}; "
                                f"vmrun up --detach {stack.path}")
    netns = netns_of(data)
    if host.address is None or netns is None:
        raise UsageError(f'VM "{vm}" has no private network: vmrun reaches a guest through '
                         "its address on its first network",
                         hint=f'add a [network.lan] table and networks = ["lan"] to '
                              f"[vm.{vm}] (its NAT NIC takes no inbound connection)")
    alias = ssh_alias(stack.name, vm)
    deadline = time.monotonic() + wait
    noted = False
    next_check = 0.0
    if not running and client.lock_holder(paths) is None:
        raise ConnectError(f'stack "{stack.name}" is not running',
                           hint=f"start it with: vmrun up --detach {stack.path}")
    while alias not in known_aliases(paths.known_hosts):
        now = time.monotonic()
        if now >= next_check and not running:
            if client.lock_holder(paths) is None:
                raise ConnectError(f'stack "{stack.name}" stopped',
                                   hint=f"see: vmrun ps {stack.path}")
            try:
                status = operate.status(stack)
            except VmrunError:  # it does not answer for the moment
                status = None
            else:
                vm_status = status.vms.get(vm) if status is not None else None
                if vm_status is None or vm_status.state is p.VMState.STOPPED:
                    raise ConnectError(f'VM "{vm}" is not running',
                                       hint=f"see its console: vmrun logs {stack.path} {vm}")
            next_check = now + 1.0
        if now >= deadline:
            raise ConnectError(
                f"{vm}'s SSH host keys are not known: its console has shown no "
                f"{BEGIN_KEYS} block (cloud-init prints it late in the guest's first boot)",
                hint=f"wait longer (--wait), see vmrun logs {stack.path} {vm}, or see "
                     "docs/access.md for guests without cloud-init")
        if not noted:
            note(f"waiting for {vm}'s SSH host keys (cloud-init prints them on the console "
                 "late in the guest's first boot)")
            noted = True
        time.sleep(0.2)
    host = host_of(read_hosts(paths) or {}, vm) or host
    assert host.address is not None
    return Target(alias=alias, address=host.address, user=host.user, netns=netns, paths=paths)


def config_targets(stack: Identity, names: Iterable[str]) -> tuple[list[Target], list[str]]:
    """The VMs of `names` that ssh can reach (as of the stack's last `up`), and a line
    for each one it cannot."""
    paths = stack.paths
    data = read_hosts(paths)
    if data is None:
        raise VmrunError(f'stack "{stack.name}" was never started: its SSH key and hosts '
                         "are made by its first `vmrun up`",
                         hint=f"start it with: vmrun up --detach {stack.path}")
    targets, missing = [], []
    netns = netns_of(data)
    for name in names:
        host = host_of(data, name)
        if host is None or host.address is None or netns is None:
            missing.append(f"{name}: no private network (vmrun ssh cannot reach it)")
            continue
        targets.append(Target(alias=ssh_alias(stack.name, name), address=host.address,
                              user=host.user, netns=netns, paths=paths))
    return targets, missing


# --- the ProxyCommand ------------------------------------------------------------------------

def proxy(netns: str, host: str, port: int) -> int:
    """Relay stdin/stdout to `host:port` inside the stack's network namespace `netns`
    (ssh's ProxyCommand).  Returns the exit status: 255 when it cannot connect."""
    from vmrun import _fastsig

    if not NETNS_RE.match(netns):
        raise UsageError(f"_proxy: {netns!r} is not a vmrun network namespace")
    try:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConnectError("the stack's network namespace is gone: the stack is not "
                           "running") from None
    except OSError as exc:
        raise ConnectError(f"cannot open the stack's network namespace: {exc.strerror}") \
            from None
    try:
        _fastsig.enter_netns(fd)
    except OSError as exc:
        raise ConnectError(f"cannot enter the stack's network namespace: {exc.strerror} "
                           "(it needs root)") from None
    finally:
        os.close(fd)
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        raise ConnectError(f"cannot connect to {host}:{port} in the stack's network: "
                           f"{exc.strerror or exc}") from None
    sock.settimeout(None)
    relay(sock, 0, 1)
    return 0


def relay(sock: socket.socket, fd_in: int, fd_out: int) -> None:
    """Copy fd_in to sock and sock to fd_out until the socket's side ends; EOF on fd_in
    is passed on as a half-close."""
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(fd_in, selectors.EVENT_READ)
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj is sock:
                    data = sock.recv(65536)
                    if not data:
                        return
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd_out, view):]
                else:
                    data = os.read(fd_in, 65536)
                    if not data:
                        selector.unregister(fd_in)
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_WR)
                    else:
                        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return
    finally:
        selector.close()
        sock.close()
