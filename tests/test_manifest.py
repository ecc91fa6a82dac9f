"""Manifest parsing and validation: every problem located by file, line and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmrun import manifest
from vmrun.errors import ManifestError, UsageError


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "initrd.gz").write_bytes(b"initrd")
    return tmp_path


def write(directory: Path, text: str, name: str = "stack.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as info:
        manifest.load(path)
    return [str(p) for p in info.value.problems]


def test_full_manifest(files: Path) -> None:
    path = write(files, """
name = "lab"
accel = "tcg"
stop_timeout = 3
state_dir = "state"

[defaults]
memory = "128M"
initrd = "initrd.gz"

[vm.alpha]
kernel = "vmlinuz"
cmdline = "console=ttyS0 quiet"
cpus = 2
timeout = 60
success = "ALL OK"
failure = "FAIL"

[vm.beta-2]
kernel = "vmlinuz"
memory = 300
""")
    stack = manifest.load(path)
    assert stack.name == "lab"
    assert stack.accel == "tcg"
    assert stack.stop_timeout == 3
    assert stack.state_dir == files / "state" / "lab"
    alpha, beta = stack.vms
    assert alpha.memory == 128 and alpha.cpus == 2 and alpha.timeout == 60
    assert alpha.kernel == files / "vmlinuz" and alpha.initrd == files / "initrd.gz"
    assert alpha.success == "ALL OK" and alpha.failure == "FAIL"
    assert beta.name == "beta-2" and beta.memory == 300 and beta.timeout is None
    assert beta.cmdline == "console=ttyS0"


def test_defaults_and_name_from_file(files: Path) -> None:
    stack = manifest.load(write(files, '[vm.a]\nkernel = "vmlinuz"\n', "my-stack.toml"))
    assert stack.name == "my-stack"
    assert stack.accel == "auto" and stack.stop_timeout == 10
    assert stack.state_dir == files / ".vmrun" / "my-stack"
    assert stack.vms[0].memory == 256 and stack.vms[0].cpus == 1


@pytest.mark.parametrize(("value", "mib"), [
    ("128", 128), (512, 512), ('"512M"', 512), ('"1G"', 1024), ('"65536K"', 64),
    ('"2GiB"', 2048),
])
def test_memory_sizes(files: Path, value: str, mib: int) -> None:
    stack = manifest.loads(f'[vm.a]\nkernel = "vmlinuz"\nmemory = {value}\n',
                           files / "s.toml", host_memory=1 << 20)
    assert stack.vms[0].memory == mib


def test_syntax_error_has_line(files: Path) -> None:
    path = write(files, '[vm.a]\nkernel = "vmlinuz"\nmemory = 12 34\n')
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:3: TOML syntax error")


@pytest.mark.parametrize(("body", "line", "key", "fragment"), [
    ('[vm.a]\nkernel = "vmlinuz"\nmemory = "lots"\n', 3, "vm.a.memory", 'found the string "lots"'),
    ('[vm.a]\nkernel = "vmlinuz"\nmemory = -5\n', 3, "vm.a.memory", "at least 16M"),
    ('[vm.a]\nkernel = "vmlinuz"\nmemory = "4096G"\n', 3, "vm.a.memory", "host's memory"),
    ('[vm.a]\nkernel = "vmlinuz"\ncpus = 0\n', 3, "vm.a.cpus", "from 1 to 64"),
    ('[vm.a]\nkernel = "vmlinuz"\ncpus = "two"\n', 3, "vm.a.cpus", "whole number"),
    ('[vm.a]\nkernel = "vmlinuz"\ntimeout = -1\n', 3, "vm.a.timeout", "greater than 0"),
    ('[vm.a]\nkernel = "vmlinuz"\nsuccess = "(("\n', 3, "vm.a.success", "regular expression"),
    ('[vm.a]\nkernel = "missing"\n', 2, "vm.a.kernel", "existing file"),
    ('[vm.a]\nkernel = "vmlinuz"\ninitrd = "nope.gz"\n', 3, "vm.a.initrd", "existing file"),
    ('[vm.a]\nkernel = "vmlinuz"\nmemroy = 128\n', 3, "vm.a.memroy", 'did you mean "memory"'),
    ('accel = "fast"\n[vm.a]\nkernel = "vmlinuz"\n', 1, "accel", '"auto", "kvm", "tcg"'),
    ('stop_timeout = "soon"\n[vm.a]\nkernel = "vmlinuz"\n', 1, "stop_timeout", "seconds"),
    ('name = "Bad Name"\n[vm.a]\nkernel = "vmlinuz"\n', 1, "name", "lower-case"),
    ('[vm.Alpha]\nkernel = "vmlinuz"\n', 1, "vm.Alpha", "invalid VM name"),
    ('[vm.a-very-long-name-indeed-yes]\nkernel = "vmlinuz"\n', 1, "vm.a-very", "at most 20"),
    ('[vm.a]\ncpus = 1\n', 1, "vm.a", "nothing to boot"),
    ('[vm.a]\nboot = "kernel"\n', 1, "vm.a", 'missing required key "kernel"'),
    ('[defaults]\nmemory = "x"\n[vm.a]\nkernel = "vmlinuz"\n', 2, "defaults.memory", "MiB"),
    ('name = "x"\n', None, "vm", "no VM"),
    ('[vm]\na = 1\n', 2, "vm.a", "expected a table"),
])
def test_bad_values(files: Path, body: str, line: int | None, key: str, fragment: str) -> None:
    path = write(files, body)
    found = problems(path)
    assert len(found) == 1, found
    where = f"{path}:{line}: " if line else f"{path}: "
    assert found[0].startswith(where + key), found
    assert fragment in found[0], found


def test_every_problem_is_reported(files: Path) -> None:
    path = write(files, """
