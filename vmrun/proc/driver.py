"""The driver: one process per VM, owning that VM's embedded libvirt QEMU driver.

Forked by the driver zygote (vmrun/proc/zygote.py), which calls `main()` as
``python -m vmrun.proc.driver run DRIVERSPEC`` or ``... probe PROBESPEC`` would (the specs:
vmrun.protocol); never run by users.  It

* dies with its supervisor: PR_SET_PDEATHSIG delivers SIGUSR1, and the driver then kills
  its QEMU at once (libvirt daemonizes QEMU, so nothing else would) and exits; EOF on its
  command pipe or EPIPE on its event pipe mean the same;
* opens ``qemu:///embed?root=ROOT`` (one root per process: libvirt refuses a second),
  starts the domain paused, attaches to its serial console, then resumes it, so not one
  console byte is lost;
* reports Events (running, ready, console, rebooted, stopping, result) on fd 3 and takes
  Commands (stop, destroy) on stdin;
* carries out what its `Watch` (vmrun.watch: the outcome rules) decides, and turns
  SIGINT/SIGTERM/SIGHUP into a stop request;
* runs inside the stack's network namespace when the VM has networks;
* runs the VM's readiness probe (`ready = { port = … }` or `{ ssh = … }`: a TCP connect or
  a command, vmrun/proc/probes.py) whenever its Watch asks, from this same loop.

Order matters: the namespaces are entered in `main()` before any thread exists (a
thread-ful process cannot setns into a network namespace for all its threads).  libvirt
is already imported when the zygote forks a driver: importing it starts no thread; the
first one is its event loop's, started when the root is opened.  It never reaps with
waitpid(-1): libvirt forks and reaps its own helpers in this process.  All waiting happens
in one select() on a wake-up pipe that the signal handlers (signal.set_wakeup_fd), the
console reader thread and libvirt's event thread write to.  Once its guest runs, it gives
the C heap's free memory back (`_fastsig.trim_heap`).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vmrun import _fastsig, console, procs, shares
from vmrun import protocol as p
from vmrun.proc import affinity, probes
from vmrun.watch import Action, Rules, Stopped, Watch, regex_matcher

libvirt: Any = None  # imported by main(), after setns (see above)

EVENT_FD = 3
COMMAND_FD = 0
SUPERVISOR_DIED = signal.SIGUSR1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Events:
    """The event pipe to the supervisor; a dead supervisor is noted, not fatal."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False
        self.lock = threading.Lock()

    def send(self, event: p.Message) -> None:
        with self.lock:  # the console thread sends too
            if not self.broken and not p.send(self.fd, event):
                self.broken = True  # EPIPE: the supervisor is gone


def open_root(root: str, on_lifecycle: Any, on_reset: Any = None) -> Any:
    """Open the embedded driver on `root`, with libvirt's event loop in a thread."""
    libvirt.virEventRegisterDefaultImpl()

    def run_loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run_loop, name="libvirt-events", daemon=True).start()
    conn = libvirt.open(f"qemu:///embed?root={root}")
    conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                lambda c, d, event, detail, o: on_lifecycle(event, detail),
                                None)
    if on_reset is not None:
        # QEMU reset the guest in place (on_reboot = "restart"): same QEMU, same console
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT,
                                    lambda c, d, o: on_reset(), None)
    return conn


def probe(spec: p.ProbeSpec, events: Events) -> int:
    """Only make libvirt probe QEMU's capabilities into this root's cache."""
    try:
        with affinity.one_cpu():  # the CPU every driver opens its root on (see there)
            conn = open_root(spec.root, lambda event, detail: None)
            conn.getDomainCapabilities(spec.emulator, "x86_64", "q35", spec.virttype)
    except libvirt.libvirtError as exc:
        events.send(p.Result(outcome=p.Outcome.FAILED, reason=f"probe: {exc}"))
        return 1
    events.send(p.Probed())
    return 0


