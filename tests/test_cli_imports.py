"""The CLI's start-up: what `vmrun --help`, `vmrun ps` and `vmrun check` import.

These three have a start-up budget of 60 ms (docs/performance.md, bench/bench.py's `cli`
part); most of a start is imports.  Rather than timing them here, these tests pin what
each must not import: a change that makes one of them load the manifest parser, the
protocol's dataclasses, lxml or the like fails here, on any machine.  And the shortcuts
the command line takes (`vmrun check [FILE]` and `vmrun ps [FILE]` without argparse;
`vmrun VERB ...` with only that verb's parser) parse exactly as the full parser does.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from vmrun import cli, cliparse

# Runs cli.main(argv) in a fresh interpreter, then prints the forbidden modules it loaded.
RUN = """
import contextlib, io, sys
from vmrun.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        code = main({argv!r})
    except SystemExit as exc:
        code = exc.code
print(code, ",".join(sorted(m for m in {forbidden!r} if m in sys.modules)))
"""

# Never for any of the three.
HEAVY = ["lxml", "libvirt", "rich", "re2", "vmrun.supervisor", "vmrun.protocol", "vmrun.wire",
         "vmrun.watch", "vmrun.readiness", "vmrun.domain", "vmrun.nat", "vmrun.netns",
         "vmrun.images", "vmrun.access", "subprocess", "socket", "shutil", "difflib"]
# Not for `--help` nor `ps`: the manifest parser and what only it needs.
PARSER = ["vmrun.manifest", "vmrun.settings", "vmrun.collect", "vmrun.convert",
          "vmrun.fileconvert", "vmrun.interpolate", "vmrun.stackcheck", "vmrun.naming",
          "dataclasses", "inspect"]

PLAIN = """name = "plain"
accel = "tcg"
[defaults]
kernel = "vmlinuz"
memory = "256M"
timeout = 120
cmdline = 'console=ttyS0 quiet'
[vm.vm0]
[vm.web]
count = 2
"""


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    """A manifest like the benchmark's: no patterns, networks, NAT or XML; not running."""
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    path = tmp_path / "plain.toml"
    path.write_text(PLAIN)
    return path


def loaded(argv: list[str], forbidden: list[str], cwd: Path) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", RUN.format(argv=argv, forbidden=forbidden)],
                         capture_output=True, text=True, check=True, timeout=60, cwd=cwd)
    code, _, modules = out.stdout.strip().partition(" ")
    return code, modules


def test_help_imports_little(tmp_path: Path) -> None:
    forbidden = [*HEAVY, *PARSER, "vmrun.identity", "vmrun.operate", "tomllib", "typing",
                 "json", "hashlib"]
    assert loaded(["--help"], forbidden, tmp_path) == ("0", "")


def test_ps_of_a_stack_not_running_reads_no_manifest_parser(plain: Path) -> None:
    assert loaded(["ps", str(plain)], [*HEAVY, *PARSER, "argparse"], plain.parent) == \
        ("1", "")
    assert loaded(["ps", "--json", str(plain)], [*HEAVY, *PARSER], plain.parent) == ("1", "")


def test_ps_of_a_manifest_that_is_not_plain_still_works(plain: Path) -> None:
    """${VAR} in state_dir: the parser decides (and is imported)."""
    plain.write_text(PLAIN.replace('accel = "tcg"', 'state_dir = "${STATE:-.vmrun}"'))
    assert loaded(["ps", str(plain)], ["vmrun.manifest"], plain.parent) == \
        ("1", "vmrun.manifest")


def test_check_of_a_plain_manifest_imports_no_protocol(plain: Path) -> None:
    assert loaded(["check", str(plain)], [*HEAVY, "argparse"], plain.parent) == ("0", "")


