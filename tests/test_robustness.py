"""Odd input and awkward timing: errors instead of tracebacks, one stack never touching
another, a Ctrl-C that comes before the drivers are ready."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import Up, cmdline, last_run, processes, stack_qemus, vmrun, wait_until, write_stack


@pytest.mark.timeout(240)
def test_down_of_one_stack_leaves_a_similarly_named_one_alone(guest: Path,
                                                               tmp_path: Path) -> None:
    lab = write_stack(tmp_path, guest, {"box": {"cmdline": cmdline(action="hang")}},
                      name="lab")
    lab2 = write_stack(tmp_path, guest, {"box": {"cmdline": cmdline(action="hang")}},
                       name="lab2")
    try:
        assert vmrun("up", "-d", str(lab2)).returncode == 0
        before = stack_qemus(lab2, ["box"], name="lab2")
        for verb in ("down", "clean"):
            proc = vmrun(verb, str(lab))
            assert proc.returncode == 0, proc.stderr
            assert "killed" not in proc.stderr
        assert stack_qemus(lab2, ["box"], name="lab2") == before
        assert vmrun("ps", str(lab2)).returncode == 0
    finally:
        vmrun("down", "--timeout", "0", str(lab2))


@pytest.mark.timeout(180)
def test_ctrl_c_before_the_drivers_are_ready_is_stopped_not_failed(guest: Path,
                                                                   tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "one": {"cmdline": cmdline(action="hang")},
        "two": {"cmdline": cmdline(action="hang")},
    })
    up = Up(manifest, "--quiet")
    try:
        # as soon as the drivers exist, long before their guests boot
        wait_until(lambda: any(b"vmrun.proc.driver" in cmd and os.fsencode(str(tmp_path)) in cmd
                               for _, cmd in processes()), timeout=60, interval=0.005)
        up.proc.send_signal(signal.SIGINT)
        assert up.wait(60) == 130, up.stderr
    finally:
        up.kill()
    vms = last_run(manifest)["vms"]
    assert {v["outcome"] for v in vms.values()} == {"stopped"}, vms
    assert not stack_qemus(manifest, ["one", "two"])


def test_odd_input_is_an_error_not_a_traceback(guest: Path, tmp_path: Path) -> None:
    ok = write_stack(tmp_path, guest, {"a": {"cmdline": cmdline()}})
    cases: list[tuple[list[str], int, str]] = [
        (["down", "--timeout", "nan", str(ok)], 2, "--timeout takes"),
        (["down", "--timeout", "inf", str(ok)], 2, "--timeout takes"),
        (["down", "--timeout", "-5", str(ok)], 2, "--timeout takes"),
        (["logs", "--tail", "-1", str(ok)], 2, "--tail takes"),
        (["check", str(tmp_path)], 2, ""),
    ]
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    for verb in ("ps", "down", "logs", "clean"):
        cases.append(([verb, "--state-dir", str(blocked / "x"), str(ok)],
                      1 if verb == "ps" else 0, ""))
    dup = tmp_path / "dup.toml"
    dup.write_text(f'[defaults]\nkernel = "{guest}/vmlinuz"\n[vm.a]\ncount = 1\n[vm.a-1]\n')
    cases.append((["check", str(dup)], 2, 'two VMs are named "a-1"'))
    nets = tmp_path / "nets.toml"
    nets.write_text(f'[network.a]\nsubnet = "10.0.0.0/8"\n[network.b]\n'
                    f'[vm.x]\nkernel = "{guest}/vmlinuz"\n')
    cases.append((["check", str(nets)], 2, "no free default subnet"))
    envdir = tmp_path / "envdir"
    (envdir / ".env").mkdir(parents=True)
    (envdir / "s.toml").write_text(f'[vm.x]\nkernel = "{guest}/vmlinuz"\n')
    cases.append((["check", str(envdir / "s.toml")], 2, "cannot read .env"))
    for args, status, message in cases:
        proc = vmrun(*args)
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
        assert proc.returncode == status, (args, proc.returncode, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
