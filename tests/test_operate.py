"""Operating a stack from another shell: up --detach, ps, logs, down, clean."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Up, cmdline, last_run, stack_qemus, vmrun, wait_until, write_stack
from vmrun import client
from vmrun.layout import StackPaths


def stack_paths(manifest: Path, name: str = "t") -> StackPaths:
    return StackPaths(manifest.parent / ".vmrun" / name)


@pytest.mark.timeout(240)
def test_detach_ps_logs_down(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "web": {"cmdline": cmdline(say="web serving", action="hang"), "ready": "web serving"},
        "db": {"cmdline": cmdline(say="db up", action="hang"), "ready": "guest: hanging"},
    }, stop_timeout=20)
    try:
        up = vmrun("up", "--detach", "--wait", str(manifest))
        assert up.returncode == 0, up.stderr
        assert "is up" in up.stderr
        # --wait returned only once both were ready, i.e. had printed their marker
        for vm, marker in (("web", "web serving"), ("db", "guest: hanging")):
            log = (stack_paths(manifest).vm(vm).console_log).read_text()
            assert marker in log

        # the control socket is private
        paths = stack_paths(manifest)
        assert stat.S_IMODE(os.stat(paths.dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(paths.control_socket).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(paths.runtime).st_mode) == 0o700

        ps = vmrun("ps", "--json", str(manifest))
        assert ps.returncode == 0, ps.stderr
        data = json.loads(ps.stdout)
        assert data["running"] is True and data["stack"] == "t"
        assert {vm: v["state"] for vm, v in data["vms"].items()} == {"web": "ready",
                                                                     "db": "ready"}
        assert data["vms"]["web"]["accel"] == "tcg"
        assert set(stack_qemus(manifest, ["web", "db"])) == {"web", "db"}
        plain = vmrun("ps", str(manifest))
        assert plain.returncode == 0 and "web" in plain.stdout and "ready" in plain.stdout

        logs = vmrun("logs", str(manifest), "web")
        assert logs.returncode == 0
        assert "web | web serving" in logs.stdout and "db |" not in logs.stdout
        tail = vmrun("logs", str(manifest), "--tail", "1", "db")
        assert tail.stdout.strip().splitlines() == ["db | guest: hanging"]
        assert vmrun("logs", str(manifest), "nope").returncode == 2

        # logs -f follows until the stack stops, which `down` makes happen
        follow = subprocess.Popen([sys.executable, "-m", "vmrun", "logs", "-f", str(manifest)],
                                  stdout=subprocess.PIPE, text=True)
        start = time.monotonic()
        down = vmrun("down", str(manifest))
        assert down.returncode == 0, down.stderr
        assert time.monotonic() - start < 20  # the guests obeyed the power button
        assert not stack_qemus(manifest, ["web", "db"])
        out, _ = follow.communicate(timeout=30)
        assert follow.returncode == 0
        assert "web | guest: acpi power button" in out.replace("  |", " |")
    finally:
        vmrun("down", "--timeout", "0", str(manifest))

    vms = last_run(manifest)["vms"]
    assert {v["outcome"] for v in vms.values()} == {"stopped"}
    assert vms["web"]["reason"] == "stopped"  # shut down on the power button
    assert last_run(manifest)["exit"] == 0
    not_running = vmrun("ps", str(manifest))
    assert not_running.returncode == 1
    assert "not running" in not_running.stderr
    assert not stack_paths(manifest).control_socket.exists()


@pytest.mark.timeout(180)
def test_detach_reports_a_vm_that_fails_first(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "good": {"cmdline": cmdline(action="hang"), "ready": "never printed"},
        "bad": {"cmdline": cmdline(action="panic")},
    })
    try:
        up = vmrun("up", "-d", "--wait", str(manifest))
        assert up.returncode == 1
        assert "bad failed: panic" in up.stderr
    finally:
        vmrun("down", "--timeout", "0", str(manifest))


@pytest.mark.timeout(180)
def test_ready_timeout(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "slow": {"cmdline": cmdline(action="hang"), "ready": "never printed",
                 "ready_timeout": 8},
    })
    up = Up(manifest)
    assert up.wait(120) == 1
    assert last_run(manifest)["vms"]["slow"]["reason"] == "not ready after 8s"


@pytest.mark.timeout(240)
def test_down_and_clean_after_a_sigkilled_up(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {"one": {"cmdline": cmdline(action="hang")}})
    paths = stack_paths(manifest)
    up = Up(manifest)
    try:
        up.expect("one | guest: hanging", timeout=120)
        up.proc.kill()
        wait_until(lambda: not stack_qemus(manifest, ["one"]), timeout=5)
        # leave a stale control socket behind, as a crash would
        wait_until(lambda: client.lock_holder(paths) is None, timeout=10)
        assert (paths.control_socket).exists()
    finally:
        up.kill()
    ps = vmrun("ps", str(manifest))
    assert ps.returncode == 1  # the stale socket is not trusted ...
    assert "last run did not finish" in ps.stderr  # ... and the killed run is shown as such
    assert not (paths.control_socket).exists()  # ... but removed
    down = vmrun("down", str(manifest))
    assert down.returncode == 0 and "not running" in down.stderr

    clean = vmrun("clean", str(manifest))
    assert clean.returncode == 0, clean.stderr
    assert not paths.dir.exists()
    assert not paths.vm("one").root.exists()


@pytest.mark.timeout(180)
def test_clean_refuses_while_running(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {"one": {"cmdline": cmdline(action="hang")}})
    up = Up(manifest)
    try:
        up.expect("one | guest: hanging", timeout=120)
        clean = vmrun("clean", str(manifest))
        assert clean.returncode == 3
        assert f"is running (pid {up.proc.pid})" in clean.stderr
        assert stack_paths(manifest).dir.exists()
        up.proc.send_signal(signal.SIGTERM)
        assert up.wait(60) == 128 + signal.SIGTERM
    finally:
        up.kill()


def test_verbs_on_a_stack_that_never_ran(tmp_path: Path, guest: Path) -> None:
    manifest = write_stack(tmp_path, guest, {"one": {"cmdline": cmdline()}})
    assert vmrun("ps", str(manifest)).returncode == 1
    assert vmrun("down", str(manifest)).returncode == 0
    assert vmrun("logs", str(manifest)).returncode == 0
    assert vmrun("clean", str(manifest)).returncode == 0
    assert vmrun("up", "--wait", str(manifest)).returncode == 2


@pytest.mark.timeout(240)
def test_down_stops_a_stack_whose_manifest_no_longer_validates(guest: Path,
                                                               tmp_path: Path) -> None:
    # The manifest is ./stack.toml: the verbs find it without being told.
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes((guest / "vmlinuz").read_bytes())
    manifest = write_stack(tmp_path, guest, {
        "box": {"cmdline": cmdline(say="box up", action="hang"), "kernel": str(kernel),
                "ready": "box up"},
    }, name="stack")

    def here(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vmrun", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=200)

    try:
        up = here("up", "-d", "--wait")
        assert up.returncode == 0, up.stderr
        assert "using stack.toml" in up.stderr
        kernel.unlink()
        broken = here("check")
        assert broken.returncode == 2 and "vmlinuz" in broken.stderr, broken.stderr
        ps = here("ps", "--json")
        assert ps.returncode == 0, ps.stderr
        assert json.loads(ps.stdout)["vms"]["box"]["state"] == "ready"
        assert "box | box up" in here("logs", "box").stdout
        down = here("down")
        assert down.returncode == 0, down.stderr
        assert "stopped" in down.stderr
        assert not stack_qemus(manifest, ["box"], name="stack")
    finally:
        here("down", "--timeout", "0")
    vms = last_run(manifest, "stack")["vms"]
    assert (vms["box"]["outcome"], vms["box"]["reason"]) == ("stopped", "stopped")
    assert here("clean").returncode == 0
    assert not (tmp_path / ".vmrun" / "stack").exists()


def test_verbs_without_a_manifest_here(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "vmrun", "ps"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "no stack.toml or vmrun.toml" in out.stderr and "Traceback" not in out.stderr
