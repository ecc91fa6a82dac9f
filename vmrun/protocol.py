"""Everything that crosses a process boundary, typed: specs, events, commands, replies.

    supervisor --spec (argv)--> driver / probe / forwarder
    supervisor --Command lines (driver's stdin)--> driver
    driver --Event lines (fd 3)--> supervisor
    `vmrun ps` --request line--> supervisor --StackStatus line--> `vmrun ps`

Every message is one JSON object on one line (`encode`), read back with a `LineReader`
(bounded: a line longer than its limit is dropped, never buffered without end).  Each
message type is a frozen dataclass with a `kind`; `to_json` / `from_json` convert it, and
`from_json` rejects what does not fit the type (a peer is trusted to be vmrun, but a
version mismatch or a bug must be an error, not a KeyError three modules away).

This module (and vmrun.wire, the format) imports nothing but the standard library: both
sides of every boundary load it, the driver included (which must not load lxml or the
manifest).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar

# re-exported: a user of the protocol needs one module
from vmrun.wire import LineReader as LineReader
from vmrun.wire import Message as Message
from vmrun.wire import ProtocolError as ProtocolError
from vmrun.wire import decode, decode_dict
from vmrun.wire import encode as encode
from vmrun.wire import send as send


class Outcome(enum.StrEnum):
    OK = "ok"
    FAILED = "failed"
    STOPPED = "stopped"


class VMState(enum.StrEnum):
    WAITING = "waiting"  # for its dependencies
    STARTING = "starting"  # driver spawned, guest not running yet
    RUNNING = "running"
    READY = "ready"
    STOPPING = "stopping"  # asked to stop: ACPI pressed, destroy after a timeout
    STOPPED = "stopped"
    RESTARTING = "restarting"  # its run ended; `restart` starts it again (supervisor only)


# --- specs: what a child process is started with (its argv) ----------------------------

@dataclasses.dataclass(frozen=True)
class ReadyProbe(Message):
    """How a driver checks that its guest is ready, other than by a console line: a TCP
    connect to (address, port), or a command (`argv`) that exits 0.  Tried every
    `interval` seconds, one attempt at a time, until one succeeds (vmrun/readiness.py)."""

    address: str  # the VM's first private address
    port: int | None = None
    argv: tuple[str, ...] = ()
    interval: float = 0.2
    attempt_timeout: float | None = None  # an attempt still pending then is dropped


@dataclasses.dataclass(frozen=True)
class ShareBind(Message):
    """A shared folder the driver bind-mounts in its own mount namespace before libvirt
    starts virtiofsd on it (read-only for a `readonly` share)."""

    source: str  # the host directory
    target: str  # its mount point in the VM's root
    readonly: bool


@dataclasses.dataclass(frozen=True)
class DriverSpec(Message):
    """A driver's job: one VM in one embedded root."""

    name: str
    root: str
    xml: str
    console_socket: str
    attach_socket: str
    console_log: str
    pidfile: str  # libvirt's pidfile of the domain's QEMU
    stop_timeout: float
    supervisor_pid: int
    success: str | None = None
    failure: str | None = None
    ready: str | None = None  # the console regex of `ready`
    timeout: float | None = None
    ready_timeout: float = 0.0
    ready_probe: ReadyProbe | None = None  # `ready` = { port = … } or { ssh = … }
    netns: str | None = None
    own_proc: bool = False  # in the stack's PID namespace: mount a /proc of its own
    shares: tuple[ShareBind, ...] = ()  # bind mounts the driver makes (vmrun/shares.py)


@dataclasses.dataclass(frozen=True)
class ProbeSpec(Message):
    """The one-off driver that makes libvirt probe QEMU's capabilities into a root."""

    root: str
    emulator: str
    virttype: str  # "kvm" or "qemu"
    supervisor_pid: int
    own_proc: bool = False


@dataclasses.dataclass(frozen=True)
class ForwardTarget(Message):
    fd: int  # the inherited listening socket
    ip: str
    port: int


@dataclasses.dataclass(frozen=True)
class ForwarderSpec(Message):
    netns: str
    forwards: tuple[ForwardTarget, ...]
    supervisor_pid: int


# --- events: driver -> supervisor ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Starting(Message):
    kind: ClassVar[str] = "starting"


@dataclasses.dataclass(frozen=True)
class Running(Message):
    kind: ClassVar[str] = "running"
    pid: int | None = None  # QEMU's


@dataclasses.dataclass(frozen=True)
class Ready(Message):
    kind: ClassVar[str] = "ready"


@dataclasses.dataclass(frozen=True)
class Console(Message):
    kind: ClassVar[str] = "console"
    line: str


@dataclasses.dataclass(frozen=True)
class Rebooted(Message):
    """The guest rebooted and came back in the same QEMU (on_reboot = "restart")."""

    kind: ClassVar[str] = "rebooted"


@dataclasses.dataclass(frozen=True)
class Stopping(Message):
    kind: ClassVar[str] = "stopping"
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Result(Message):
    kind: ClassVar[str] = "result"
    outcome: Outcome
    reason: str = ""
    started: float | None = None  # wall-clock times
    stopped: float | None = None
    warnings: tuple[str, ...] = ()  # what went wrong without deciding the outcome


@dataclasses.dataclass(frozen=True)
class Probed(Message):
    kind: ClassVar[str] = "probed"


DriverEvent = Starting | Running | Ready | Console | Rebooted | Stopping | Result | Probed
_EVENTS: tuple[type[Message], ...] = (Starting, Running, Ready, Console, Rebooted, Stopping,
                                       Result, Probed)