def test_main_called_in_process_leaves_the_collector_alone(plain: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    """Only `vmrun check` and `vmrun ps` as the program run without it (see cli.QUICK)."""
    assert cli.main(["check", str(plain)]) == 0
    assert gc.isenabled()
    assert "ok: stack plain, 3 VM(s): vm0, web-1, web-2" in capsys.readouterr().out


def test_check_imports_what_a_manifest_needs(plain: Path) -> None:
    plain.write_text(PLAIN + 'success = "hello"\nnetworks = ["lan"]\n[network.lan]\n')
    assert loaded(["check", str(plain)], ["re2", "vmrun.watch", "vmrun.network"],
                  plain.parent) == ("0", "re2,vmrun.network,vmrun.watch")


# --- the plain forms, one verb's parser, or all of them ------------------------------------

ARGVS = [
    ["ps"], ["ps", "stack.toml"], ["ps", ""], ["ps", "a b"], ["check", "-"], ["ps", "-x"],
    ["ps", "--json", "x.toml"], ["ps", "--state-dir", "d"],
    ["ps", "--bogus"], ["ps", "a", "b"], ["ps", "--", "x"], ["ps", "--vers"],
    ["check"], ["check", "a.toml"], ["check", "a", "b"], ["render", "x.toml", "web"],
    ["pull"], ["up", "-q", "--progress", "plain", "--fresh", "x.toml"], ["up", "-dq"],
    ["up", "--detach", "--wait"], ["down", "--timeout", "3"], ["logs", "-f", "--tail", "5"],
    ["logs", "x.toml", "--tail", "5", "web", "db"], ["console", "web"], ["clean"],
    ["ssh", "web"], ["ssh", "--config"], ["ssh", "--wait", "5", "x.toml", "web"],
    ["exec", "web"], ["exec", "--from-driver", "web"], ["cp", "a", "web:/b"],
    ["cp", "-r", "x.toml", "a", "web:/b", "--wait", "1"], ["doctor", "--json"],
    ["doctor", "--state-dir", "s"], ["schema"], ["schema", "extra"],
]


Parse = Callable[[list[str]], tuple[argparse.Namespace, list[str]]]


def outcome(parse: Parse, argv: list[str]) -> tuple[object, ...]:
    """The namespace and leftovers, or the exit and what was printed."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args, extra = parse(argv)
    except SystemExit as exc:
        return exc.code, out.getvalue(), err.getvalue()
    return vars(args), extra


def whole(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    return cliparse.build_parser().parse_known_args(argv)


@pytest.mark.parametrize("argv", ARGVS, ids=" ".join)
def test_the_shortcuts_parse_as_the_whole_parser(argv: list[str]) -> None:
    expected = outcome(whole, argv)
    assert outcome(lambda a: cli.parse(a)[:2], argv) == expected
    assert outcome(lambda a: cliparse.parse(a)[:2], argv) == expected


def test_the_plain_forms_take_no_parser() -> None:
    for argv in (["check"], ["check", "x.toml"], ["ps"], ["ps", "x.toml"]):
        args, extra, parser = cli.parse(argv)
        assert parser is None and extra == []
        assert vars(args) == vars(whole(argv)[0])
    for verb, defaults in cli.QUICK.items():  # every option's value, as argparse gives it
        assert set(vars(whole([verb])[0])) == {"command", "file", *defaults}


@pytest.mark.parametrize("verb", list(cliparse.VERBS))
def test_a_verbs_own_parser_has_the_same_help(verb: str) -> None:
    expected = outcome(whole, [verb, "--help"])
    assert outcome(lambda a: cli.parse(a)[:2], [verb, "--help"]) == expected
    assert cliparse.verb_parser(verb).format_help() == expected[1]


def test_every_verb_has_a_command() -> None:
    assert sorted(cliparse.VERBS) == sorted(cli.COMMANDS)
    assert set(cli.QUICK) <= set(cli.COMMANDS)


def test_a_word_that_is_no_verb_gets_the_whole_parser() -> None:
    args, extra, parser = cliparse.parse(["schema"])
    assert parser is None and args.command == "schema" and extra == []
    for argv in ([], ["bogus"], ["--help"], ["-h"], ["--version"]):
        with contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
            cli.parse(argv)


@pytest.mark.parametrize("columns", [None, "", "abc", "0", "-3", "37", "250"])
def test_the_help_width_is_shutils(monkeypatch: pytest.MonkeyPatch,
                                   columns: str | None) -> None:
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert cliparse._terminal_columns() == shutil.get_terminal_size().columns
