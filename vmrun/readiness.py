"""`ready`: what makes a VM count as ready, on the manifest's and the supervisor's side.

Three forms, one at a time:

* a console line matching a regular expression: `ready = "…"` or `ready = { console = "…" }`;
* a TCP port of the guest that accepts connections: `ready = { port = 80 }`;
* a command run in the guest over ssh that exits 0: `ready = { ssh = "…" }`.

This module holds the `ready` setting's value (`Ready`), its converter and JSON Schema,
and what the supervisor gives a VM's driver to check a port or a command
(`probe_of`: a protocol.ReadyProbe).  The driver, which runs inside the stack's network
namespace, runs those probes (vmrun/proc/probes.py) and tells its Watch (vmrun/watch.py)
when one succeeded; the Watch then marks the VM ready exactly as after a console match,
so the ready state, `vmrun ps`, `depends_on` and `up --detach --wait` do not care which
form it was.  A port or ssh check reaches the guest at its first private address, so
such a VM needs a private network (vmrun/stackcheck.py says so, with the line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmrun import protocol as p
from vmrun.convert import Context, Invalid, describe, did_you_mean, regex
from vmrun.errors import UsageError

if TYPE_CHECKING:  # vmrun.manifest imports this module (through vmrun.settings)
    from vmrun.manifest import VM, Stack

FORMS = ("console", "port", "ssh")
PORT_INTERVAL = 0.2  # seconds between TCP connect attempts
SSH_INTERVAL = 1.0  # seconds between ssh attempts (each costs the guest a login)
PORT_ATTEMPT_TIMEOUT = 1.0  # a connect not answered by then is dropped and tried anew

EXPECTED = ('a regular expression for a console line, or a table with one of console '
            '(a regular expression), port (a TCP port) or ssh (a command), e.g. '
            'ready = { port = 80 }')


@dataclass(frozen=True)
class Ready:
    """A VM's `ready` setting: exactly one of the three is set."""

    console: str | None = None  # RE2 pattern, searched in each console line
    port: int | None = None  # TCP port on the VM's first private address
    ssh: str | None = None  # command run in the guest over ssh; ready when it exits 0

    @property
    def form(self) -> str:
        return "port" if self.port is not None else "ssh" if self.ssh is not None \
            else "console"

    @property
    def probed(self) -> bool:
        """Checked by the driver's probes (port, ssh), not by console lines."""
        return self.port is not None or self.ssh is not None

    def __str__(self) -> str:
        if self.port is not None:
            return f"port {self.port}"
        if self.ssh is not None:
            return f"ssh {self.ssh!r}"
        return f"console {self.console!r}"


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise Invalid("a TCP port from 1 to 65535", found=describe(value), where=".port")
    return value


def _ssh(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("a non-empty command, run in the guest over ssh",
                      found=describe(value), where=".ssh")
    return value


def convert(value: Any, ctx: Context) -> Ready:
    """The `ready` setting: a bare string is the console regex; a table names one form."""
    if isinstance(value, str):
        return Ready(console=regex(value, ctx))
    if not isinstance(value, dict):
        raise Invalid(EXPECTED)
    for key in value:
        if key not in FORMS:
            raise Invalid("one of console, port or ssh", found=f'the key "{key}"',
                          hint=did_you_mean(key, list(FORMS)), where=f".{key}")
    if len(value) != 1:
        raise Invalid("exactly one of console, port or ssh",
                      found="an empty table" if not value else
                      " and ".join(f'"{k}"' for k in value),
                      hint="a VM is ready by one check: pick the one that means ready")
    key, item = next(iter(value.items()))
    if key == "port":
        return Ready(port=_port(item))
    if key == "ssh":
        return Ready(ssh=_ssh(item))
    try:
        return Ready(console=regex(item, ctx))
    except Invalid as exc:
        raise Invalid(exc.expected, hint=exc.hint, found=exc.found or describe(item),
                      where=".console") from None


_PATTERN = {"type": "string", "minLength": 1}
SCHEMA: dict[str, Any] = {"anyOf": [
    _PATTERN,
    {"type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 1,
     "properties": {"console": _PATTERN,
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "ssh": {"type": "string", "minLength": 1}}},
]}

DOC = ("When the VM counts as ready (`vmrun up --detach --wait` waits for it, `depends_on` "
       "too; `vmrun ps` shows it): a regular expression (RE2 syntax) that a console line "
       "matches, also written `{ console = \"…\" }`; `{ port = 80 }`: a TCP connection to "
       "that port of the VM's first private address succeeds; `{ ssh = \"command\" }`: the "
       "command, run in the guest over ssh, exits 0. Port and ssh need a private network. "
       "Default: ready as soon as it runs.")


# --- the supervisor's side: what a driver is given to check ------------------------------

def probe_of(stack: Stack, vm: VM) -> p.ReadyProbe | None:
    """The probe `vm`'s driver runs until the VM is ready (None: console or no `ready`).

    Raises a VmrunError when the probe cannot be made; the supervisor asks before it
    starts anything."""
    ready = vm.ready
    if ready is None or not ready.probed:
        return None
    address = vm.address
    if address is None:  # refused by the manifest's checks; never here
        raise UsageError(f"VM {vm.name}: ready = {{ {ready.form} = … }} needs a private "
                         "network")
    if ready.port is not None:
        return p.ReadyProbe(address=address, port=ready.port, interval=PORT_INTERVAL,
                            attempt_timeout=PORT_ATTEMPT_TIMEOUT)
    assert ready.ssh is not None
    return p.ReadyProbe(address=address, argv=ssh_argv(stack, vm, ready.ssh),
                        interval=SSH_INTERVAL)


def ssh_argv(stack: Stack, vm: VM, command: str) -> tuple[str, ...]:
    """The command line that runs `command` in `vm` over ssh, exiting with its status:
    `vmrun exec --wait 0` (the stack's key, the VM's first private address through the
    stack's namespace, StrictHostKeyChecking with the host keys the guest printed).  Until
    the guest has printed its host keys and sshd listens, it fails at once (255) and the
    driver tries again a second later."""
    from vmrun.access import vmrun_command

    return (*vmrun_command(), "exec", "--wait", "0", "--from-driver", "--state-dir",
            str(stack.state_dir.parent), str(stack.path), vm.name, "--", command)