def decode_event(line: bytes) -> DriverEvent:
    """A driver's event line; ProtocolError when it is not one."""
    event: DriverEvent = decode(line, _EVENTS)  # type: ignore[assignment]
    return event


def next_state(state: VMState, event: DriverEvent) -> VMState:
    """The one rule for a VM's state as its driver's events come in."""
    if isinstance(event, Running):
        return VMState.RUNNING
    if isinstance(event, Ready):
        return VMState.READY
    if isinstance(event, Stopping):
        return VMState.STOPPING
    if isinstance(event, Result):
        return VMState.STOPPED
    return state


# --- commands: supervisor -> driver ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stop(Message):
    """Press the power button; destroy after `timeout` (a second Stop destroys now)."""

    kind: ClassVar[str] = "stop"
    timeout: float
    reason: str


@dataclasses.dataclass(frozen=True)
class Destroy(Message):
    kind: ClassVar[str] = "destroy"
    reason: str


Command = Stop | Destroy


def decode_command(line: bytes) -> Command:
    command: Command = decode(line, (Stop, Destroy))  # type: ignore[assignment]
    return command


# --- the control socket: `vmrun ps` and `vmrun down` --------------------------------------

@dataclasses.dataclass(frozen=True)
class PsRequest(Message):
    kind: ClassVar[str] = "ps"
    tag: ClassVar[str] = "cmd"


@dataclasses.dataclass(frozen=True)
class DownRequest(Message):
    """Stop every VM: ACPI, destroy after `timeout` (None: the stack's stop_timeout)."""

    kind: ClassVar[str] = "down"
    tag: ClassVar[str] = "cmd"
    timeout: float | None = None


@dataclasses.dataclass(frozen=True)
class DownAccepted(Message):
    """The reply to `down`; the connection then stays open until the supervisor exits."""

    ok: bool
    pid: int
    timeout: float  # what each VM gets to shut down


@dataclasses.dataclass(frozen=True)
class ErrorReply(Message):
    ok: bool
    error: str


Request = PsRequest | DownRequest


def decode_request(data: Any) -> Request:
    request: Request = decode_dict(data, (PsRequest, DownRequest))  # type: ignore[assignment]
    if isinstance(request, DownRequest) and request.timeout is not None and \
            not 0 <= request.timeout < float("inf"):
        raise ProtocolError(f"down: bad timeout {request.timeout!r}")
    return request


@dataclasses.dataclass(frozen=True)
class Address(Message):
    ip: str
    cidr: str
    mac: str


@dataclasses.dataclass(frozen=True)
class VMStatus(Message):
    state: VMState
    outcome: Outcome | None
    reason: str | None
    started: str | None  # ISO 8601, UTC
    uptime: float | None
    qemu_pid: int | None
    accel: str
    addresses: dict[str, Address]
    forwards: tuple[str, ...]
    restarts: int = 0  # times `restart` started it again in this run of the stack
    reboots: int = 0  # reboots inside the guest (on_reboot = "restart"), all its runs


@dataclasses.dataclass(frozen=True)
class StackStatus(Message):
    """The reply to `ps`."""

    stack: str
    pid: int
    accel: str
    started: str | None
    manifest: str
    stopping: bool
    vms: dict[str, VMStatus]


# --- `vmrun up --detach`: the background supervisor -> the waiting foreground ----------

@dataclasses.dataclass(frozen=True)
class VMReached(Message):
    kind: ClassVar[str] = "vm"
    vm: str
    state: VMState


@dataclasses.dataclass(frozen=True)
class StackUp(Message):
    kind: ClassVar[str] = "up"
    pid: int


@dataclasses.dataclass(frozen=True)
class VMFailed(Message):
    kind: ClassVar[str] = "failed"
    vm: str
    outcome: Outcome
    reason: str


@dataclasses.dataclass(frozen=True)
class StartError(Message):
    kind: ClassVar[str] = "error"
    code: int
    lines: tuple[str, ...]


DetachReport = VMReached | StackUp | VMFailed | StartError
_REPORTS: tuple[type[Message], ...] = (VMReached, StackUp, VMFailed, StartError)


def decode_report(line: bytes) -> DetachReport:
    report: DetachReport = decode(line, _REPORTS)  # type: ignore[assignment]
    return report


# --- notes: the supervisor -> its listener, in-process (the CLI's view, the reporter) ----

@dataclasses.dataclass(frozen=True)
class Probing(Message):
    kind: ClassVar[str] = "probing"


@dataclasses.dataclass(frozen=True)
class Spawned(Message):
    kind: ClassVar[str] = "spawned"
    pid: int


@dataclasses.dataclass(frozen=True)
class SignalReceived(Message):
    kind: ClassVar[str] = "signal"
    signal: int


@dataclasses.dataclass(frozen=True)
class DownRequested(Message):
    kind: ClassVar[str] = "down"
    timeout: float


@dataclasses.dataclass(frozen=True)
class Restarting(Message):
    """A run of the VM ended with `outcome`, and `restart` starts it again: this is
    restart number `restart` of at most `restart_max`.  (In place of that run's Result:
    a VM's Result note is its final outcome.)"""

    kind: ClassVar[str] = "restarting"
    outcome: Outcome
    reason: str
    restart: int
    restart_max: int


@dataclasses.dataclass(frozen=True)
class Tick(Message):
    kind: ClassVar[str] = "tick"


Note = DriverEvent | Probing | Spawned | SignalReceived | DownRequested | Restarting | Tick
