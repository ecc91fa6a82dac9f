"""Bad input never gives a traceback: every case is a ManifestError (exit 2) whose
problems name the file and, where there is one, the line; nothing is written."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from vmrun import domain, errors, manifest
from vmrun.errors import ManifestError, Problem, UsageError

pytestmark = pytest.mark.timeout(60)

VMRUN = Path(sys.executable).with_name("vmrun")
KERNEL = '[vm.a]\nkernel = "vmlinuz"\n'


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "user-data").write_text("#cloud-config\n")
    return tmp_path


def problems_of(directory: Path, text: str, name: str = "stack.toml",
                env: dict[str, str] | None = None) -> list[Problem]:
    path = directory / name
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        manifest.loads(text, path, environ=env or {}, host_memory=1 << 20)
    with pytest.raises(ManifestError) as again:  # load() reads the file: the same verdict
        manifest.load(path)
    assert [p.message for p in again.value.problems] == \
        [p.message for p in info.value.problems] or env
    for problem in info.value.problems:
        assert problem.file is not None, problem
    return info.value.problems


def only(directory: Path, text: str, line: int | None, fragment: str,
         env: dict[str, str] | None = None) -> Problem:
    found = problems_of(directory, text, env=env)
    assert len(found) == 1, [str(p) for p in found]
    assert found[0].line == line, str(found[0])
    assert fragment in str(found[0]), str(found[0])
    return found[0]


def _limit_memory() -> None:  # a vmrun that reads /dev/zero must fail, not eat the host
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def vmrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [str(VMRUN)] if VMRUN.exists() else [sys.executable, "-m", "vmrun"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=30, errors="surrogateescape", preexec_fn=_limit_memory)


def assert_cli_error(path: Path, where: str, cwd: Path) -> None:
    """`vmrun check` and `vmrun render` exit 2 with `vmrun: error: WHERE...`, write nothing."""
    for verb in ("check", "render"):
        proc = vmrun(verb, str(path), cwd=cwd)
        assert proc.returncode == 2, (verb, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith(f"vmrun: error: {where}"), (verb, proc.stderr)
        assert "\x1b" not in proc.stderr
        assert proc.stdout == ""
    assert not (cwd / ".vmrun").exists()


# --- 1. resource exhaustion, odd files ------------------------------------------------

@pytest.mark.parametrize("text", [
    "a = " + "[" * 3000 + "]" * 3000 + "\n",
    "a = " + "{ b = " * 3000 + "1" + " }" * 3000 + "\n",
    ".".join(["a"] * 3000) + " = 1\n",
    "[" + ".".join(["a"] * 3000) + "]\n",
], ids=["arrays", "inline-tables", "dotted-key", "header"])
def test_deep_nesting(files: Path, text: str) -> None:
    problem = only(files, KERNEL + text, 3, "nests tables, arrays or keys too deeply")
    assert problem.expected == f"at most {manifest.MAX_NESTING} levels"


def test_deep_nesting_cli(files: Path) -> None:
    path = files / "stack.toml"
    path.write_text(KERNEL + "x = " + "[" * 3000 + "]" * 3000 + "\n")
    assert_cli_error(path, f"{path}:3: ", files)


@pytest.mark.parametrize(("value", "fragment"), [
    ("1" + "0" * 400, "host's memory"),
    ("-1" + "0" * 400, "at least 16M"),
    ('"' + "9" * 5000 + 'M"', "host's memory"),
    ('"' + "9" * 40 + 'K"', "host's memory"),
])
def test_huge_sizes(files: Path, value: str, fragment: str) -> None:
    problem = only(files, KERNEL + f"memory = {value}\n", 3, fragment)
    assert problem.key == "vm.a.memory"
    assert len(str(problem)) < 400  # the value is not echoed in full


def test_huge_disk_size(files: Path) -> None:
    only(files, KERNEL + 'disks = [{ size = "' + "9" * 5000 + 'G" }]\n', 3, "1M to 64T")
    only(files, KERNEL + "disks = [{ size = 1" + "0" * 400 + " }]\n", 3, "1M to 64T")


def test_integer_beyond_pythons_digit_limit(files: Path) -> None:
    problem = only(files, KERNEL + "memory = 1" + "0" * 5000 + "\n", 3, "too many digits")
    assert problem.found == "5001 digits"


def test_huge_numbers_elsewhere(files: Path) -> None:
    big = "1" + "0" * 400
    found = problems_of(files, f"stop_timeout = {big}\n" + KERNEL
                        + f"cpus = {big}\ncount = {big}\ntimeout = -{big}\n"
                        + f"[network.lan]\nsubnet = {big}\n")
    assert [(p.key, p.line) for p in found] == [
        ("stop_timeout", 1), ("vm.a.cpus", 4), ("vm.a.count", 5), ("vm.a.timeout", 6),
        ("network.lan.subnet", 8)]


@pytest.mark.parametrize("text", [
    'kernel = "vm\\u0000linuz"', 'kernel = "~\\u0000"', 'initrd = "\\u0000"',
    'disks = [{ image = "a\\u0000b" }]', 'cloud_init = { user_data = "\\u0000" }',
])
def test_nul_in_paths(files: Path, text: str) -> None:
    body = '[vm.a]\nkernel = "vmlinuz"\n' + text + "\n"
    found = problems_of(files, body)
    assert [p.line for p in found] == [3] * len(found) or \
        [p.line for p in found] == [2], [str(p) for p in found]
    assert all("\x00" not in str(p) for p in found)


def test_nul_in_the_manifest_path(files: Path) -> None:
    with pytest.raises(ManifestError) as info:
        manifest.load(files / "a\x00b.toml")
    assert "NUL" in str(info.value) and "\x00" not in str(info.value)


def test_path_component_too_long(files: Path) -> None:
    long = "x" * 300
    only(files, f'[vm.a]\nkernel = "{long}/vmlinuz"\n', 2, "File name too long")
    only(files, KERNEL + f'disks = [{{ image = "{long}" }}]\n', 3, "an existing file")
    only(files, KERNEL + f'cloud_init = {{ user_data = "{long}" }}\n', 3, "an existing file")
    with pytest.raises(ManifestError) as info:
        manifest.load(files / long / "stack.toml")
    assert "File name too long" in str(info.value)


def test_image_that_cannot_be_read(files: Path) -> None:
    only(files, KERNEL + 'disks = [{ image = "/proc/self/mem" }]\n', 3, "Input/output error")


def test_symlink_loop(files: Path) -> None:
    (files / "loop").symlink_to("loop")
    only(files, '[vm.a]\nkernel = "loop"\n', 2, "symbolic link loop")
    only(files, 'state_dir = "loop/x"\n' + KERNEL, 1, "symbolic link loop")


def test_manifest_that_is_not_a_regular_file(files: Path) -> None:
    fifo = files / "fifo.toml"
    os.mkfifo(fifo)
    for path in (fifo, files):  # /dev/zero only in a process with a memory limit
        with pytest.raises(ManifestError) as info:
            manifest.load(path)
        (problem,) = info.value.problems
        assert str(problem) == f"{path}: cannot read the manifest (not a regular file)"
    for path in (Path("/dev/zero"), fifo, files):
        proc = vmrun("check", str(path), cwd=files)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr == f"vmrun: error: {path}: cannot read the manifest " \
                              "(not a regular file)\n"


def test_manifest_too_large(files: Path) -> None:
    path = files / "stack.toml"
    path.write_text(KERNEL + "#" * manifest.MANIFEST_MAX)
    with pytest.raises(ManifestError) as info:
        manifest.load(path)
    assert "larger than 1024 KiB" in str(info.value)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory", "huge"])
def test_env_file_that_cannot_be_read(files: Path, kind: str) -> None:
    env = files / ".env"
    if kind == "dev-zero":
        env.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(env)
    elif kind == "directory":
        env.mkdir()
    else:
        env.write_text("A=1\n" * (1 << 19))
    if kind != "dev-zero":  # only in a process with a memory limit
        (problem,) = problems_of(files, KERNEL)
        assert problem.file == env and str(problem).startswith(f"{env}: cannot read .env (")
    (files / "stack.toml").write_text(KERNEL)
    assert_cli_error(files / "stack.toml", f"{env}: cannot read .env", files)


# --- 2. control characters that libvirt's XML cannot hold ------------------------------

XML_CASES = [
    ('cmdline = "console=ttyS0 \\u001b[31m"', "vm.a.cmdline"),
    ('cmdline = "a\\u0000"', "vm.a.cmdline"),
    ('cmdline = "a\\uFFFE"', "vm.a.cmdline"),
    ('success = "ok\\u0007"', "vm.a.success"),
    ('xml_devices = "<rng model=\'virtio\'>\\u0001</rng>"', "vm.a.xml_devices"),
    ('disks = [{ image = "vmlinuz\\u0002", readonly = true }]', "vm.a.disks"),
    ('cloud_init = { user_data = "user-data\\u0003" }', "vm.a.cloud_init"),
    ('depends_on = { "b\\u0004" = "ok" }', "vm.a.depends_on"),
    ('networks = ["l\\u0005"]', "vm.a.networks"),
    ('forward = ["80:80\\u0006"]', "vm.a.forward"),
]


@pytest.mark.parametrize(("text", "key"), XML_CASES, ids=[k for _, k in XML_CASES])
def test_strings_libvirt_cannot_hold_are_refused_by_check(files: Path, text: str,
                                                         key: str) -> None:
    problem = only(files, KERNEL + text + "\n", 3, "libvirt's XML can hold")
    assert problem.key == key


def test_control_characters_are_refused_at_the_top_and_in_defaults(files: Path) -> None:
    found = problems_of(files, 'state_dir = "s\\u0001"\n[defaults]\ncmdline = "\\u001f"\n'
                        + KERNEL)
    assert [(p.key, p.line) for p in found] == [("state_dir", 1), ("defaults.cmdline", 3)]


def test_control_characters_from_the_environment(files: Path) -> None:
    for value in ("\x1b[2J", "\udcff"):  # a surrogate: a non-UTF-8 byte in the environment
        only(files, KERNEL + 'cmdline = "x=${X}"\n', 3, "libvirt's XML can hold",
             env={"X": value})


def test_render_of_a_control_character_is_exit_2(files: Path) -> None:
    path = files / "stack.toml"
    path.write_text(KERNEL + 'cmdline = "console=ttyS0 \\u0001"\n')
    assert_cli_error(path, f"{path}:3: vm.a.cmdline: ", files)


def test_manifest_directory_with_a_control_character(files: Path) -> None:
    odd = files / "a\x01b"
    odd.mkdir()
    (problem,) = problems_of(odd, '[vm.a]\nkernel = "../vmlinuz"\n')
    assert "control characters" in str(problem) and "\x01" not in str(problem)


def test_tab_and_newline_are_fine(files: Path) -> None:
    path = files / "stack.toml"
    stack = manifest.loads(KERNEL + 'cmdline = "a\\tb\\nc"\n', path, environ={},
                           host_memory=1 << 20)
    xml = domain.to_string(domain.build(stack.vms[0], "tcg", Path("/c.sock")))
    assert "<cmdline>a\tb\nc</cmdline>" in xml


# --- 3. every error names the file and, where there is one, the line -------------------

def test_syntax_error_at_the_end_of_the_file(files: Path) -> None:
    only(files, KERNEL + "memory = ", 3, "at the end of the file")
    only(files, KERNEL + 'cmdline = """abc\n\n', 3, "at the end of the file")