accel = "fast"
[vm.a]
kernel = "vmlinuz"
memory = "lots"
cpus = 0
colour = "red"
""")
    found = problems(path)
    assert [p.split(": ")[1] for p in found] == ["accel", "vm.a.memory", "vm.a.cpus", "vm.a.colour"]


def test_paths_are_relative_to_the_manifest(files: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sub = files / "sub"
    sub.mkdir()
    path = write(sub, '[vm.a]\nkernel = "../vmlinuz"\n')
    monkeypatch.chdir("/")
    assert manifest.load(path).vms[0].kernel == files / "vmlinuz"


def test_missing_manifest(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path / "nope.toml")
    assert "no such manifest file" in problem


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmrun", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=60)


def test_cli_bad_manifest_exits_2_and_writes_nothing(files: Path) -> None:
    path = write(files, '[vm.a]\nkernel = "vmlinuz"\nmemory = "lots"\ncpus = 0\n')
    for command in ("check", "up"):
        proc = run_cli(command, str(path), cwd=files)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert lines[0].startswith(f"vmrun: error: {path}:3: vm.a.memory")
        assert lines[1].startswith(f"vmrun: error: {path}:4: vm.a.cpus")
        assert proc.stdout == ""
    assert not (files / ".vmrun").exists()


def test_cli_check_ok(files: Path) -> None:
    path = write(files, '[vm.a]\nkernel = "vmlinuz"\n[vm.b]\nkernel = "vmlinuz"\n')
    proc = run_cli("check", str(path), cwd=files)
    assert proc.returncode == 0, proc.stderr
    assert "2 VM(s): a, b" in proc.stdout


def test_cli_usage_error_exits_2(files: Path) -> None:
    proc = run_cli("frobnicate", cwd=files)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_docs_name_every_key() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "manifest.md").read_text()
    for setting in (*manifest.STACK_SETTINGS, *manifest.VM_SETTINGS):
        assert f"`{setting.key}`" in docs, setting.key


# --- load_identity and find_manifest ------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(REPO.glob("examples/*/stack.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_identity_agrees_with_load_on_the_examples(path: Path) -> None:
    stack = manifest.load(path)
    identity = manifest.load_identity(path)
    assert identity == stack.identity
    assert (identity.path, identity.name, identity.state_dir) == \
        (stack.path, stack.name, stack.state_dir)
    assert identity.vm_names == tuple(vm.name for vm in stack.vms)
    other = manifest.load_identity(path, state_dir="/tmp/elsewhere")
    assert other.state_dir == manifest.load(path, state_dir="/tmp/elsewhere").state_dir


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 3


COUNTED = '''name = "lab"
state_dir = "${STATE:-state}"
[defaults]
kernel = "vmlinuz"
count = 2
[vm.web]
[vm.db]
count = 1
[vm.solo]
count = 3
memory = "${MEM:-128M}"
'''


def test_identity_when_the_manifest_no_longer_validates(files: Path) -> None:
    path = write(files, COUNTED)
    stack = manifest.load(path)
    names = ("web-1", "web-2", "db-1", "solo-1", "solo-2", "solo-3")
    assert tuple(vm.name for vm in stack.vms) == names
    (files / "vmlinuz").unlink()  # the kernel was deleted
    assert any("existing file" in p for p in problems(path))
    identity = manifest.load_identity(path)
    assert identity == manifest.Identity(path.resolve(), "lab", files / "state" / "lab", names)
    assert identity.paths.dir == files / "state" / "lab"
    # and with bad values elsewhere: a missing image, an unknown key, an unset variable
    path.write_text(COUNTED.replace('memory = "${MEM:-128M}"', 'memory = "${MEM}"')
                    + 'disks = [{ image = "gone.qcow2" }]\ncolour = "red"\n[network.Bad]\n')
    assert manifest.load_identity(path) == identity


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ('name = "lab"\n[vm.a]\nkernel = \n', 3, "TOML syntax error"),
    ('name = "Lab"\n[vm.a]\n', 1, "lower-case"),
    ('name = "${NO_SUCH_VARIABLE_HERE}"\n[vm.a]\n', 1, "NO_SUCH_VARIABLE_HERE"),
    ('state_dir = 5\n[vm.a]\n', 1, "a string"),
    ('[vm.Alpha]\n', 1, "invalid VM name"),
    ('[vm.a]\ncount = 0\n', 2, "copies from 1 to 64"),
    ('[defaults]\ncount = "two"\n[vm.a]\n', 2, "copies from 1 to 64"),
    ('[vm.abcdefghijklmnopqr]\ncount = 10\n', 2, "too long"),
])
def test_identity_errors_name_the_file_and_line(files: Path, text: str, line: int,
                                                fragment: str) -> None:
    path = write(files, text)
    with pytest.raises(ManifestError) as info:
        manifest.load_identity(path)
    (problem,) = info.value.problems
    assert str(problem).startswith(f"{path}:{line}: "), str(problem)
    assert fragment in str(problem)


def test_identity_name_from_the_file_name(files: Path) -> None:
    identity = manifest.load_identity(write(files, "[vm.a]\n", "my-lab.toml"))
    assert (identity.name, identity.vm_names) == ("my-lab", ("a",))
    with pytest.raises(ManifestError) as info:
        manifest.load_identity(write(files, "[vm.a]\n", "My Lab.toml"))
    assert "the stack has no valid name" in str(info.value)


def test_identity_of_a_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such manifest file"):
        manifest.load_identity(tmp_path / "nope.toml")


def test_find_manifest(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        manifest.find_manifest(tmp_path)
    assert f"no stack.toml or vmrun.toml in {tmp_path}" in str(info.value)
    (tmp_path / "vmrun.toml").write_text("")
    assert manifest.find_manifest(tmp_path) == tmp_path / "vmrun.toml"
    (tmp_path / "stack.toml").write_text("")
    assert manifest.find_manifest(tmp_path) == tmp_path / "stack.toml"
