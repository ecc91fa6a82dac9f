"""What a run of a stack produced: each VM's outcome, and the run's exit status.

Written to `<state_dir>/<name>/last-run.json` by the supervisor when a run starts (no
outcomes, no exit status: a run that is killed leaves that behind) and when it ends.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrun.manifest import VM
from vmrun.protocol import Address, Outcome


@dataclass
class VMResult:
    name: str
    outcome: Outcome | None = None  # None: not ended (yet)
    reason: str | None = None
    started: float | None = None
    stopped: float | None = None
    console: str = ""
    addresses: dict[str, Address] = field(default_factory=dict)
    forwards: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    restarts: int = 0  # times `restart` started it again (the outcome is its last run's)
    reboots: int = 0  # reboots inside the guest that it came back from, all runs

    @property
    def duration(self) -> float | None:
        if self.started is None or self.stopped is None:
            return None
        return max(0.0, self.stopped - self.started)


@dataclass
class RunResult:
    stack: str
    exit: int | None  # None: the run has not ended
    vms: dict[str, VMResult]
    signal: int | None = None
    accel: str = ""
    warnings: list[str] = field(default_factory=list)  # about the run, not one VM

    def to_json(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "exit": self.exit,
            "accel": self.accel,
            "signal": self.signal,
            "vms": {
                name: {
                    "outcome": r.outcome.value if r.outcome else None,
                    "reason": r.reason,
                    "started": iso_time(r.started),
                    "stopped": iso_time(r.stopped),
                    "console": r.console,
                    "addresses": {net: a.to_dict() for net, a in r.addresses.items()},
                    "forwards": r.forwards,
                    "warnings": r.warnings,
                    "restarts": r.restarts,
                    "reboots": r.reboots,
                }
                for name, r in self.vms.items()
            },
        }

    def write(self, path: Path) -> bool:
        """Replace `path` atomically; on failure (a full disk, a deleted state directory)
        note a warning and leave the old file."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
            tmp.replace(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.warnings.append(f"cannot write {path}: {exc.strerror or exc}")
            return False
        return True


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def addresses_of(vm: VM) -> dict[str, Address]:
    return {a.network: Address(ip=str(a.ip), cidr=a.cidr, mac=a.mac) for a in vm.addresses}