def test_invalid_stack_name_from_the_file_name(files: Path) -> None:
    path = files / "Bad Name.toml"
    path.write_text(KERNEL)
    with pytest.raises(ManifestError) as info:
        manifest.load(path)
    (problem,) = info.value.problems
    assert str(problem).startswith(f"{path}: the stack has no valid name")


def test_no_vm(files: Path) -> None:
    assert str(only(files, 'name = "x"\n', None, "no VM")).startswith(
        f"{files / 'stack.toml'}: vm: the stack has no VM")
    only(files, 'name = "x"\nvm = {}\n', 2, "no VM")


def test_manifest_that_is_not_utf8(files: Path) -> None:
    path = files / "stack.toml"
    path.write_bytes(KERNEL.encode() + b'cmdline = "caf\xe9"\n')
    with pytest.raises(ManifestError) as info:
        manifest.load(path)
    (problem,) = info.value.problems
    assert (problem.line, problem.found) == (3, "the byte 0xe9 (column 15)")
    assert_cli_error(path, f"{path}:3: the manifest is not UTF-8 text", files)


def test_env_file_that_is_not_utf8(files: Path) -> None:
    (files / ".env").write_bytes(b"A=1\nB=\xff\n")
    (problem,) = problems_of(files, KERNEL)
    assert (problem.file, problem.line) == (files / ".env", 2)