class Driver:
    def __init__(self, spec: p.DriverSpec, events: Events) -> None:
        self.spec = spec
        self.events = events
        self.pidfile = Path(spec.pidfile)
        self.queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.commands = p.LineReader()
        self.watch = Watch(Rules(success=regex_matcher(spec.success),
                                 failure=regex_matcher(spec.failure),
                                 ready=regex_matcher(spec.ready),
                                 timeout=spec.timeout, ready_timeout=spec.ready_timeout,
                                 ready_probe=spec.ready_probe.interval
                                 if spec.ready_probe is not None else None))
        self.ready_probe = probes.make(spec.ready_probe) if spec.ready_probe else None
        self.qemu_pid: int | None = None
        self.dom: Any = None
        self.reader: threading.Thread | None = None
        self.reader_ready = threading.Event()
        self.started = 0.0  # wall clock, for the result
        self.warnings: list[str] = []
        # The guest powered off (libvirt's SHUTDOWN event, guest-initiated) and QEMU has
        # closed the console: the result is known and sent at once (`reported`), not
        # after libvirt's kill loop has noticed that QEMU is gone (0.2 s later).
        self.guest_shut_down = False
        self.console_ended = False
        self.reported = False

    # --- plumbing -------------------------------------------------------------------------

    def post(self, *event: Any) -> None:
        """Queue an event for the main loop (from any thread)."""
        self.queue.append(event)
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b"e")

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.queue.append(("signal", signum))

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for signum in (*STOP_SIGNALS, SUPERVISOR_DIED):
            signal.signal(signum, self._on_signal)

    def supervisor_died(self) -> None:
        """Kill QEMU now (it would outlive us) and leave without a word."""
        self.kill_qemu()
        if self.ready_probe is not None:
            self.ready_probe.cancel()
        os._exit(1)

    def kill_qemu(self) -> None:
        pid = self.qemu_pid or procs.read_pid(self.pidfile)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def check_supervisor(self) -> None:
        if self.events.broken or ("signal", SUPERVISOR_DIED) in self.queue:
            self.supervisor_died()

    # --- start ----------------------------------------------------------------------------

    def run(self) -> int:
        self.events.send(p.Starting())
        if self.spec.shares:
            problem = self.bind_shares()
            if problem is not None:
                self.finish(p.Outcome.FAILED, f"start error: {problem}")
                return 1
        try:
            with affinity.one_cpu():  # libvirt reads the host's CPUID data here
                conn = open_root(self.spec.root, lambda e, d: self.post("lifecycle", e, d),
                                 lambda: self.post("reset", time.monotonic()))
            self.check_supervisor()
            self.dom = conn.createXML(self.spec.xml, libvirt.VIR_DOMAIN_START_PAUSED)
            self.qemu_pid = procs.read_pid(self.pidfile)
            self.check_supervisor()
            if any(e[0] == "signal" for e in self.queue):
                # Asked to stop before the guest ran a single instruction.
                self.queue.clear()
                self.destroy()
                self.finish(p.Outcome.STOPPED, "stopped before it started")
                return 0
            self.events.send(p.Running(pid=self.qemu_pid))
            self.reader = threading.Thread(target=self.read_console, name="console",
                                           daemon=True)
            self.reader.start()
            self.reader_ready.wait(10)
            self.started = time.time()
            self.dom.resume()
            self.carry_out(self.watch.start(time.monotonic()))
            # What libvirt allocated and freed to start the guest goes back to the kernel:
            # a driver then keeps ~5 MiB of its own, not ~8.5 (docs/performance.md).
            _fastsig.trim_heap()
        except libvirt.libvirtError as exc:
            self.check_supervisor()
            message = exc.get_error_message() or str(exc)
            self.kill_qemu()
            self.finish(p.Outcome.FAILED, f"start error: {message}")
            return 1
        return self.loop()

    def bind_shares(self) -> str | None:
        """Bind the shared folders where virtiofsd will serve them; what went wrong, if
        anything.  Only in a mount namespace of our own: never in the host's."""
        if not self.spec.own_proc:
            return "shared folders need the driver's own mount namespace (run as root)"
        try:
            shares.bind((b.source, b.target, b.readonly) for b in self.spec.shares)
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            return f"shared folder{where}: {exc.strerror or exc}"
        return None

    def read_console(self) -> None:
        """Relay the serial console (log file, main loop, `vmrun console` clients)."""
        try:
            warning = console.relay(self.spec.console_socket, self.spec.attach_socket,
                                    self.spec.console_log,
                                    lambda line: self.post("console", line),
                                    self.reader_ready.set)
        except OSError as exc:
            warning = f"console relay failed: {exc.strerror or exc}"
        if warning:
            self.warnings.append(warning)
        self.post("console-eof")

    # --- the main loop --------------------------------------------------------------------

    def loop(self) -> int:
        while True:
            if not self.queue:
                probe = self.ready_probe
                times = [t for t in (self.watch.next_deadline(),
                                     probe.deadline() if probe else None) if t is not None]
                wait = max(0.0, min(times) - time.monotonic()) if times else None
                reads, writes = probe.fds() if probe else ([], [])
                with contextlib.suppress(InterruptedError):
                    select.select([self.wake_r, COMMAND_FD, *reads], writes, [], wait)
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.wake_r, 4096):
                        pass
            self.read_commands()
            self.check_supervisor()
            self.poll_probe()
            while self.queue:
                event = self.queue.popleft()
                if event[0] == "lifecycle" and event[1] == libvirt.VIR_DOMAIN_EVENT_STOPPED:
                    return self.stopped(event[2])
                self.handle(event)
                deadline = self.watch.next_deadline()
                if deadline is not None and time.monotonic() >= deadline:
                    # a guest that floods its console does not put its timeout off
                    self.carry_out(self.watch.tick(time.monotonic()))
            self.carry_out(self.watch.tick(time.monotonic()))

    def handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        now = time.monotonic()
        if kind == "console":
            self.events.send(p.Console(line=event[1]))
            self.carry_out(self.watch.console(event[1]))
        elif kind == "signal" and event[1] in STOP_SIGNALS:
            self.carry_out(self.watch.stop(f"signal {signal.Signals(event[1]).name}",
                                           self.spec.stop_timeout, now))
        elif kind == "command" and isinstance(event[1], p.Stop):
            self.carry_out(self.watch.stop(event[1].reason, event[1].timeout, now))
        elif kind == "command" and isinstance(event[1], p.Destroy):
            self.carry_out(self.watch.destroy(event[1].reason))
        elif kind == "lifecycle" and event[1] == libvirt.VIR_DOMAIN_EVENT_CRASHED:
            self.carry_out(self.watch.crashed())
        elif kind == "reset":
            self.carry_out(self.watch.reset(event[1]))
        elif kind == "lifecycle" and event[1] == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN:
            self.guest_shut_down = event[2] == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST
            self.report_early()
        elif kind == "console-eof":
            self.console_ended = True
            self.report_early()

    def report_early(self) -> None:
        """Send the result of a guest that powered itself off as soon as its last console
        line is in: QEMU has closed the console, so it is ending; libvirt's teardown of
        it (the STOPPED event) follows and changes nothing of the outcome."""
        if self.guest_shut_down and self.console_ended and not self.reported:
            if self.ready_probe is not None:
                self.ready_probe.cancel()
            self.finish(*self.watch.outcome(Stopped.SHUTDOWN))
            self.reported = True

    def carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            if action is Action.DESTROY:
                self.destroy()
            elif action is Action.PRESS_POWER_BUTTON:
                try:
                    self.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                except libvirt.libvirtError:
                    self.carry_out(self.watch.press_failed())
            elif action is Action.REPORT_READY:
                self.events.send(p.Ready())
            elif action is Action.REPORT_REBOOTED:
                self.events.send(p.Rebooted())
            elif action is Action.PROBE and self.ready_probe is not None:
                result = self.ready_probe.start(time.monotonic())
                if result is not None:  # it could tell at once
                    self.carry_out(self.watch.probed(time.monotonic(), *result))
            elif action is Action.REPORT_STOPPING:
                decision = self.watch.decision
                self.events.send(p.Stopping(reason=decision[1] if decision else ""))

    def poll_probe(self) -> None:
        """Take the readiness probe's answer; end an attempt no longer wanted."""
        probe = self.ready_probe
        if probe is None or not probe.busy:
            return
        if not self.watch.probing:  # ready, or decided otherwise meanwhile
            probe.cancel()
            return
        result = probe.poll(time.monotonic())
        if result is not None:
            self.carry_out(self.watch.probed(time.monotonic(), *result))

    def read_commands(self) -> None:
        """Commands from the supervisor on stdin; EOF means it is gone."""
        try:
            data = os.read(COMMAND_FD, 65536)
        except BlockingIOError:
            return
        if not data:
            self.supervisor_died()
        for line in self.commands.feed(data):
            with contextlib.suppress(p.ProtocolError):
                self.queue.append(("command", p.decode_command(line)))

    def destroy(self) -> None:
        try:
            self.dom.destroy()
        except libvirt.libvirtError:
            self.kill_qemu()

    def stopped(self, detail: int) -> int:
        if self.reported:
            return 0
        if self.ready_probe is not None:
            self.ready_probe.cancel()
        # QEMU is gone, so the console socket is at EOF: take every last line first.
        if self.reader is not None:
            self.reader.join(5)
        while self.queue:
            event = self.queue.popleft()
            if event[0] == "console":
                self.handle(event)
        how = {libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: Stopped.SHUTDOWN,
               libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: Stopped.DESTROYED}
        self.finish(*self.watch.outcome(how.get(detail, Stopped.OTHER)))
        return 0

    def finish(self, outcome: p.Outcome, reason: str) -> None:
        self.events.send(p.Result(outcome=outcome, reason=reason, warnings=tuple(self.warnings),
                                  started=self.started or None, stopped=time.time()))


