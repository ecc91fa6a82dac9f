"""The driver: one process per VM, owning that VM's embedded libvirt QEMU driver.

Run as ``python -m vmrun.driver SPEC_JSON`` by the supervisor, never by users.  It

* dies with its supervisor: PR_SET_PDEATHSIG delivers SIGUSR1, and the driver then kills
  its QEMU at once (libvirt daemonizes QEMU, so nothing else would) and exits;
* opens ``qemu:///embed?root=ROOT`` (one root per process: libvirt refuses a second),
  starts the domain paused, attaches to its serial console, then resumes it, so not one
  console byte is lost;
* reports to the supervisor as JSON lines on fd 3: ``running`` (with the QEMU pid),
  ``ready``, ``console`` lines, ``stopping`` and one final ``result``;
* takes commands from the supervisor as JSON lines on stdin (``stop`` with a timeout,
  ``destroy``); EOF there, like the parent-death signal, means the supervisor is gone;
* decides the VM's outcome: panic and failure patterns and the timeouts (``timeout``,
  ``ready_timeout``) destroy the guest at once; SIGINT/SIGTERM/SIGHUP and ``stop`` press
  the ACPI power button (again every second) and destroy the guest after the stop
  timeout (a second request destroys it at once);
* runs inside the stack's network namespace when the VM has networks (entered before
  libvirt is opened, so QEMU and its taps live there).

It never reaps with waitpid(-1): libvirt forks and reaps its own helpers in this process.
All waiting happens in one select() on a wake-up pipe that the signal handlers (through
signal.set_wakeup_fd), the console reader thread and the libvirt event thread write to.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vmrun import _fastsig, console, procs
from vmrun.domain import PANIC_PATTERN

STATUS_FD = 3
COMMAND_FD = 0
SUPERVISOR_DIED = signal.SIGUSR1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
POWER_BUTTON_REPEAT = 1.0  # seconds between ACPI power-button presses while stopping


class Status:
    """The JSON-lines channel to the supervisor; a dead supervisor is noted, not fatal."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False
        self.lock = threading.Lock()

    def send(self, **message: Any) -> None:
        data = (json.dumps(message) + "\n").encode()
        with self.lock:
            if self.broken:
                return
            try:
                while data:
                    written = os.write(self.fd, data)
                    data = data[written:]
            except OSError:  # EPIPE: the supervisor is gone
                self.broken = True