@pytest.mark.parametrize(("text", "line", "key"), [
    ('[vm."nul\\u0000"]\nkernel = "vmlinuz"\n', 1, "vm.nul\x00"),
    ('[vm."a b"]\nkernel = "vmlinuz"\n', 1, "vm.a b"),
    ('vm."a b".kernel = "vmlinuz"\n', 1, "vm.a b"),
    ("# comment\n[ vm . 'A' ]\nkernel = 'vmlinuz'\n", 2, "vm.A"),
    ('[vm."a\\"]"]\nkernel = "vmlinuz"\n', 1, 'vm.a"]'),
])
def test_escaped_and_quoted_keys_are_located(files: Path, text: str, line: int,
                                             key: str) -> None:
    problem = only(files, text, line, "invalid VM name")
    assert problem.key == key


def test_implicit_tables_are_located(files: Path) -> None:
    found = problems_of(files, "\n[vm.alpha.disks]\nx = 1\n")
    # (whether alpha has something to boot depends on its disks: not reported)
    assert [(p.key, p.line) for p in found] == [("vm.alpha.disks", 2)]
    found = problems_of(files, "name = 'x'\nvm.alpha.cpus = 2\n")
    assert [(p.key, p.line) for p in found] == [("vm.alpha", 2)]


def test_locate_keys() -> None:
    source = '''a = 1
"b.c" = 2
'd' . "e\\u0041" = 3
text = """
[not.a.header]
x = 1
"""
[t . "u v"]
arr = [
  { k = 1 },
  "x = 2",  # [comment]
  [3, { m = 4 }],
]
inline = { p.q = 1, r = [ ], s = { t = 'v' } }
[[aot]]
z = 1
'''
    lines = manifest.locate_keys(source)
    assert lines[("a",)] == 1
    assert lines[("b.c",)] == 2
    assert lines[("d", "eA")] == 3 and lines[("d",)] == 3
    assert lines[("text",)] == 4
    assert ("not", "a", "header") not in lines and ("x",) not in lines
    assert lines[("t", "u v")] == 8 and lines[("t",)] == 8
    assert lines[("t", "u v", "arr")] == 9
    assert lines[("t", "u v", "arr", "0", "k")] == 10
    assert lines[("t", "u v", "arr", "1")] == 11
    assert lines[("t", "u v", "arr", "2", "1", "m")] == 12
    assert lines[("t", "u v", "inline", "p", "q")] == 14
    assert lines[("t", "u v", "inline", "s", "t")] == 14
    assert lines[("aot", "z")] == 16


