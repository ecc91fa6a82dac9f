"""The supervisor: starts one driver per VM, reaps everything, decides the exit status.

Why it is built this way:

* It is a child subreaper.  libvirt daemonizes QEMU, so each QEMU re-parents here and
  must be reaped at once: libvirt polls for the QEMU pid to vanish after a poweroff, and
  a zombie still counts as alive.  Exactly one place reaps (vmrun.children), fed by the
  SIGCHLD handler of `vmrun._fastsig`; children are started by vmrun.spawn, never by
  subprocess.Popen, whose wait() would race it.
* Ctrl-C, SIGTERM and SIGHUP are forwarded to every driver process by the C handler
  itself, even while Python is busy.  Drivers turn them into an ACPI shutdown and a
  destroy after stop_timeout; the supervisor only notes the signal for its exit status.
* It is single-threaded (its signal handling relies on that) and never imports libvirt.
  Everything happens in one selector loop: the wake-up pipe of the C handlers, the
  drivers' event pipes and the control socket (vmrun.control).
* The decisions live elsewhere, in pure code: when a VM may start and start again
  (vmrun.scheduler: `depends_on`, `restart`), what ends a VM and how (vmrun.watch, in
  each driver).  This module wires them up.
* When a driver dies without a result, its QEMU is killed here (it is our child by then).
* A VM restarted by its `restart` policy gets a new driver on the same root and XML once
  the old one is gone (its disks are kept); the listener hears `Restarting` in place of
  that run's Result, and one Result per VM: the final one.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmrun import (
    _fastsig,
    access,
    cgroups,
    control,
    disks,
    firmware,
    host,
    lock,
    nat,
    netns,
    procs,
    readiness,
    roots,
    shares,
)
from vmrun import protocol as p
from vmrun.children import Child, Children, describe_status
from vmrun.errors import EXIT_FAILED, EXIT_OK, HostError
from vmrun.headstart import HeadStart, titles
from vmrun.layout import VMPaths, remove
from vmrun.manifest import VM, Stack
from vmrun.pidns import PidNamespace
from vmrun.results import RunResult, VMResult, addresses_of, iso_time
from vmrun.scheduler import NeverStarted, Restart, Scheduler
from vmrun.spawn import FORWARDED

# After a stop signal, drivers get stop_timeout plus this long before they are killed.
TEARDOWN_GRACE = 10.0
TICK = 0.5  # seconds between ticks of the loop (the live view's clock)

# listener(vm, event, state): vm is "" for the stack; state is the VM's after the event.
Listener = Callable[[str, p.Note, p.VMState | None], None]


class Supervisor:
    """Runs one stack to its end."""

    def __init__(self, stack: Stack, listener: Listener | None = None,
                 fresh: bool = False, the_host: host.Host | None = None,
                 head_start: HeadStart | None = None) -> None:
        self.stack = stack
        self.the_host = the_host  # checked already (`up --detach` checks before forking)
        self.head_start = head_start  # the namespace and zygote `vmrun up` started early
        self.fresh = fresh
        self.paths = stack.paths
        self.listener: Listener = listener or (lambda vm, event, state: None)
        self.children = Children()  # given the lock in run()
        self.drivers: dict[str, Child] = {}  # by VM name
        self.scheduler = Scheduler({vm.name: vm.depends_on for vm in stack.vms},
                                   {vm.name: Restart(vm.restart, vm.restart_max)
                                    for vm in stack.vms})
        self.held: dict[str, p.Result] = {}  # results not told yet: a restart was to follow
        self.selector = selectors.DefaultSelector()
        self.signal: int | None = None
        self.down_requested = False
        self.teardown_deadline: float | None = None
        self.started_at = time.time()
        self.accel = ""
        self.uefi: dict[str, firmware.Uefi] = {}  # VM name -> its firmware (boot = "uefi")
        self.passts: dict[str, int] = {}  # VM name -> pid of the passt of its NAT NIC
        self.netns_path: Path | None = None
        self.console_watch = access.ConsoleWatch(stack)
        self.virtiofsd: Path | None = None
        self.ready_probes: dict[str, p.ReadyProbe | None] = {}  # VM name -> its probe
        self.results = {vm.name: VMResult(vm.name, addresses=addresses_of(vm),
                                          console=str(self.paths.vm(vm.name).console_log),
                                          forwards=[str(f) for f in vm.forward])
                        for vm in stack.vms}

    # --- set-up and teardown --------------------------------------------------------------

    def run(self) -> RunResult:
        try:
            return self._run()
        finally:
            if self.head_start is not None:
                self.head_start.close()  # not adopted (an error came first): ended here

    def _run(self) -> RunResult:
        the_host = self.the_host or host.check(self.stack.accel)
        self.accel = the_host.accel.name
        netns.require_root(self.stack)
        # what each driver checks for `ready = { port | ssh }`; refused before anything starts
        self.ready_probes = {vm.name: readiness.probe_of(self.stack, vm)
                             for vm in self.stack.vms}
        self.uefi = {vm.name: firmware.find(vm.secure_boot)
                     for vm in self.stack.vms if vm.boot == "uefi"}
        nat.require(any(vm.nat for vm in self.stack.vms))
        self.virtiofsd = shares.require(self.stack)  # when a VM has shared folders
        for vm in self.stack.vms:
            disks.check_space(vm, self.paths.vm(vm.name), self.fresh)
        lock_fd = lock.take(self.paths, self.stack.name, str(self.stack.path))
        self.children.lock_fd = lock_fd
        listeners: list[Any] = []
        server: control.ControlServer | None = None
        try:
            # Whatever a crashed run of this stack left goes first (we hold the lock)...
            names = [vm.name for vm in self.stack.vms]
            procs.clean_runtime(self.paths, names,
                                spare=self.head_start.pids() if self.head_start else ())
            cgroups.remove(self.paths.vm(vm.name).root for vm in self.stack.vms)
            # ... then the zygote, so that its imports run while the rest is prepared (and
            # while this process imports what it needs only from here on: seed, domain);
            # `vmrun up` started it already, before importing this module.
            if self.head_start is not None:
                self.children.adopt(*self.head_start.taken(), self.paths.dir,
                                    self.head_start.titles, self.paths.zygote_log)
            else:
                self.children.pidns = PidNamespace.create()
                self.children.start_zygote(self.paths.dir, titles(self.paths, names),
                                           self.paths.zygote_log)
            listeners = netns.bind_forwards(self.stack)
            try:
                attachments = self.prepare()
            except OSError as exc:  # a full disk, most likely
                raise HostError(f"cannot prepare the stack's state in {self.paths.dir}: "
                                f"{exc.strerror or exc}",
                                hint="free some space (or fix the permissions)") from None
            server = control.ControlServer(self.paths, self.selector, self.control_request)
            wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.selector.register(wake_r, selectors.EVENT_READ,
                                   lambda mask: self.on_wake(wake_r))
            _fastsig.set_child_subreaper()
            _fastsig.install(wake_w, FORWARDED)
            try:
                return self.supervise(the_host, attachments, listeners)
            finally:
                _fastsig.uninstall()
                self.selector.unregister(wake_r)
                os.close(wake_w)
                os.close(wake_r)
        finally:
            self.children.end_zygote()
            self.end_namespace()
            if server is not None:
                server.close()  # `vmrun down` clients return when they see this EOF
            for sock in listeners:
                sock.close()
            netns.teardown(self.stack.state_dir)
            cgroups.remove(self.paths.vm(vm.name).root for vm in self.stack.vms)
            os.close(lock_fd)

    def end_namespace(self) -> None:
        """Whatever is still in the stack's PID namespace dies with its init."""
        pidns, self.children.pidns = self.children.pidns, None
        if pidns is not None:
            pidns.close()
            # The init ends once every process of the namespace is gone *and reaped*: the
            # ones born there are our children, and one not reaped yet (a driver still
            # running when an error cut the run short) would keep it waiting for us, and
            # us for it.  The reaper is uninstalled by now: reap here, the init last.
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, 0)[0] != pidns.init_pid:
                    pass

    def prepare(self) -> dict[str, list[disks.Attachment]]:
        """What must exist before the reaper is installed (this may run subprocesses).

        Each VM's root, disk overlays, blank disks and seed are made as needed.
        """
        from vmrun import seed  # imported here, after the zygote started (see run)

        roots.collect_garbage()
        self.netns_path = netns.setup(self.stack)
        ssh = access.Preparation(self.stack)  # the stack's SSH key, made on the first run
        attachments = {}
        for vm in self.stack.vms:
            paths = self.paths.vm(vm.name)
            disks.remove_unused(vm, paths)
            attachments[vm.name] = disks.prepare(vm, paths, self.fresh, self.uefi.get(vm.name))
            if vm.cloud_init is not None:
                seed.write(paths.seed, seed.contents(self.stack, vm, ssh.public_key))
            roots.prepare(paths)
        ssh.finish()  # host keys of VMs whose disks were made anew are forgotten
        return attachments

    def probe(self, the_host: host.Host, paths: VMPaths, checking: bool) -> bool:
        """Run the capabilities probe driver on `paths` (see roots.ensure_caps)."""
        if not checking:  # a probe of QEMU, not the check of an edited cache: it takes ~1 s
            self.listener("", p.Probing(), None)
        spec = p.ProbeSpec(root=str(paths.root), emulator=the_host.qemu,
                           virttype="kvm" if the_host.accel.name == "kvm" else "qemu",
                           supervisor_pid=self.children.parent_pid,
                           own_proc=self.children.pidns is not None)
        child = self.children.spawn_driver("", "probe", spec.to_json(), paths,
                                           self.paths.probe_log, proceed=self.may_start)
        if child is None:
            return False
        self.watch_child(child)
        while not child.done and self.signal is None:
            self.wait(None)
        return child.probed and self.signal is None

    # --- the loop ---------------------------------------------------------------------------

    def wait(self, timeout: float | None) -> None:
        """Wait for a signal, a child exit, driver events or a control request."""
        for key, mask in self.selector.select(timeout):
            key.data(mask)

    def on_wake(self, wake_r: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(wake_r, 4096):
                pass
        self.children.reap()
        self.take_signals()

    def take_signals(self) -> None:
        for signum in _fastsig.take_signals():
            if self.signal is None:
                self.signal = signum
                self.begin_teardown(self.stack.stop_timeout)
                self.listener("", p.SignalReceived(signal=signum), None)

    def may_start(self) -> bool:
        """Asked with the stop signals held, just before a driver is spawned: a signal
        that came since the last look was forwarded to the drivers already running, not
        to this one, so after it nothing new starts."""
        self.take_signals()
        return self.signal is None and not self.down_requested

    def watch_child(self, child: Child) -> None:
        def readable(mask: int) -> None:
            for event in child.read():
                self.on_event(child, event)
            if child.eof:
                self.selector.unregister(child.fd)
                os.close(child.fd)

        self.selector.register(child.fd, selectors.EVENT_READ, readable)

    def begin_teardown(self, timeout: float) -> None:
        if self.teardown_deadline is None:
            self.teardown_deadline = time.monotonic() + timeout + TEARDOWN_GRACE

    def on_event(self, child: Child, event: p.DriverEvent) -> None:
        child.state = p.next_state(child.state, event)
        if isinstance(event, p.Console):
            self.console_watch.line(child.name, event.line)  # host keys for vmrun ssh
        elif isinstance(event, p.Running):
            child.running_at = time.time()
            pid = event.pid
            pidns = self.children.pidns
            if pid is not None and pidns is not None:
                # the driver's pid is the namespace's: find QEMU as we see it
                pid = pidns.adopted(pid) or next(iter(procs.qemus_of(child.paths.root)), None)
            if pid is not None:
                child.qemu_pid = pid
                self.children.qemu_started(pid)
        elif isinstance(event, p.Ready):
            self.scheduler.on_ready(child.name)
        elif isinstance(event, p.Rebooted):
            child.reboots += 1
        elif isinstance(event, p.Result):
            child.result = event
            if child.name and not self.scheduler.on_outcome(child.name, event.outcome):
                self.held[child.name] = event  # told if no restart comes after all
                self.listener(child.name, self.restarting(child.name, event),
                              p.VMState.RESTARTING)
                return
        elif isinstance(event, p.Probed):
            child.probed = True
        if child.name:
            self.listener(child.name, event, child.state)

    def restarting(self, name: str, result: p.Result) -> p.Restarting:
        return p.Restarting(outcome=result.outcome, reason=result.reason,
                            restart=self.scheduler.restarts[name] + 1,
                            restart_max=self.stack.vm(name).restart_max)

    def release_held(self) -> None:
        """Tell the results held for a restart that will not come (a stop came first)."""
        for name in [n for n in self.held if n in self.scheduler.final]:
            self.listener(name, self.held.pop(name), p.VMState.STOPPED)

    def supervise(self, the_host: host.Host,
                  attachments: dict[str, list[disks.Attachment]],
                  listeners: list[Any]) -> RunResult:
        cache = roots.ensure_caps(the_host, self.paths.probe_root(),
                                  lambda paths, checking: self.probe(the_host, paths, checking))
        for vm in self.stack.vms:
            if cache is not None:
                roots.install_caps(cache, self.paths.vm(vm.name))
        from vmrun import domain  # (lxml) imported here, after the zygote started (see run)

        xml = {vm.name: domain.to_string(domain.build(
            vm, self.accel, self.paths.vm(vm.name).console_socket, attachments[vm.name],
            uefi=self.uefi.get(vm.name), nvram=self.paths.vm(vm.name).nvram,
            nat_link=nat.Link(self.paths.vm(vm.name).nat_socket,
                              nat.mac(self.stack.name, vm.name)) if vm.nat else None,
            mounts=shares.plan(vm, self.paths.vm(vm.name)),
            virtiofsd=self.virtiofsd or shares.VIRTIOFSD))
            for vm in self.stack.vms}
        # Until this run ends, last-run.json says it has not.
        RunResult(self.stack.name, None, self.results, accel=self.accel).write(
            self.paths.last_run)
        forwarder = self.start_forwarder(listeners)
        self.start_due(xml)
        while not self.scheduler.idle or not all(self.settled(c) for c in self.drivers.values()):
            self.wait(TICK)
            self.listener("", p.Tick(), None)
            self.check_drivers()
            self.start_due(xml)
        self.end_drivers()
        for child in self.drivers.values():
            self.children.kill_qemu(child)  # it should be gone: make sure
            self.children.forget(child)
        for name in list(self.passts):
            self.stop_passt(name)
        self.stop_helper(forwarder)
        deadline = time.monotonic() + 5  # let the last QEMU zombies be reaped
        while not self.children.settle_qemus() and time.monotonic() < deadline:
            self.wait(0.05)
        return self.finish()

    def settled(self, child: Child) -> bool:
        """The driver has ended, or has sent the final outcome of its VM (a driver sends
        it as soon as its guest has powered off and QEMU closed the console, while libvirt
        still tears QEMU down: nothing of that changes the outcome)."""
        return child.done or (child.result is not None and child.name in self.scheduler.final)

    def end_drivers(self) -> None:
        """Drivers still in libvirt's teardown of a QEMU that is ending go now (what they
        leave in their roots, the next run clears); each is reaped."""
        pending = [child for child in self.drivers.values() if not child.done]
        for child in pending:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while not all(child.done for child in pending) and time.monotonic() < deadline:
            self.wait(0.01)

    def check_drivers(self) -> None:
        for child in self.drivers.values():
            if child.done and not child.recorded:
                if child.result is None:
                    self.children.kill_qemu(child)
                self.stop_passt(child.name)
                self.record(child)
                if self.scheduler.on_ended(child.name):
                    self.held.pop(child.name, None)
                    if child.result is None:  # the listener has heard nothing of this run
                        died = p.Result(outcome=p.Outcome.FAILED,
                                        reason=self.results[child.name].reason or "")
                        self.listener(child.name, self.restarting(child.name, died),
                                      p.VMState.RESTARTING)
        self.release_held()
        if self.teardown_deadline is not None and time.monotonic() > self.teardown_deadline:
            for child in self.drivers.values():
                if not child.done:
                    self.children.kill_qemu(child)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGKILL)

    def start_due(self, xml: dict[str, str]) -> None:
        """Start every VM whose dependencies are met, and again those that `restart` says
        so; end those that never will start."""
        if self.signal is not None or self.down_requested:
            self.never_started(self.scheduler.cancel(), notify=False)
        start, never = self.scheduler.due()
        self.never_started(never, notify=True)
        for name in start:
            self.start_vm(self.stack.vm(name), xml[name])
        self.release_held()

    def never_started(self, entries: list[NeverStarted], notify: bool) -> None:
        for entry in entries:
            result = self.results[entry.name]
            result.outcome, result.reason = entry.outcome, entry.reason
            if notify:
                self.listener(entry.name, p.Result(outcome=entry.outcome, reason=entry.reason),
                              p.VMState.STOPPED)

    def start_vm(self, vm: VM, xml: str) -> None:
        paths = self.paths.vm(vm.name)
        previous = self.drivers.get(vm.name)  # a restart: that driver is gone
        if previous is not None and previous.result is None:
            # It died without stopping its guest: the QEMU we killed must be gone, and
            # libvirt's runtime state of it too, or the new driver cannot start the domain.
            procs.kill_and_wait(procs.qemus_of(paths.root))
            remove(paths.run_dir)
            remove(paths.console_socket)
        spec = p.DriverSpec(
            name=vm.name, root=str(paths.root), xml=xml, pidfile=str(paths.pidfile),
            console_socket=str(paths.console_socket), attach_socket=str(paths.attach_socket),
            console_log=str(paths.console_log), success=vm.success, failure=vm.failure,
            timeout=vm.timeout, ready=vm.ready.console if vm.ready else None,
            ready_timeout=vm.ready_timeout, ready_probe=self.ready_probes.get(vm.name),
            stop_timeout=self.stack.stop_timeout, supervisor_pid=self.children.parent_pid,
            netns=str(self.netns_path) if vm.networks and self.netns_path else None,
            own_proc=self.children.pidns is not None,
            shares=tuple(p.ShareBind(source=str(m.host), target=str(m.dir), readonly=m.readonly)
                         for m in shares.plan(vm, paths)))
        if vm.nat:
            self.start_passt(vm, paths)
        child = self.children.spawn_driver(vm.name, "run", spec.to_json(), paths,
                                           paths.driver_log, proceed=self.may_start)
        if child is None:
            if previous is not None:  # the outcome of its last run stands
                self.scheduler.restart_refused(vm.name)
                self.never_started(self.scheduler.cancel(), notify=False)
                return
            self.never_started(self.scheduler.cancel() + [NeverStarted(
                vm.name, p.Outcome.STOPPED, "stopped before it started")], notify=False)
            return
        if previous is not None:
            self.children.forget(previous)
        self.drivers[vm.name] = child
        self.watch_child(child)
        self.listener(vm.name, p.Spawned(pid=child.pid), child.state)

    def start_forwarder(self, listeners: list[Any]) -> int | None:
        """Start the port forwarder with the listening sockets bound in `run`."""
        if not listeners or self.netns_path is None:
            return None
        targets = [(vm, fwd) for vm in self.stack.vms for fwd in vm.forward]
        fds, forwards = {}, []
        for number, (sock, (vm, fwd)) in enumerate(zip(listeners, targets, strict=True)):
            fds[3 + number] = sock.fileno()
            assert vm.address is not None  # a forward needs a network (the manifest says)
            forwards.append(p.ForwardTarget(fd=3 + number, ip=vm.address, port=fwd.guest_port))
        spec = p.ForwarderSpec(netns=str(self.netns_path), forwards=tuple(forwards),
                               supervisor_pid=self.children.parent_pid)
        self.paths.forward_log.write_bytes(b"")
        return self.children.spawn_other(["vmrun.proc.forward", spec.to_json()], fds,
                                         self.paths.forward_log)

    def start_passt(self, vm: VM, paths: VMPaths) -> None:
        """Start the passt of `vm`'s NAT NIC (vmrun/nat.py) and wait until its socket is
        there, for QEMU connects to it as it starts."""
        self.stop_passt(vm.name)  # a restart's previous one
        nat.prepare_socket_dir(paths.nat_socket.parent)
        paths.nat_log.write_bytes(b"")
        pid = self.children.spawn_other(nat.passt_argv(paths.nat_socket, vm.nat != "no-host"),
                                        {}, paths.nat_log, python=False)
        self.passts[vm.name] = pid
        if not nat.wait_for_socket(paths.nat_socket, lambda: pid in self.children.exits,
                                   self.wait):
            raise HostError(f"VM {vm.name}: passt did not start (see {paths.nat_log})")

    def stop_passt(self, name: str) -> None:
        if name in self.passts:
            self.stop_helper(self.passts.pop(name))
            nat.remove_socket_dir(self.paths.vm(name).nat_socket.parent)

    def stop_helper(self, pid: int | None) -> None:
        """Kill a helper (the forwarder, a passt) and wait until it is reaped."""
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pid not in self.children.exits and time.monotonic() < deadline:
            self.wait(0.05)
        self.children.exits.pop(pid, None)

    def record(self, child: Child) -> None:
        """Fold the run of a driver that has ended into its VM's result: the outcome and
        reason are the last run's, `started` the first run's."""
        child.recorded = True
        result = self.results[child.name]
        if child.result is not None:
            result.outcome, result.reason = child.result.outcome, child.result.reason
            started, result.stopped = child.result.started, child.result.stopped
            result.warnings += [w for w in child.result.warnings if w not in result.warnings]
        else:
            result.outcome = p.Outcome.FAILED
            result.reason = f"driver died ({describe_status(child.status)})"
            started, result.stopped = child.running_at, child.ended_at or time.time()
        if result.started is None:
            result.started = started
        result.reboots += child.reboots
        result.restarts = self.scheduler.restarts[child.name]

    def finish(self) -> RunResult:
        for child in self.drivers.values():
            if not child.recorded:
                self.record(child)
        for name, result in self.results.items():
            result.restarts = self.scheduler.restarts[name]
        if self.signal is not None:
            code = 128 + self.signal
        elif all(r.outcome is p.Outcome.OK or
                 (r.outcome is p.Outcome.STOPPED and self.down_requested)
                 for r in self.results.values()):
            code = EXIT_OK
        else:
            code = EXIT_FAILED
        run = RunResult(self.stack.name, code, self.results, signal=self.signal,
                        accel=self.accel)
        run.write(self.paths.last_run)
        return run

    # --- the control socket ---------------------------------------------------------------

    def control_request(self, data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        try:
            request = p.decode_request(data)
        except p.ProtocolError as exc:
            return p.ErrorReply(ok=False, error=str(exc)).to_dict(), False
        if isinstance(request, p.PsRequest):
            return self.status().to_dict(), False
        timeout = self.stack.stop_timeout if request.timeout is None else request.timeout
        self.down(timeout)
        return p.DownAccepted(ok=True, pid=os.getpid(), timeout=timeout).to_dict(), True

    def down(self, timeout: float) -> None:
        """Stop every VM on request (`vmrun down`): ACPI, destroy after `timeout`."""
        if not self.down_requested:
            self.listener("", p.DownRequested(timeout=timeout), None)
        self.down_requested = True
        self.begin_teardown(timeout)
        for child in self.drivers.values():
            if not child.done:
                child.command(p.Stop(timeout=timeout, reason="stopped by vmrun down"))

    def status(self) -> p.StackStatus:
        now = time.time()
        vms = {}
        for vm in self.stack.vms:
            child = self.drivers.get(vm.name)
            result = self.results[vm.name]
            outcome, reason = result.outcome, result.reason  # a VM that never started
            state = p.VMState.WAITING if vm.name in self.scheduler.pending else \
                p.VMState.STOPPED if outcome is not None else p.VMState.STARTING
            started = uptime = None
            reboots = result.reboots
            if child is not None:
                state = p.VMState.RESTARTING if vm.name in self.held or \
                    vm.name in self.scheduler.restarting else child.state
                reboots += 0 if child.recorded else child.reboots
                if child.running_at is not None:
                    started = iso_time(child.running_at)
                    end = child.ended_at if child.state is p.VMState.STOPPED else None
                    uptime = round((end or now) - child.running_at, 1)
                if child.result is not None:
                    outcome, reason = child.result.outcome, child.result.reason
            vms[vm.name] = p.VMStatus(
                state=state, outcome=outcome, reason=reason, started=started,
                uptime=uptime, qemu_pid=child.qemu_pid if child else None, accel=self.accel,
                addresses=addresses_of(vm), forwards=tuple(str(f) for f in vm.forward),
                restarts=self.scheduler.restarts[vm.name], reboots=reboots)
        return p.StackStatus(stack=self.stack.name, pid=os.getpid(), accel=self.accel,
                             started=iso_time(self.started_at), manifest=str(self.stack.path),
                             stopping=self.signal is not None or self.down_requested, vms=vms)
