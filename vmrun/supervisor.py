"""The supervisor: starts one driver per VM, reaps everything, decides the outcome.

Why it is built this way:

* It is a child subreaper.  libvirt daemonizes QEMU, so each QEMU re-parents here and
  must be reaped at once: libvirt polls for the QEMU pid to vanish after a poweroff, and
  a zombie still counts as alive.  Exactly one place reaps: the SIGCHLD handler of
  `vmrun._fastsig` (waitpid(-1, WNOHANG) in C).  So drivers are started with
  os.posix_spawn, never subprocess.Popen, whose wait() would race that loop.
* Ctrl-C, SIGTERM and SIGHUP are forwarded to every driver's process group by the C
  handler itself, even while Python is busy; drivers turn them into an ACPI shutdown and
  a destroy after stop_timeout.  The supervisor only notes the signal for its exit status.
* It never imports libvirt.  Everything happens in one select() loop over the drivers'
  status pipes and the wake-up pipe the C handlers write to.
* When a driver dies without a result, its QEMU is killed here (it is our child by then).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrun import _fastsig, domain, host
from vmrun.errors import EXIT_FAILED, EXIT_OK, HostError
from vmrun.layout import StackPaths, VMPaths, short_root_base
from vmrun.manifest import VM, Stack

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# After a stop signal, drivers get stop_timeout plus this long before they are killed.
TEARDOWN_GRACE = 10.0

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


@dataclass
class VMResult:
    name: str
    outcome: str = "failed"
    reason: str = ""
    started: float | None = None
    stopped: float | None = None
    console: str = ""

    @property
    def duration(self) -> float | None:
        if self.started is None or self.stopped is None:
            return None
        return max(0.0, self.stopped - self.started)


@dataclass
class RunResult:
    stack: str
    exit: int
    vms: dict[str, VMResult]
    signal: int | None = None
    accel: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "exit": self.exit,
            "accel": self.accel,
            "signal": self.signal,
            "vms": {
                name: {
                    "outcome": r.outcome,
                    "reason": r.reason,
                    "started": _iso(r.started),
                    "stopped": _iso(r.stopped),
                    "console": r.console,
                }
                for name, r in self.vms.items()
            },
        }


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


@dataclass
class Child:
    """A driver process (for a VM, or the one-off capabilities probe)."""

    name: str
    pid: int
    fd: int  # read end of its status pipe
    paths: VMPaths
    buffer: bytes = b""
    eof: bool = False
    status: int | None = None  # raw wait status once reaped
    qemu_pid: int | None = None
    running_at: float | None = None
    ended_at: float | None = None
    result: dict[str, Any] | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.eof and self.status is not None


Listener = Callable[[str, str, dict[str, Any]], None]


class Supervisor:
    """Runs one stack to its end.  `listener(vm, event, data)` hears about progress."""

    def __init__(self, stack: Stack, listener: Listener | None = None) -> None:
        self.stack = stack
        self.paths = StackPaths(stack.state_dir)
        self.listener = listener or (lambda vm, event, data: None)
        self.children: dict[int, Child] = {}  # by pid
        self.exits: dict[int, int] = {}  # pid -> raw status, for pids not (yet) known
        self.qemu_pids: set[int] = set()
        self.signal: int | None = None
        self.signal_time: float | None = None
        self.wake_r = -1
        self.lock_fd = -1
        self.orphaned: set[str] = set()  # VMs whose driver died and whose QEMU was killed

    # --- set-up ---------------------------------------------------------------------------

    def run(self) -> RunResult:
        the_host = host.check(self.stack.accel)
        self.take_lock()
        try:
            self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            _fastsig.set_child_subreaper()
            _fastsig.install(wake_w, FORWARDED)
            try:
                return self._run(the_host)
            finally:
                _fastsig.uninstall()
                os.close(wake_w)
                os.close(self.wake_r)
        finally:
            os.close(self.lock_fd)

    def take_lock(self) -> None:
        stack_dir = self.paths.dir
        try:
            stack_dir.mkdir(parents=True, exist_ok=True)
            stack_dir.chmod(0o700)
            fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise HostError(f"the state directory {stack_dir} is unusable: {exc.strerror}",
                            hint="pass --state-dir DIR or set state_dir in the manifest "
                                 "to a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise HostError(f'stack "{self.stack.name}" is already running (pid {pid})',
                            hint=f"wait for it, or stop it with: kill {pid}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        # Drivers inherit the lock: the stack counts as running until the last one is gone.
        os.set_inheritable(fd, True)
        self.lock_fd = fd

    def prepare_vm(self, vm: VM, paths: VMPaths) -> None:
        """Give the VM a clean root: kill what a crashed run left, drop stale state."""
        paths.dir.mkdir(parents=True, exist_ok=True)
        if paths.root != paths.root_link:
            paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not paths.root_link.is_symlink() or paths.root_link.readlink() != paths.root:
                if paths.root_link.is_symlink() or paths.root_link.is_file():
                    paths.root_link.unlink()
                elif paths.root_link.is_dir():
                    shutil.rmtree(paths.root_link)
                paths.root_link.symlink_to(paths.root)
        else:
            paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.kill_stale_qemu(paths, vm.name)
        shutil.rmtree(paths.run_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            paths.console_socket.unlink()
        paths.qemu_conf.parent.mkdir(parents=True, exist_ok=True)
        paths.qemu_conf.write_text(QEMU_CONF_ROOT if os.geteuid() == 0 else QEMU_CONF_USER)
        paths.console_log.write_bytes(b"")
        with open(paths.driver_log, "ab") as log:
            log.write(f"--- vmrun driver log, {time.ctime()} ---\n".encode())

    def kill_stale_qemu(self, paths: VMPaths, name: str) -> None:
        pid = _read_pid(paths.pidfile(name))
        if pid is None or not _is_qemu_of(pid, paths.root):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _is_qemu_of(pid, paths.root) and time.monotonic() < deadline:
            self.wait_events(0.05)

    # --- the capabilities cache -----------------------------------------------------------

    def caps_cache_dir(self, the_host: host.Host) -> Path:
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

    def ensure_caps(self, the_host: host.Host, probe_paths: VMPaths) -> Path:
        """Probe QEMU's capabilities once per host and QEMU build; later roots copy them."""
        cache = self.caps_cache_dir(the_host)
        if any(cache.glob("*.xml")):
            return cache
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache.parent / f"{cache.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another stack may be probing right now
            if any(cache.glob("*.xml")):
                return cache
            self.listener("", "probing", {})
            shutil.rmtree(probe_paths.root, ignore_errors=True)
            probe_paths.qemu_conf.parent.mkdir(parents=True, exist_ok=True)
            probe_paths.qemu_conf.write_text(
                QEMU_CONF_ROOT if os.geteuid() == 0 else QEMU_CONF_USER)
            spec = {"name": "probe", "root": str(probe_paths.root), "probe": True,
                    "emulator": the_host.qemu,
                    "virttype": "kvm" if the_host.accel.name == "kvm" else "qemu"}
            child = self.spawn("", spec, probe_paths)
            while not child.done and self.signal is None:
                self.wait_events(None)
            ok = any(m.get("ev") == "probed" for m in child.messages)
            found = sorted(probe_paths.caps_dir.glob("*.xml"))
            if self.signal is None and ok and found:
                tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                for xml in found:
                    shutil.copy2(xml, tmp / xml.name)
                tmp.rename(cache)
            shutil.rmtree(probe_paths.root, ignore_errors=True)
        return cache

    # --- children -------------------------------------------------------------------------

    def spawn(self, name: str, spec: dict[str, Any], paths: VMPaths) -> Child:
        spec = dict(spec, supervisor_pid=os.getpid())
        r, w = os.pipe2(os.O_CLOEXEC)
        # Keep both ends away from 0-3 so the dup2 onto fd 3 below is always a real copy.
        r2 = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 10)
        w2 = fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(r)
        os.close(w)
        os.set_blocking(r2, False)
        paths.dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.pop("PYTHONSTARTUP", None)
        env["LIBVIRT_LOG_OUTPUTS"] = f"3:file:{paths.driver_log}"
        try:
            pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-m", "vmrun.driver", json.dumps(spec)],
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, str(paths.driver_log),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                    (os.POSIX_SPAWN_DUP2, w2, 3),
                ],
                setpgroup=0,
            )
        finally:
            os.close(w2)
        _fastsig.register_group(pid)
        child = Child(name=name, pid=pid, fd=r2, paths=paths)
        self.children[pid] = child
        if pid in self.exits:  # it exited before we got here
            child.status = self.exits.pop(pid)
        return child

    def wait_events(self, timeout: float | None) -> None:
        """Wait for a signal, a child exit or driver output, and handle what came."""
        fds = [self.wake_r] + [c.fd for c in self.children.values() if not c.eof]
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select(fds, [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass
        self.reap()
        for signum in _fastsig.take_signals():
            if self.signal is None:
                self.signal = signum
                self.signal_time = time.monotonic()
                self.listener("", "signal", {"signal": signum})
        for child in list(self.children.values()):
            if not child.eof:
                self.read_status(child)

    def reap(self) -> None:
        for pid, status in _fastsig.reap():
            child = self.children.get(pid)
            if child is not None:
                child.status = status
                child.ended_at = time.time()
            elif pid in self.qemu_pids:
                self.qemu_pids.discard(pid)
            else:
                self.exits[pid] = status

    def read_status(self, child: Child) -> None:
        while True:
            try:
                data = os.read(child.fd, 65536)
            except BlockingIOError:
                return
            if not data:
                child.eof = True
                os.close(child.fd)
                return
            child.buffer += data
            *lines, child.buffer = child.buffer.split(b"\n")
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                self.on_message(child, message)

    def on_message(self, child: Child, message: dict[str, Any]) -> None:
        event = message.get("ev")
        if event != "console":
            child.messages.append(message)
        if event == "running":
            pid = message.get("pid")
            child.running_at = time.time()
            if isinstance(pid, int):
                child.qemu_pid = pid
                if pid in self.exits:
                    del self.exits[pid]  # already gone and reaped
                else:
                    self.qemu_pids.add(pid)
        elif event == "result":
            child.result = message
        if child.name:
            self.listener(child.name, str(event), message)

    # --- the run --------------------------------------------------------------------------

    def _run(self, the_host: host.Host) -> RunResult:
        stack = self.stack
        accel = the_host.accel.name
        vm_paths = {vm.name: self.paths.vm(vm.name) for vm in stack.vms}
        results = {vm.name: VMResult(vm.name, console=str(vm_paths[vm.name].console_log))
                   for vm in stack.vms}
        for vm in stack.vms:
            self.prepare_vm(vm, vm_paths[vm.name])
        probe_root = short_root_base() / f"probe-{os.getpid()}"
        probe_paths = VMPaths(dir=self.paths.dir, root_link=probe_root, root=probe_root,
                              console_log=self.paths.dir / "probe-console.log",
                              driver_log=self.paths.dir / "probe.log")
        cache = self.ensure_caps(the_host, probe_paths)
        for vm in stack.vms:
            caps = vm_paths[vm.name].caps_dir
            caps.mkdir(parents=True, exist_ok=True)
            for cached in cache.glob("*.xml"):
                shutil.copy2(cached, caps / cached.name)

        drivers: dict[str, Child] = {}
        if self.signal is None:
            for vm in stack.vms:
                paths = vm_paths[vm.name]
                xml = domain.to_string(domain.build(vm, accel, paths.console_socket))
                spec = {
                    "name": vm.name, "root": str(paths.root), "xml": xml,
                    "console_socket": str(paths.console_socket),
                    "console_log": str(paths.console_log),
                    "success": vm.success, "failure": vm.failure, "timeout": vm.timeout,
                    "stop_timeout": stack.stop_timeout,
                }
                drivers[vm.name] = self.spawn(vm.name, spec, paths)
                self.listener(vm.name, "spawned", {"pid": drivers[vm.name].pid})
        else:
            for result in results.values():
                result.outcome, result.reason = "stopped", "stopped before it started"

        while not all(c.done for c in drivers.values()):
            self.wait_events(0.5)
            for child in drivers.values():
                if child.done and child.result is None and child.name not in self.orphaned:
                    self.orphaned.add(child.name)
                    self.kill_qemu(child)
            if self.signal_time is not None and \
                    time.monotonic() - self.signal_time > stack.stop_timeout + TEARDOWN_GRACE:
                for child in drivers.values():
                    if not child.done:
                        self.kill_qemu(child)
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(child.pid, signal.SIGKILL)

        for name, child in drivers.items():
            result = results[name]
            if child.result is not None:
                result.outcome = str(child.result.get("outcome", "failed"))
                result.reason = str(child.result.get("reason", ""))
                result.started = child.result.get("started")
                result.stopped = child.result.get("stopped")
            else:
                result.outcome = "failed"
                result.reason = f"driver died ({_describe_status(child.status)})"
                result.started = child.running_at
                result.stopped = child.ended_at or time.time()
            self.kill_qemu(child)  # it should be gone: make sure
            _fastsig.unregister_group(child.pid)

        # Let the last QEMU zombies be reaped before leaving.
        deadline = time.monotonic() + 5
        while self.qemu_pids and time.monotonic() < deadline:
            self.qemu_pids = {p for p in self.qemu_pids if _alive(p)}
            if self.qemu_pids:
                self.wait_events(0.05)

        if self.signal is not None:
            code = 128 + self.signal
        elif all(r.outcome == "ok" for r in results.values()):
            code = EXIT_OK
        else:
            code = EXIT_FAILED
        run = RunResult(stack=stack.name, exit=code, vms=results, signal=self.signal,
                        accel=accel)
        tmp = self.paths.last_run.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(run.to_json(), indent=2) + "\n")
        tmp.replace(self.paths.last_run)
        return run

    def kill_qemu(self, child: Child) -> None:
        """Kill the QEMU of a driver that is gone (checked to be that VM's QEMU)."""
        candidates = {child.qemu_pid, _read_pid(child.paths.pidfile(child.name))}
        for pid in candidates:
            if pid and _is_qemu_of(pid, child.paths.root):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.qemu_pids.add(pid)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _is_qemu_of(pid: int, root: Path) -> bool:
    """True while `pid` is a live QEMU started for the embedded root `root`."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"qemu" in cmdline and os.fsencode(str(root)) in cmdline and _alive(pid)


def _describe_status(status: int | None) -> str:
    if status is None:
        return "unknown status"
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(signum).name}"
        except ValueError:
            return f"killed by signal {signum}"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"wait status {status}"