def test_locate_keys_never_fails_on_broken_text() -> None:
    for text in ['[a', 'a = "x', "a = '''x", 'a = [1, 2', "= 1", "[[a]", "a = {b = ",
                 "a.\n", '"a\\', "x = [\n" * 50, "\x00[\x00", "a = 1 2 3 ] }"]:
        assert isinstance(manifest.locate_keys(text), dict)


# --- 4. input echoed in messages is escaped -------------------------------------------

def test_terminal_escapes_are_escaped_in_messages(files: Path) -> None:
    found = problems_of(files, KERNEL + '"\\u001b[2J" = 1\nmemory = "\\u001b]0;x\\u0007"\n')
    text = "\n".join(str(p) for p in found)
    assert "\x1b" not in text and "\x07" not in text
    assert "vm.a.\\x1b[2J: unknown key" in text
    assert '"\\x1b]0;x\\x07"' in text
    path = files / "stack.toml"
    proc = vmrun("check", str(path), cwd=files)
    assert proc.returncode == 2 and "\x1b" not in proc.stderr and "\\x1b[2J" in proc.stderr


def test_printable() -> None:
    assert errors.printable("a\x1bb\nc\td\x9be\u202ef\udcff") == \
        "a\\x1bb\\nc\\td\\x9be\\u202ef\\udcff"
    assert errors.printable("été ✓") == "été ✓"
    problem = Problem("m\x1b", file=Path("/x\x01"), line=3, key="k\x07", expected="e\x1b",
                      found="f\x1b", hint="h\x1b")
    assert str(problem) == "/x\\x01:3: k\\x07: m\\x1b: expected e\\x1b, found f\\x1b\n" \
                           "  hint: h\\x1b"
    assert UsageError("no VM named \x1b[2J\nsecond line").lines() == \
        ["no VM named \\x1b[2J\nsecond line"]


