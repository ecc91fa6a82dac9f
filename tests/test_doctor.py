"""`vmrun doctor`'s host checks, on this host (which can run guests, under TCG)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmrun import doctor, host
from vmrun.doctor import Check
from vmrun.errors import EXIT_HOST

pytestmark = pytest.mark.timeout(60)

NAMES = ["python", "libvirt-python", "libvirt", "libvirt-qemu-driver", "qemu", "qemu-img",
         "libvirt-qemu-account", "kvm", "state-dir", "fastsig", "short-roots"]


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Check]:
    state = tmp_path_factory.mktemp("doctor") / ".vmrun"
    return {c.name: c for c in doctor.run_checks(state)}


def test_every_check_runs_in_order(checks: dict[str, Check]) -> None:
    assert list(checks) == NAMES


def test_this_host_passes_every_required_check(checks: dict[str, Check]) -> None:
    failed = [c for c in checks.values() if c.required and not c.ok]
    assert failed == []
    assert doctor.exit_code(list(checks.values())) == 0


def test_versions_are_reported(checks: dict[str, Check]) -> None:
    assert checks["python"].detail.startswith("Python 3.")
    assert checks["libvirt-python"].detail.startswith("libvirt-python ")
    assert checks["libvirt"].detail.startswith("libvirt library ")
    assert "QEMU emulator version" in checks["qemu"].detail
    assert checks["qemu-img"].required  # disks need it


def test_kvm_is_optional_and_says_what_auto_picks(checks: dict[str, Check]) -> None:
    kvm = checks["kvm"]
    assert not kvm.required
    problem = host.kvm_problem()
    assert kvm.ok == (problem is None)
    if problem is None:
        assert 'will use kvm' in kvm.detail
    else:  # this project's hosts: the CPU shows neither vmx nor svm
        assert problem in kvm.detail and 'accel = "auto" will use tcg' in kvm.detail
        assert kvm.fix and kvm.status == "warn"


def test_kvm_unusable_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "kvm_problem", lambda: "/dev/kvm does not exist (no module)")
    kvm = doctor.check_kvm()
    assert (kvm.ok, kvm.required, kvm.status) == (False, False, "warn")
    assert "/dev/kvm does not exist" in kvm.detail and "will use tcg" in kvm.detail
    assert doctor.exit_code([kvm]) == 0


def test_accounts_required_only_as_root(checks: dict[str, Check]) -> None:
    assert checks["libvirt-qemu-account"].required == (os.geteuid() == 0)


def test_state_dir_existing_and_creatable(tmp_path: Path) -> None:
    existing = doctor.check_state_dir(tmp_path)
    assert existing.ok and "is writable" in existing.detail
    deep = doctor.check_state_dir(tmp_path / "a" / "b" / ".vmrun")
    assert deep.ok and f"can be created in {tmp_path}" in deep.detail
    assert not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []  # the probe file is removed


def test_state_dir_under_a_regular_file_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for path in (blocker, blocker / "state"):
        check = doctor.check_state_dir(path)
        assert not check.ok and check.required and check.status == "FAIL"
        assert f"{blocker} is not a directory" in check.detail
        assert check.fix and str(blocker) in check.fix
    checks = doctor.run_checks(blocker / "state")
    assert doctor.exit_code(checks) == EXIT_HOST == 3
    assert doctor.report_json(checks)["ok"] is False


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_state_dir_read_only(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        check = doctor.check_state_dir(tmp_path / ".vmrun")
    finally:
        tmp_path.chmod(0o700)
    assert not check.ok and "cannot create a file" in check.detail and check.fix


def test_state_dir_defaults_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    check = doctor.check_state_dir()
    assert check.ok and str(tmp_path / ".vmrun") in check.detail


def test_short_roots_too_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / ("x" * 40) / "vmrun"
    monkeypatch.setattr(doctor.layout, "short_root_base", lambda: base)
    check = doctor.check_short_roots()
    assert not check.ok and check.required and "too long" in check.detail and check.fix


def test_a_crashing_check_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> Check:
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "check_fastsig", boom)
    checks = {c.name: c for c in doctor.run_checks()}
    assert not checks["fastsig"].ok and "boom" in checks["fastsig"].detail
    assert doctor.exit_code(list(checks.values())) == EXIT_HOST


def test_exit_code_ignores_optional_failures() -> None:
    ok = Check("a", True, "fine")
    warn = Check("b", False, "meh", "do this", required=False)
    fail = Check("c", False, "broken", "do that")
    assert doctor.exit_code([ok, warn]) == 0
    assert doctor.exit_code([ok, warn, fail]) == 3
    assert doctor.exit_code([]) == 0


def test_report_json_shape(checks: dict[str, Check]) -> None:
    report = doctor.report_json(list(checks.values()))
    assert json.loads(json.dumps(report)) == report
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == NAMES
    for item in report["checks"]:
        assert set(item) == {"name", "ok", "status", "detail", "fix", "required"}
        assert isinstance(item["ok"], bool) and isinstance(item["required"], bool)
        assert item["status"] in {"ok", "FAIL", "warn"}
        assert item["fix"] is None or isinstance(item["fix"], str)


def test_format_table() -> None:
    table = doctor.format_table([
        Check("python", True, "Python 3.11.2"),
        Check("kvm", False, "KVM unusable", "enable it", required=False),
        Check("state-dir", False, "not writable", "chmod it"),
    ])
    assert table.splitlines() == [
        "ok    python     Python 3.11.2",
        "warn  kvm        KVM unusable",
        "                 fix: enable it",
        "FAIL  state-dir  not writable",
        "                 fix: chmod it",
    ]


def test_nothing_is_printed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    doctor.run_checks(tmp_path)
    assert capsys.readouterr() == ("", "")
