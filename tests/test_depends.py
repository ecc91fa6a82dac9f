"""Start order on real guests: depends_on (ready / ok), copies with count."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import Up, cmdline, last_run, write_stack


def seconds(stamp: str) -> float:
    whole, _, frac = stamp.rstrip("Z").partition(".")
    return time.mktime(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float(f"0.{frac or 0}")


@pytest.mark.timeout(300)
def test_depends_on_and_copies(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "db": {"count": 2, "cmdline": cmdline(say="db {vm.name} number {index} ready", sleep=4),
               "ready": "ready$"},
        "web": {"cmdline": cmdline(say="web up"), "depends_on": ["db"]},
        "app": {"cmdline": cmdline(say="app up"), "depends_on": {"db": "ok"}},
        "bad": {"cmdline": cmdline(action="panic")},
        "after": {"cmdline": cmdline(say="never"), "depends_on": {"bad": "ok"}},
    })
    up = Up(manifest)
    assert up.wait(240) == 1, up.stderr
    out = up.output.splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(out) if text in line)

    # copies got their own names and placeholders
    assert first("db-1 | db db-1 number 1 ready") >= 0
    assert first("db-2 | db db-2 number 2 ready") >= 0
    # web waited until both copies were ready, not until they stopped
    web_boot = first("web | guest: booted")
    assert web_boot > first("db-1 | db db-1 number 1 ready")
    assert web_boot > first("db-2 | db db-2 number 2 ready")
    vms = last_run(manifest)["vms"]
    # app waited until both copies had stopped ok
    assert seconds(vms["app"]["started"]) >= max(seconds(vms[f"db-{i}"]["stopped"])
                                                 for i in (1, 2))
    assert all(vms[n]["outcome"] == "ok" for n in ("db-1", "db-2", "web", "app"))
    assert (vms["bad"]["outcome"], vms["bad"]["reason"]) == ("failed", "panic")
    assert (vms["after"]["outcome"], vms["after"]["reason"]) == ("failed",
                                                                 "dependency bad failed")
    assert vms["after"]["started"] is None
    assert not any(line.startswith("after |") for line in out)  # never started