# --- 5. papercuts ----------------------------------------------------------------------

def test_disks_are_numbered_from_0(files: Path) -> None:
    problem = only(files, KERNEL + 'disks = [{ size = "1G" }, { size = "x" }]\n', 3,
                   "invalid value in disks[1]")
    assert problem.key == "vm.a.disks"


def test_checks_across_vms_run_on_vms_with_other_problems(files: Path) -> None:
    found = problems_of(files, '''[vm.a]
kernel = "vmlinuz"
memory = "lots"
forward = ["80:80"]
[vm.b]
kernel = "vmlinuz"
cpus = 0
depends_on = ["a", "zz"]
cmdline = "{nope}"
[vm.c]
kernel = "missing"
networks = ["nowhere"]
''')
    assert [(p.key, p.message.split(":")[0]) for p in found] == [
        ("vm.a.memory", "invalid value"),
        ("vm.b.cpus", "invalid value"),
        ("vm.c.kernel", "invalid value"),
        ("vm.b.depends_on", 'unknown VM "zz"'),  # not "a": a exists, with a problem
        ("vm.a.forward", "a forward needs a network"),
        ("vm.c.networks", 'unknown network "nowhere"'),
        ("vm.b.cmdline", "invalid placeholder"),
    ]


def test_no_spurious_problems_from_values_already_reported(files: Path) -> None:
    found = problems_of(files, '''[network.Bad]
[vm.Web]
kernel = "vmlinuz"
count = 2
[vm.db]
kernel = "vmlinuz"
count = "two"
[vm.app]
kernel = "vmlinuz"
networks = ["Bad", 5]
forward = ["80:80"]
depends_on = ["Web-1", "db-2"]
cmdline = "{net.Bad.ip} {vm.db-1.net.lan.ip}"
''')
    assert [p.key for p in found] == ["vm.Web", "vm.db.count", "vm.app.networks",
                                      "network.Bad"]


def test_no_tomli_fallback() -> None:
    package = Path(manifest.__file__).parent
    assert not [p.name for p in package.rglob("*.py") if "import tomli " in p.read_text()]


# --- bounded work: a 1 MiB manifest cannot make vmrun run for minutes -------------------

def test_at_most_1024_vms(files: Path) -> None:
    tables = "".join(f"[vm.a{i}]\ncount = 64\n" for i in range(5000))
    problem = only(files, '[defaults]\nkernel = "vmlinuz"\n' + tables, 35, "more than 1024 VMs")
    assert problem.key == "vm.a16"
    problem = only(files, '[defaults]\nkernel = "vmlinuz"\n'
                   + "".join(f"[vm.a{i}]\n" for i in range(1100)), 1027, "more than 1024 VMs")


