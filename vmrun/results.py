"""What a run of a stack produced: each VM's outcome, and the run's exit status.

Written to `<state_dir>/<name>/last-run.json` by the supervisor and shown by the CLI.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vmrun.manifest import VM


@dataclass
class VMResult:
    name: str
    outcome: str = "failed"
    reason: str = ""
    started: float | None = None
    stopped: float | None = None
    console: str = ""
    addresses: dict[str, dict[str, str]] = field(default_factory=dict)
    forwards: list[str] = field(default_factory=list)

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
                    "started": iso_time(r.started),
                    "stopped": iso_time(r.stopped),
                    "console": r.console,
                    "addresses": r.addresses,
                    "forwards": r.forwards,
                }
                for name, r in self.vms.items()
            },
        }


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def addresses_of(vm: VM) -> dict[str, dict[str, str]]:
    return {a.network: {"ip": str(a.ip), "cidr": a.cidr, "mac": a.mac} for a in vm.addresses}
