"""The supervisor: starts one driver per VM, reaps everything, decides the outcome.

Why it is built this way:

* It is a child subreaper.  libvirt daemonizes QEMU, so each QEMU re-parents here and
  must be reaped at once: libvirt polls for the QEMU pid to vanish after a poweroff, and
  a zombie still counts as alive.  Exactly one place reaps: the SIGCHLD handler of
  `vmrun._fastsig` (waitpid(-1, WNOHANG) in C).  So drivers are started with
  os.posix_spawn, never subprocess.Popen, whose wait() would race that loop.
* Drivers run in process groups of their own (the terminal's Ctrl-C reaches only us).
  Ctrl-C, SIGTERM and SIGHUP are forwarded to every driver process by the C handler
  itself, even while Python is busy, but not to the rest of a driver's group: libvirt's
  forks there (before QEMU's setsid) must not die of it.  Drivers start with these
  signals blocked until their handlers are in, then turn them into an ACPI shutdown and
  a destroy after stop_timeout.  The supervisor only notes the signal for its exit status.
* It never imports libvirt.  Everything happens in one select() loop over the drivers'
  status pipes and the wake-up pipe the C handlers write to.
* When a driver dies without a result, its QEMU is killed here (it is our child by then).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrun import _fastsig, control, disks, domain, host, netns, procs, roots, seed
from vmrun.errors import EXIT_FAILED, EXIT_OK, HostError
from vmrun.forward import bind_forwards
from vmrun.layout import StackPaths, VMPaths, short_root_base
from vmrun.manifest import VM, Stack
from vmrun.results import RunResult, VMResult, addresses_of, iso_time

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# After a stop signal, drivers get stop_timeout plus this long before they are killed.
TEARDOWN_GRACE = 10.0



@dataclass
class Child:
    """A driver process (for a VM, or the one-off capabilities probe)."""

    name: str
    pid: int
    fd: int  # read end of its status pipe
    command_fd: int  # write end of its command pipe (its stdin)
    paths: VMPaths
    buffer: bytes = b""
    eof: bool = False
    status: int | None = None  # raw wait status once reaped
    qemu_pid: int | None = None
    running_at: float | None = None
    ended_at: float | None = None
    result: dict[str, Any] | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)

    state: str = "starting"
    ready_at: float | None = None

    @property
    def done(self) -> bool:
        return self.eof and self.status is not None

    def command(self, **message: Any) -> None:
        """Send a command to the driver; a driver that is gone cannot take it."""
        if self.command_fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self.command_fd, (json.dumps(message) + "\n").encode())

    def close_commands(self) -> None:
        if self.command_fd >= 0:
            os.close(self.command_fd)
            self.command_fd = -1


Listener = Callable[[str, str, dict[str, Any]], None]


class Supervisor:
    """Runs one stack to its end.  `listener(vm, event, data)` hears about progress."""

    def __init__(self, stack: Stack, listener: Listener | None = None,
                 fresh: bool = False) -> None:
        self.stack = stack
        self.fresh = fresh
        self.paths = StackPaths(stack.state_dir)
        self.listener = listener or (lambda vm, event, data: None)
        self.children: dict[int, Child] = {}  # by pid
        self.exits: dict[int, int] = {}  # pid -> raw status, for pids not (yet) known
        self.qemu_pids: set[int] = set()
        self.signal: int | None = None
        self.wake_r = -1
        self.lock_fd = -1
        self.orphaned: set[str] = set()  # VMs whose driver died and whose QEMU was killed
        self.drivers: dict[str, Child] = {}  # by VM name
        self.control: socket.socket | None = None
        self.clients: dict[int, tuple[socket.socket, bytes]] = {}
        self.waiters: list[socket.socket] = []  # `vmrun down` clients waiting for our exit
        self.down_requested = False
        self.teardown_deadline: float | None = None
        self.started_at = time.time()
        self.accel = ""
        self.pending: list[VM] = []
        self.attachments: dict[str, list[disks.Attachment]] = {}
        self.listeners: list[socket.socket] = []  # forwarded host ports, bound early
        self.netns_path: Path | None = None
        self.forwarder: int | None = None  # pid
        self.never_started: set[str] = set()

    # --- set-up ---------------------------------------------------------------------------

    def run(self) -> RunResult:
        the_host = host.check(self.stack.accel)
        self.accel = the_host.accel.name
        netns.require_root(self.stack)
        for vm in self.stack.vms:
            disks.check_space(vm, self.paths.vm(vm.name), self.fresh)
        self.take_lock()
        try:
            self.listeners = bind_forwards(self.stack)
            self.prepare_resources()
            self.control = control.listen(self.paths)
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
            self.close_control()
            for sock in self.listeners:
                sock.close()
            netns.teardown(self.stack.state_dir)
            os.close(self.lock_fd)

    def close_control(self) -> None:
        if self.control is not None:
            control.remove_stale_socket(self.paths)
            self.control.close()
            self.control = None
        for conn, _ in self.clients.values():
            conn.close()
        for conn in self.waiters:  # `vmrun down` returns when it sees this EOF
            conn.close()
        self.clients.clear()
        self.waiters.clear()

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

    def prepare_resources(self) -> None:
        """What must exist before the reaper is installed (this may run subprocesses).

        Whatever a crashed run of this stack left goes first (we hold the lock), then each
        VM's disk overlays and blank disks are created as needed.
        """
        names = [vm.name for vm in self.stack.vms]
        procs.clean_runtime(self.paths, names)
        roots.collect_garbage()
        self.netns_path = netns.setup(self.stack)
        for vm in self.stack.vms:
            paths = self.paths.vm(vm.name)
            disks.remove_unused(vm, paths)
            self.attachments[vm.name] = disks.prepare(vm, paths, self.fresh)
            if vm.cloud_init is not None:
                seed.write(seed.seed_file(paths), seed.contents(self.stack, vm))

    # --- the capabilities cache -----------------------------------------------------------

    def ensure_caps(self, the_host: host.Host, probe_paths: VMPaths) -> Path:
        """Probe QEMU's capabilities once per host and QEMU build; later roots copy them."""
        cache = roots.caps_cache_dir(the_host)
        if any(cache.glob("*.xml")):
            return cache
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache.parent / f"{cache.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another stack may be probing right now
            if any(cache.glob("*.xml")):
                return cache
            self.listener("", "probing", {})
            shutil.rmtree(probe_paths.root, ignore_errors=True)
            roots.write_qemu_conf(probe_paths)
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
        cmd_r, cmd_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in os.pipe2(os.O_CLOEXEC))
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
        # A stop signal between the spawn and the registration would reach the other
        # drivers but not this one: hold such signals until it is registered.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-m", "vmrun.driver", json.dumps(spec)],
                env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, cmd_r, 0),
                    (os.POSIX_SPAWN_OPEN, 1, str(paths.driver_log),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                    (os.POSIX_SPAWN_DUP2, w2, 3),
                ],
                setpgroup=0,
                # Blocked until the driver's handlers are in: a forwarded Ctrl-C that
                # comes earlier stays pending instead of killing it.
                setsigmask=FORWARDED,
            )
            _fastsig.register_process(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(w2)
            os.close(cmd_r)
        child = Child(name=name, pid=pid, fd=r2, paths=paths, command_fd=cmd_w)
        self.children[pid] = child
        if pid in self.exits:  # it exited before we got here
            child.status = self.exits.pop(pid)
        return child

    def wait_events(self, timeout: float | None) -> None:
        """Wait for a signal, a child exit, driver output or a control request."""
        fds = [self.wake_r] + [c.fd for c in self.children.values() if not c.eof]
        if self.control is not None:
            fds += [self.control.fileno(), *self.clients]
        with contextlib.suppress(InterruptedError):
            select.select(fds, [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass
        self.reap()
        for signum in _fastsig.take_signals():
            if self.signal is None:
                self.signal = signum
                self.begin_teardown(self.stack.stop_timeout)
                self.listener("", "signal", {"signal": signum})
        for child in list(self.children.values()):
            if not child.eof:
                self.read_status(child)
        if self.control is not None:
            self.serve_control()

    def begin_teardown(self, timeout: float) -> None:
        if self.teardown_deadline is None:
            self.teardown_deadline = time.monotonic() + timeout + TEARDOWN_GRACE

    # --- the control socket -----------------------------------------------------------

    def serve_control(self) -> None:
        assert self.control is not None
        while True:
            try:
                conn, _ = self.control.accept()
            except (BlockingIOError, InterruptedError):
                break
            conn.setblocking(False)
            self.clients[conn.fileno()] = (conn, b"")
        for fd, (conn, buffer) in list(self.clients.items()):
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                del self.clients[fd]
                conn.close()
                continue
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            self.clients[fd] = (conn, buffer)
            for line in lines:
                try:
                    request = json.loads(line)
                except ValueError:
                    request = {}
                reply, keep = self.control_request(request)
                with contextlib.suppress(OSError):
                    conn.setblocking(True)
                    conn.sendall((json.dumps(reply) + "\n").encode())
                    conn.setblocking(False)
                if keep:  # the client waits for EOF: it comes when this process exits
                    del self.clients[fd]
                    self.waiters.append(conn)
                    break

    def control_request(self, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        command = request.get("cmd")
        if command == "ps":
            return self.snapshot(), False
        if command == "down":
            timeout = request.get("timeout")
            if not isinstance(timeout, int | float) or timeout < 0:
                timeout = self.stack.stop_timeout
            self.down(float(timeout))
            return {"ok": True, "pid": os.getpid()}, True
        return {"ok": False, "error": f"unknown request {command!r}"}, False

    def down(self, timeout: float) -> None:
        """Stop every VM on request (`vmrun down`): ACPI, destroy after `timeout`."""
        if not self.down_requested:
            self.listener("", "down", {"timeout": timeout})
        self.down_requested = True
        self.begin_teardown(timeout)
        for child in self.children.values():
            if child.name and not child.done:
                child.command(cmd="stop", timeout=timeout, reason="stopped by vmrun down")

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        vms: dict[str, Any] = {}
        for vm in self.stack.vms:
            child = self.drivers.get(vm.name)
            entry: dict[str, Any] = {"state": "starting", "outcome": None, "reason": None,
                                     "started": None, "uptime": None, "qemu_pid": None,
                                     "accel": self.accel, "addresses": addresses_of(vm),
                                     "forwards": [str(f) for f in vm.forward]}
            if vm.name in self.never_started:
                entry["state"] = "stopped"
            elif child is None and vm in self.pending:
                entry["state"] = "waiting"
            if child is not None:
                entry["state"] = child.state
                entry["qemu_pid"] = child.qemu_pid
                if child.running_at is not None:
                    entry["started"] = iso_time(child.running_at)
                    end = child.ended_at if child.state == "stopped" else None
                    entry["uptime"] = round((end or now) - child.running_at, 1)
                if child.result is not None:
                    entry["outcome"] = child.result.get("outcome")
                    entry["reason"] = child.result.get("reason")
            vms[vm.name] = entry
        return {"stack": self.stack.name, "pid": os.getpid(), "accel": self.accel,
                "started": iso_time(self.started_at), "manifest": str(self.stack.path),
                "stopping": self.signal is not None or self.down_requested, "vms": vms}

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
        if event in ("running", "ready", "stopping"):
            child.state = str(event)
        if event == "result":
            child.state = "stopped"
        if event == "ready":
            child.ready_at = time.time()
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
        results = {vm.name: VMResult(vm.name, console=str(vm_paths[vm.name].console_log),
                                     addresses=addresses_of(vm),
                                     forwards=[str(f) for f in vm.forward])
                   for vm in stack.vms}
        for vm in stack.vms:
            roots.prepare(vm_paths[vm.name])
        probe_root = short_root_base() / f"probe-{os.getpid()}"
        probe_paths = VMPaths(dir=self.paths.dir, root_link=probe_root, root=probe_root,
                              console_log=self.paths.dir / "probe-console.log",
                              driver_log=self.paths.dir / "probe.log")
        cache = self.ensure_caps(the_host, probe_paths)
        for vm in stack.vms:
            roots.install_caps(cache, vm_paths[vm.name])

        # Until this run ends, last-run.json says it has not: a run that is killed leaves
        # that behind rather than the previous run's outcomes.
        started = RunResult(stack=stack.name, exit=0, vms=results, accel=accel).to_json()
        started["exit"] = None
        for vm in started["vms"].values():
            vm["outcome"] = vm["reason"] = None
        self.write_last_run(started)
        drivers = self.drivers
        self.start_forwarder()
        self.pending = [vm for vm in stack.vms]  # not started yet: waiting for dependencies
        self.start_ready(accel, vm_paths, results)
        while self.pending or not all(c.done for c in drivers.values()):
            self.wait_events(0.5)
            self.listener("", "tick", {})
            self.start_ready(accel, vm_paths, results)
            for child in drivers.values():
                if child.done and child.result is None and child.name not in self.orphaned:
                    self.orphaned.add(child.name)
                    self.kill_qemu(child)
            if self.teardown_deadline is not None and time.monotonic() > self.teardown_deadline:
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
            _fastsig.unregister_process(child.pid)
            child.close_commands()

        self.stop_forwarder()
        # Let the last QEMU zombies be reaped before leaving.
        deadline = time.monotonic() + 5
        while self.qemu_pids and time.monotonic() < deadline:
            self.qemu_pids = {p for p in self.qemu_pids if procs.alive(p)}
            if self.qemu_pids:
                self.wait_events(0.05)

        if self.signal is not None:
            code = 128 + self.signal
        elif all(r.outcome == "ok" or (r.outcome == "stopped" and self.down_requested)
                 for r in results.values()):
            code = EXIT_OK
        else:
            code = EXIT_FAILED
        run = RunResult(stack=stack.name, exit=code, vms=results, signal=self.signal,
                        accel=accel)
        self.write_last_run(run.to_json())
        return run

    def write_last_run(self, data: dict[str, Any]) -> None:
        tmp = self.paths.last_run.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.paths.last_run)

    def start_forwarder(self) -> None:
        """Start the port forwarder with the listening sockets bound in prepare."""
        if not self.listeners or self.netns_path is None:
            return
        targets = [(vm, fwd) for vm in self.stack.vms for fwd in vm.forward]
        forwards, actions = [], []
        for number, (sock, (vm, fwd)) in enumerate(zip(self.listeners, targets, strict=True)):
            fd = 3 + number
            actions.append((os.POSIX_SPAWN_DUP2, sock.fileno(), fd))
            forwards.append({"fd": fd, "ip": str(vm.addresses[0].ip), "port": fwd.guest_port})
        spec = {"netns": str(self.netns_path), "forwards": forwards,
                "supervisor_pid": os.getpid()}
        log = self.paths.dir / "forward.log"
        self.forwarder = os.posix_spawn(
            sys.executable, [sys.executable, "-m", "vmrun.forward", json.dumps(spec)],
            dict(os.environ),
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_OPEN, 1, str(log),
                           os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                          (os.POSIX_SPAWN_DUP2, 1, 2), *actions],
            setpgroup=0)

    def stop_forwarder(self) -> None:
        if self.forwarder is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.forwarder, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.forwarder not in self.exits and time.monotonic() < deadline:
            self.wait_events(0.05)
        self.exits.pop(self.forwarder, None)
        self.forwarder = None

    def dependency_state(self, vm: VM) -> str | None:
        """"met", "waiting", or the reason it can never be met."""
        for target, condition in vm.depends_on:
            child = self.drivers.get(target)
            if child is None:
                if target in self.never_started:
                    return f"dependency {target} failed"
                return "waiting"
            outcome = child.result.get("outcome") if child.result else None
            if condition == "ok":
                if outcome is None and not child.done:
                    return "waiting"
                if outcome != "ok":
                    return f"dependency {target} failed"
            elif child.ready_at is None:
                if outcome is None and not child.done:
                    return "waiting"
                return f"dependency {target} failed"
        return "met"

    def start_ready(self, accel: str, vm_paths: dict[str, VMPaths],
                    results: dict[str, VMResult]) -> None:
        """Start every pending VM whose dependencies are met; fail those that never will."""
        if self.signal is not None or self.down_requested:
            for vm in self.pending:
                results[vm.name].outcome = "stopped"
                results[vm.name].reason = "stopped before it started"
                self.never_started.add(vm.name)
            self.pending = []
            return
        progress = True
        while progress:
            progress = False
            for vm in list(self.pending):
                state = self.dependency_state(vm)
                if state == "waiting":
                    continue
                self.pending.remove(vm)
                progress = True
                if state != "met":
                    results[vm.name].outcome, results[vm.name].reason = "failed", str(state)
                    self.never_started.add(vm.name)
                    self.listener(vm.name, "result", {"outcome": "failed", "reason": state})
                    continue
                self.start_vm(vm, accel, vm_paths[vm.name])

    def start_vm(self, vm: VM, accel: str, paths: VMPaths) -> None:
        xml = domain.to_string(domain.build(vm, accel, paths.console_socket,
                                            self.attachments.get(vm.name, ())))
        spec = {
            "name": vm.name, "root": str(paths.root), "xml": xml,
            "console_socket": str(paths.console_socket),
            "attach_socket": str(paths.attach_socket),
            "console_log": str(paths.console_log),
            "success": vm.success, "failure": vm.failure, "timeout": vm.timeout,
            "ready": vm.ready, "ready_timeout": vm.ready_timeout,
            "stop_timeout": self.stack.stop_timeout,
            "netns": str(self.netns_path) if vm.networks and self.netns_path else None,
        }
        child = self.drivers[vm.name] = self.spawn(vm.name, spec, paths)
        self.listener(vm.name, "spawned", {"pid": child.pid})

    def kill_qemu(self, child: Child) -> None:
        """Kill the QEMU of a driver that is gone (checked to be that VM's QEMU)."""
        candidates = {child.qemu_pid, procs.read_pid(child.paths.pidfile(child.name))}
        for pid in candidates:
            if pid and procs.is_qemu_of(pid, child.paths.root):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.qemu_pids.add(pid)


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

