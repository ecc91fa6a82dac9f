"""`vmrun up` on real guests: outcomes, exit statuses, signals and faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    REPO,
    Up,
    cmdline,
    driver_pid,
    last_run,
    processes,
    stack_qemus,
    stack_roots,
    vmrun,
    wait_until,
    write_stack,
)
from vmrun import cgroups
from vmrun.layout import StackPaths


@pytest.mark.timeout(180)
def test_hello_example(guest: Path, tmp_path: Path) -> None:
    example = REPO / "examples" / "hello" / "stack.toml"
    up = Up(example, "--state-dir", str(tmp_path / "state"))
    assert up.wait(150) == 0, up.stderr
    for vm in ("alpha", "beta", "gamma"):
        assert f"{vm} | hello from {vm}" in up.output
        assert (tmp_path / "state" / "hello" / "vms" / vm / "console.log").read_text().count(
            f"hello from {vm}") >= 1
    summary = up.output.split("\n\n")[-1] if "\n\n" in up.output else up.output
    assert "OUTCOME" in summary
    assert "Traceback" not in up.stderr


@pytest.mark.timeout(240)
def test_outcomes(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "good": {"cmdline": cmdline(say="ALL OK"), "success": "ALL OK"},
        "quiet": {"cmdline": cmdline(say="nothing to see"), "success": "ALL OK"},
        "bad": {"cmdline": cmdline(say="test FAIL here", action="hang"), "failure": "FAIL"},
        "panics": {"cmdline": cmdline(action="panic"), "timeout": 120},
        "hangs": {"cmdline": cmdline(action="hang"), "timeout": 12},
    })
    up = Up(manifest)
    assert up.wait(200) == 1, up.stderr
    vms = last_run(manifest)["vms"]
    assert vms["good"]["outcome"] == "ok", vms
    assert vms["quiet"] == vms["quiet"] | {"outcome": "failed",
                                           "reason": "success pattern missing"}
    assert vms["bad"]["outcome"] == "failed"
    assert vms["bad"]["reason"].startswith("failure pattern matched")
    assert (vms["panics"]["outcome"], vms["panics"]["reason"]) == ("failed", "panic")
    assert (vms["hangs"]["outcome"], vms["hangs"]["reason"]) == ("failed", "timeout after 12s")
    data = last_run(manifest)
    assert data["exit"] == 1 and data["stack"] == "t"
    # the panic was caught from the console within seconds, not by the 120 s timeout
    started = time.mktime(time.strptime(vms["panics"]["started"][:19], "%Y-%m-%dT%H:%M:%S"))
    stopped = time.mktime(time.strptime(vms["panics"]["stopped"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert stopped - started < 30
    assert "Kernel panic" in Path(vms["panics"]["console"]).read_text()
    assert not stack_qemus(manifest, list(vms))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_signal(guest: Path, tmp_path: Path, signum: int) -> None:
    manifest = write_stack(tmp_path, guest, {
        "one": {"cmdline": cmdline(action="hang")},
        "two": {"cmdline": cmdline(action="hang")},
    }, stop_timeout=20)
    up = Up(manifest)
    try:
        up.expect("one | guest: hanging", "two | guest: hanging", timeout=120)
        assert set(stack_qemus(manifest, ["one", "two"])) == {"one", "two"}
        up.proc.send_signal(signum)
        assert up.wait(60) == 128 + signum, up.stderr
    finally:
        up.kill()
    vms = last_run(manifest)["vms"]
    assert {v["outcome"] for v in vms.values()} == {"stopped"}
    # the guests were asked nicely (ACPI power button) and powered themselves off
    assert "one | guest: acpi power button" in up.output
    assert not stack_qemus(manifest, ["one", "two"])


@pytest.mark.timeout(180)
def test_stop_timeout_destroys_a_guest_that_ignores_acpi(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "deaf": {"cmdline": cmdline(action="hang", extra="guest.acpi=ignore")},
    }, stop_timeout=3)
    up = Up(manifest)
    try:
        up.expect("deaf | guest: hanging", timeout=120)
        start = time.monotonic()
        up.proc.send_signal(signal.SIGINT)
        assert up.wait(60) == 130, up.stderr
        took = time.monotonic() - start
    finally:
        up.kill()
    assert 3 <= took < 15
    assert last_run(manifest)["vms"]["deaf"]["outcome"] == "stopped"
    assert not stack_qemus(manifest, ["deaf"])


@pytest.mark.timeout(240)
def test_sigkill_supervisor_then_up_again(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {
        "one": {"cmdline": cmdline(action="hang")},
        "two": {"cmdline": cmdline(action="hang")},
    })
    up = Up(manifest)
    try:
        up.expect("one | guest: hanging", "two | guest: hanging", timeout=120)
        assert len(stack_qemus(manifest, ["one", "two"])) == 2
        up.proc.kill()
        took = wait_until(lambda: not stack_qemus(manifest, ["one", "two"]), timeout=5)
    finally:
        up.kill()
    print(f"QEMU gone {took:.2f}s after SIGKILL of the supervisor")
    # the state directory of the killed run is reused with no manual step
    write_stack(tmp_path, guest, {
        "one": {"cmdline": cmdline(say="again one")},
        "two": {"cmdline": cmdline(say="again two")},
    })
    again = Up(manifest)
    assert again.wait(120) == 0, again.stderr
    assert {v["outcome"] for v in last_run(manifest)["vms"].values()} == {"ok"}
    # the killed run's cgroups (libvirt had no chance to remove them) are gone too
    assert not cgroups.find(stack_roots(manifest, ["one", "two"]))


@pytest.mark.timeout(180)
def test_guests_run_outside_libvirts_cgroups(guest: Path, tmp_path: Path) -> None:
    """libvirt's cgroups are switched off (qemu.conf `cgroup_controllers = []`): moving
    QEMU and its vCPU thread into them cost ~45 ms of each start (docs/performance.md),
    and a killed run left them behind."""
    manifest = write_stack(tmp_path, guest, {"one": {"cmdline": cmdline(action="hang")}})
    up = Up(manifest)
    try:
        up.expect("one | guest: hanging", timeout=120)  # its vCPU thread has run
        qemu = stack_qemus(manifest, ["one"])["one"]
        tasks = [Path(f"/proc/{qemu}/task/{tid}/cgroup").read_text()
                 for tid in os.listdir(f"/proc/{qemu}/task")]
        assert not [text for text in tasks if "/machine" in text]
        assert not cgroups.find(stack_roots(manifest, ["one"]))
    finally:
        up.kill()


@pytest.mark.timeout(240)
def test_sigkill_supervisor_while_starting(guest: Path, tmp_path: Path) -> None:
    """The hard case: the supervisor dies while drivers are inside createXML."""
    manifest = write_stack(tmp_path, guest, {
        f"vm{i}": {"cmdline": cmdline(action="hang")} for i in range(3)
    })
    names = [f"vm{i}" for i in range(3)]
    up = Up(manifest, "--quiet")
    try:
        wait_until(lambda: stack_qemus(manifest, names), timeout=120, interval=0.01)
        up.proc.kill()
        wait_until(lambda: not stack_qemus(manifest, names), timeout=5)
    finally:
        up.kill()
    # A driver still inside createXML starts its QEMU late, and kills it as soon as
    # createXML returns: under load that can take seconds, but it does not stay.
    time.sleep(3)
    wait_until(lambda: not stack_qemus(manifest, names), timeout=15)
    # `down` removes what the killed run left, its guests' cgroups included
    down = vmrun("down", str(manifest))
    assert down.returncode == 0, down.stderr
    assert not cgroups.find(stack_roots(manifest, names))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("victim_process", ["driver", "qemu"])
def test_one_vm_killed_the_others_carry_on(guest: Path, tmp_path: Path,
                                           victim_process: str) -> None:
    manifest = write_stack(tmp_path, guest, {
        "victim": {"cmdline": cmdline(action="hang")},
        "other": {"cmdline": cmdline(say="other done", sleep=8)},
    })
    up = Up(manifest)
    try:
        up.expect("victim | guest: hanging", timeout=120)
        qemu = stack_qemus(manifest, ["victim"])["victim"]
        os.kill(driver_pid("victim", manifest) if victim_process == "driver" else qemu,
                signal.SIGKILL)
        assert up.wait(120) == 1, up.stderr
    finally:
        up.kill()
    vms = last_run(manifest)["vms"]
    reason = "driver died (killed by SIGKILL)" if victim_process == "driver" else "crashed"
    assert (vms["victim"]["outcome"], vms["victim"]["reason"]) == ("failed", reason)
    assert vms["other"]["outcome"] == "ok"
    assert "other | other done" in up.output
    assert not stack_qemus(manifest, ["victim"])
    assert not cgroups.find(stack_roots(manifest, ["victim", "other"]))

    # the state directory left behind is reused with no manual step
    again = Up(manifest)
    try:
        again.expect("victim | guest: hanging", timeout=120)
        again.proc.send_signal(signal.SIGTERM)
        assert again.wait(60) == 128 + signal.SIGTERM
    finally:
        again.kill()


def stack_zygotes(manifest: Path) -> list[int]:
    wanted = [b"vmrun.proc.zygote", os.fsencode(str(manifest.parent))]
    return [pid for pid, cmd in processes() if all(w in cmd for w in wanted)]


@pytest.mark.timeout(180)
def test_second_up_of_a_running_stack_exits_3(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {"one": {"cmdline": cmdline(action="hang")}})
    up = Up(manifest)
    try:
        up.expect("one | guest: hanging", timeout=120)
        before = stack_qemus(manifest, ["one"])
        zygotes, log = stack_zygotes(manifest), StackPaths(tmp_path / ".vmrun" / "t").zygote_log
        assert len(zygotes) == 1
        with open(log, "ab") as f:  # the running zygote's log is seldom written to: mark it
            f.write(b"written before the second run\n")
        log_before = os.stat(log)
        start = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "vmrun", "up", str(manifest)],
                                capture_output=True, text=True, timeout=30)
        assert time.monotonic() - start < 5
        assert second.returncode == 3
        assert f"already running (pid {up.proc.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        assert stack_qemus(manifest, ["one"]) == before  # untouched
        # The zygote the second run started before it found the stack locked is gone,
        # and so is its log; the running zygote's log is the same file, not truncated.
        assert stack_zygotes(manifest) == zygotes
        assert not Path(f"{log}.new").exists()
        assert os.stat(log).st_ino == log_before.st_ino
        assert b"written before the second run\n" in log.read_bytes()
        up.proc.send_signal(signal.SIGTERM)
        assert up.wait(60) == 128 + signal.SIGTERM
    finally:
        up.kill()


@pytest.mark.timeout(60)
def test_accel_kvm_on_a_host_without_kvm_exits_3(guest: Path, tmp_path: Path) -> None:
    from vmrun.host import kvm_problem

    if kvm_problem() is None:
        pytest.skip("KVM works on this host")
    manifest = write_stack(tmp_path, guest, {"one": {"cmdline": cmdline()}}, accel="kvm")
    proc = subprocess.run([sys.executable, "-m", "vmrun", "up", str(manifest)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3
    assert "KVM is unusable" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / ".vmrun").exists()


@pytest.mark.timeout(180)
def test_driver_log_holds_this_run_and_the_one_before(guest: Path, tmp_path: Path) -> None:
    manifest = write_stack(tmp_path, guest, {"a": {"cmdline": cmdline()}})
    vm_dir = tmp_path / ".vmrun" / "t" / "vms" / "a"
    for _ in range(3):
        proc = vmrun("up", "--quiet", str(manifest), timeout=120)
        assert proc.returncode == 0, proc.stderr
    texts = [(vm_dir / name).read_text() for name in ("driver.log", "driver.log.1")]
    for text in texts:
        assert text.count("--- vmrun driver log") == 1, text  # one run each
        assert "libvirt version: " in text, text  # libvirt's own messages (fd 2 of the fork)
    assert texts[0] != texts[1]  # two runs, not one run twice
    assert sorted(p.name for p in vm_dir.glob("driver.log*")) == ["driver.log", "driver.log.1"]