def enter_netns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _fastsig.enter_netns(fd)
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    global libvirt
    spec: p.DriverSpec | p.ProbeSpec
    spec = p.ProbeSpec.from_json(argv[2]) if argv[1] == "probe" else \
        p.DriverSpec.from_json(argv[2])
    if spec.own_proc:
        # Born in the stack's PID namespace: libvirt must see its pids in /proc.
        _fastsig.private_proc()
    if isinstance(spec, p.DriverSpec) and spec.netns:
        # Before any thread and before libvirt: QEMU and its taps then live in the
        # stack's private network namespace.
        enter_netns(spec.netns)
    libvirt = importlib.import_module("libvirt")

    events = Events(EVENT_FD)
    driver = Driver(spec, events) if isinstance(spec, p.DriverSpec) else None
    os.set_blocking(COMMAND_FD, False)
    if driver is not None:
        driver.install_signals()
    # The supervisor starts us with the stop signals blocked (see vmrun.spawn): one that
    # came meanwhile is delivered now, to our handler.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if not _fastsig.set_pdeathsig(SUPERVISOR_DIED, spec.supervisor_pid):
        return 1  # the supervisor died before we could watch it: start nothing
    if driver is not None:
        code = driver.run()
    else:
        assert isinstance(spec, p.ProbeSpec)
        code = probe(spec, events)
    sys.stdout.flush()
    sys.stderr.flush()
    # libvirt's event thread may block in one more iteration; do not wait for it.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