def test_at_most_256_networks(files: Path) -> None:
    nets = "".join(f'[network.n{i}]\nsubnet = "10.{i // 256}.{i % 256}.0/24"\n'
                   for i in range(3000))
    only(files, KERNEL + nets, 515, "more than 256 networks")
    only(files, KERNEL + "networks = [" + ", ".join(f'"n{i}"' for i in range(300)) + "]\n",
         3, "at most 256 networks")


def test_long_dependency_lists(files: Path) -> None:
    only(files, KERNEL + "depends_on = [" + ", ".join(f'"z{i}"' for i in range(2000)) + "]\n",
         3, "at most 1024 VM names")


def test_at_most_100_problems_then_a_count(files: Path) -> None:
    found = problems_of(files, KERNEL + "".join(f"x{i} = 1\n" for i in range(150)))
    assert len(found) == 101
    assert str(found[-1]) == f"{files / 'stack.toml'}: and 50 more problems\n" \
                             "  hint: fix these first"


def test_copies_report_a_problem_once(files: Path) -> None:
    found = problems_of(files, KERNEL + 'count = 3\nnetworks = ["nowhere"]\n'
                        'forward = ["80:80", "81:81"]\n[vm.b]\nkernel = "vmlinuz"\n'
                        'count = 2\nforward = ["82:80"]\ndepends_on = ["zz", "zz"]\n')
    assert [p.message for p in found] == [
        'unknown VM "zz"', 'unknown network "nowhere"',
        "host port 127.0.0.1:80 is already forwarded to a-1", "a forward needs a network"]


# --- patterns: RE2 syntax, nothing that needs backtracking ------------------------------

@pytest.mark.parametrize(("key", "pattern", "hint"), [
    ("success", r"(a)\1", "no backreferences or lookaround"),
    ("failure", r"(?P<word>\w+) (?P=word)", "no backreferences or lookaround"),
    ("ready", r"listening(?= on)", "no backreferences or lookaround"),
    ("success", r"(?<!not )ok", "no backreferences or lookaround"),
    ("success", r"done\Z", "write $"),
    ("success", ".{0,300}", "count less"),
], ids=["backreference", "named-backreference", "lookahead", "lookbehind", "Z", "too-large"])
def test_patterns_re2_refuses(files: Path, key: str, pattern: str, hint: str) -> None:
    problem = only(files, KERNEL + f"{key} = '{pattern}'\n", 3, "regular expression")
    assert problem.key == f"vm.a.{key}"
    assert problem.expected is not None and "RE2" in problem.expected
    assert problem.hint is not None and hint in problem.hint


def test_backreference_and_lookahead_are_exit_2_with_the_line(files: Path) -> None:
    path = files / "stack.toml"
    for pattern in (r"(a)\1", "ok(?=!)"):
        path.write_text(KERNEL + "timeout = 5\n" + f"success = '{pattern}'\n")
        assert_cli_error(path, f"{path}:4: vm.a.success: invalid value: expected a regular "
                         "expression in RE2 syntax (Python `re` syntax without backreferences "
                         "or lookaround)", files)


def test_patterns_re2_accepts(files: Path) -> None:
    patterns = [r"(a+)+$", r"^guest: \d+ ok$", r"(?i)all ok", r"\x1b\[31mFAIL", r"\pL+ done",
                r"(?P<n>ready)", r"end\z", ".{0,200}"]
    text = KERNEL + "".join(f"[vm.p{i}]\nkernel = 'vmlinuz'\nsuccess = '{p}'\n"
                            for i, p in enumerate(patterns))
    stack = manifest.loads(text, files / "stack.toml", environ={}, host_memory=1 << 20)
    assert [vm.success for vm in stack.vms[1:]] == patterns