class Driver:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.root: str = spec["root"]
        self.pidfile = Path(self.root, "run", "qemu", f"{self.name}.pid")  # libvirt's
        self.status = Status(STATUS_FD)
        self.events: collections.deque[tuple[Any, ...]] = collections.deque()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.qemu_pid: int | None = None
        self.dom: Any = None
        self.reader: threading.Thread | None = None
        self.outcome: tuple[str, str] | None = None  # decided early (pattern, signal, ...)
        self.success_seen = False
        self.stop_deadline: float | None = None
        self.next_press: float | None = None  # the power button is pressed again then
        self.stop_requests = 0
        self.command_buffer = b""
        self.started = 0.0
        self.success = re.compile(spec["success"]) if spec.get("success") else None
        self.failure = re.compile(spec["failure"]) if spec.get("failure") else None
        self.ready = re.compile(spec["ready"]) if spec.get("ready") else None
        self.is_ready = False
        self.panic = re.compile(PANIC_PATTERN)
        self.reader_ready = threading.Event()

    # --- plumbing -------------------------------------------------------------------------

    def post(self, *event: Any) -> None:
        """Queue an event for the main loop (from any thread)."""
        self.events.append(event)
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b"e")

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.events.append(("signal", signum))

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for signum in (*STOP_SIGNALS, SUPERVISOR_DIED):
            signal.signal(signum, self._on_signal)

    def supervisor_died(self) -> None:
        """Kill QEMU now (it would outlive us) and leave without a word."""
        self.kill_qemu()
        os._exit(1)

    def kill_qemu(self) -> None:
        pid = self.qemu_pid or procs.read_pid(self.pidfile)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def check_supervisor(self) -> None:
        if self.status.broken or any(e == ("signal", SUPERVISOR_DIED) for e in self.events):
            self.supervisor_died()

    # --- libvirt --------------------------------------------------------------------------

    def open(self) -> Any:
        import libvirt

        libvirt.virEventRegisterDefaultImpl()

        def run_loop() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run_loop, name="libvirt-events", daemon=True).start()
        conn = libvirt.open(f"qemu:///embed?root={self.root}")

        def lifecycle(conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
            self.post("lifecycle", event, detail)

        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None)
        return conn

    def probe(self) -> int:
        """Only make libvirt probe QEMU's capabilities into this root's cache."""
        import libvirt

        conn = self.open()
        try:
            conn.getDomainCapabilities(self.spec["emulator"], "x86_64", "q35",
                                       self.spec.get("virttype", "qemu"))
        except libvirt.libvirtError as exc:
            self.status.send(ev="result", outcome="failed", reason=f"probe: {exc}")
            return 1
        self.status.send(ev="probed")
        return 0

    def run(self) -> int:
        import libvirt

        self.status.send(ev="starting")
        try:
            conn = self.open()
            self.check_supervisor()
            self.dom = conn.createXML(self.spec["xml"], libvirt.VIR_DOMAIN_START_PAUSED)
            self.qemu_pid = procs.read_pid(self.pidfile)
            self.check_supervisor()
            if any(e[0] == "signal" for e in self.events):
                # Asked to stop before the guest ran a single instruction.
                self.events.clear()
                self.destroy()
                self.finish("stopped", "stopped before it started")
                return 0
            self.status.send(ev="running", pid=self.qemu_pid)
            self.reader = threading.Thread(target=self.read_console, name="console", daemon=True)
            self.reader.start()
            self.reader_ready.wait(10)
            self.started = time.time()
            self.dom.resume()
            if self.ready is None:
                self.mark_ready()
        except libvirt.libvirtError as exc:
            self.check_supervisor()
            message = exc.get_error_message() or str(exc)
            self.kill_qemu()
            self.finish("failed", f"start error: {message}")
            return 1
        return self.loop()

    def read_console(self) -> None:
        """Relay the serial console (log file, main loop, `vmrun console` clients)."""
        try:
            console.relay(self.spec["console_socket"], self.spec["attach_socket"],
                          self.spec["console_log"], lambda line: self.post("console", line),
                          self.reader_ready.set)
        except OSError as exc:
            print(f"vmrun driver: console relay: {exc}", file=sys.stderr)
        self.post("console-eof")

    # --- the main loop --------------------------------------------------------------------

    def loop(self) -> int:
        import libvirt

        timeout = self.spec.get("timeout")
        deadline = self.started + timeout if timeout else None
        ready_timeout = float(self.spec.get("ready_timeout") or 0)
        ready_deadline = self.started + ready_timeout if self.ready and ready_timeout else None
        while True:
            if self.is_ready or self.outcome is not None:
                ready_deadline = None
            waits = [d - time.time() for d in
                     (deadline, ready_deadline, self.stop_deadline, self.next_press)
                     if d is not None]
            wait = max(0.0, min(waits)) if waits else None
            if not self.events:
                with contextlib.suppress(InterruptedError):
                    select.select([self.wake_r, COMMAND_FD], [], [], wait)
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.wake_r, 4096):
                        pass
            self.read_commands()
            self.check_supervisor()
            while self.events:
                event = self.events.popleft()
                if event[0] == "lifecycle" and event[1] == libvirt.VIR_DOMAIN_EVENT_STOPPED:
                    return self.stopped(event[2])
                self.handle(event)
            now_wall = time.time()
            if deadline is not None and now_wall >= deadline and self.outcome is None:
                self.decide("failed", f"timeout after {timeout:g}s")
                self.destroy()
            if ready_deadline is not None and now_wall >= ready_deadline:
                self.decide("failed", f"not ready after {ready_timeout:g}s")
                self.destroy()
            if self.stop_deadline is not None and now_wall >= self.stop_deadline:
                self.stop_deadline = self.next_press = None
                self.destroy()
            elif self.next_press is not None and now_wall >= self.next_press:
                # A press before the guest's ACPI driver is up is lost: press again.
                self.press_power_button()

    def handle(self, event: tuple[Any, ...]) -> None:
        import libvirt

        kind = event[0]
        if kind == "console":
            self.console(event[1])
        elif kind == "signal" and event[1] in STOP_SIGNALS:
            self.stop(f"signal {signal.Signals(event[1]).name}", float(self.spec["stop_timeout"]))
        elif kind == "command" and event[1].get("cmd") == "stop":
            self.stop(str(event[1].get("reason", "stopped on request")),
                      float(event[1].get("timeout", self.spec["stop_timeout"])))
        elif kind == "command" and event[1].get("cmd") == "destroy":
            self.decide("stopped", str(event[1].get("reason", "destroyed on request")))
            self.stop_deadline = self.next_press = None
            self.destroy()
        elif kind == "lifecycle" and event[1] == libvirt.VIR_DOMAIN_EVENT_CRASHED:
            self.decide("failed", "panic")
            self.destroy()

    def stop(self, reason: str, timeout: float) -> None:
        """First request: ACPI power button, destroy after `timeout`; next: destroy now."""
        self.stop_requests += 1
        self.decide("stopped", reason)
        if self.stop_requests == 1 and timeout > 0:
            self.status.send(ev="stopping", reason=reason)
            self.stop_deadline = time.time() + timeout
            self.press_power_button()
        else:
            self.stop_deadline = self.next_press = None
            self.destroy()

    def read_commands(self) -> None:
        """Commands from the supervisor, JSON lines on stdin; EOF means it is gone."""
        try:
            data = os.read(COMMAND_FD, 65536)
        except BlockingIOError:
            return
        if not data:
            self.supervisor_died()
        self.command_buffer += data
        *lines, self.command_buffer = self.command_buffer.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                self.events.append(("command", json.loads(line)))

    def press_power_button(self) -> None:
        import libvirt

        self.next_press = time.time() + POWER_BUTTON_REPEAT
        try:
            self.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        except libvirt.libvirtError:
            self.stop_deadline = self.next_press = None
            self.destroy()

    def console(self, line: str) -> None:
        self.status.send(ev="console", line=line)
        if self.outcome is not None:
            return
        if self.panic.search(line):
            self.decide("failed", "panic")
            self.destroy()
        elif self.failure is not None and self.failure.search(line):
            self.decide("failed", f"failure pattern matched: {line.strip()[:120]}")
            self.destroy()
        elif self.success is not None and self.success.search(line):
            self.success_seen = True
        if not self.is_ready and self.ready is not None and self.ready.search(line):
            self.mark_ready()

    def mark_ready(self) -> None:
        self.is_ready = True
        self.status.send(ev="ready")

    def decide(self, outcome: str, reason: str) -> None:
        if self.outcome is None:
            self.outcome = (outcome, reason)

    def destroy(self) -> None:
        import libvirt

        try:
            self.dom.destroy()
        except libvirt.libvirtError:
            self.kill_qemu()

    def stopped(self, detail: int) -> int:
        import libvirt

        # QEMU is gone, so the console socket is at EOF: take every last line first.
        if self.reader is not None:
            self.reader.join(5)
        while self.events:
            event = self.events.popleft()
            if event[0] == "console":
                self.console(event[1])
        if self.outcome is not None:
            outcome, reason = self.outcome
        elif detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN:
            if self.success is not None and not self.success_seen:
                outcome, reason = "failed", "success pattern missing"
            else:
                outcome, reason = "ok", ""
        elif detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED:
            outcome, reason = "failed", "destroyed from outside"
        else:
            outcome, reason = "failed", "crashed"
        self.finish(outcome, reason)
        return 0

    def finish(self, outcome: str, reason: str) -> None:
        self.status.send(ev="result", outcome=outcome, reason=reason,
                         started=self.started or None, stopped=time.time())


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    if spec.get("netns"):
        # Before any thread and before libvirt: QEMU and its taps then live in the
        # stack's private network namespace.
        fd = os.open(spec["netns"], os.O_RDONLY | os.O_CLOEXEC)
        _fastsig.enter_netns(fd)
        os.close(fd)
    driver = Driver(spec)
    os.set_blocking(COMMAND_FD, False)
    driver.install_signals()
    # The supervisor starts us with the stop signals blocked (see Supervisor.spawn): one
    # that came meanwhile is delivered now, to our handler.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if not _fastsig.set_pdeathsig(SUPERVISOR_DIED, spec["supervisor_pid"]):
        return 1  # the supervisor died before we could watch it: start nothing
    code = driver.probe() if spec.get("probe") else driver.run()
    sys.stdout.flush()
    sys.stderr.flush()
    # libvirt's event thread may block in one more iteration; do not wait for it.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
