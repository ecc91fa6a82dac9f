"""The command line's grammar: every verb, its arguments and its help (vmrun/cli.py runs
them).  Only what argparse parses is here: `vmrun check [FILE]` and `vmrun ps [FILE]`,
the plain forms, are read without it (see cli.parse)."""

from __future__ import annotations

import argparse
import os
import sys

from vmrun import __version__
from vmrun.errors import EXIT_USAGE
from vmrun.layout import MANIFEST_NAMES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

SSH_WAIT = 180.0  # seconds `vmrun ssh`, `exec` and `cp` wait for a guest's host keys


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns (as argparse asks), without importing shutil."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns \
                if sys.__stdout__ is not None else 0
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's own, given the width it would find: argparse makes a formatter at every
    add_argument, and finding the width imports shutil (with bz2 and lzma), about 2 ms of
    every start."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> Any:  # argparse's exit status 2 matches ours
        self.print_usage(sys.stderr)
        print(f"vmrun: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


FILE_HELP = f"the stack's manifest (default: {' or '.join(MANIFEST_NAMES)} here)"
WAIT_HELP = (f"seconds to wait for the VM's SSH host keys, which cloud-init prints late "
             f"in the guest's first boot (default {SSH_WAIT:g})")


def _file(verb: argparse.ArgumentParser) -> None:
    verb.add_argument("file", nargs="?", help=FILE_HELP)


def _state_dir(verb: argparse.ArgumentParser,
               help: str = "the state directory the stack was started with") -> None:
    verb.add_argument("--state-dir", metavar="DIR", help=help)


def _stack(vms: str = "") -> Callable[[argparse.ArgumentParser], None]:
    """The arguments of a verb on a stack that may run: [FILE] (with VM names: `vms`)."""
    def add(verb: argparse.ArgumentParser) -> None:
        if vms:
            verb.add_argument("words", nargs=vms, metavar="[FILE] VM",
                              help=FILE_HELP + "; then the VM name(s)")
        else:
            _file(verb)
        _state_dir(verb)
    return add


def _render(verb: argparse.ArgumentParser) -> None:
    verb.add_argument("words", nargs="*", metavar="[FILE] [VM]",
                      help=FILE_HELP + "; then only this VM")


def _up(verb: argparse.ArgumentParser) -> None:
    _file(verb)
    _state_dir(verb, "keep state in DIR/<name>/ instead of the manifest's state_dir")
    verb.add_argument("-q", "--quiet", action="store_true",
                      help="do not stream consoles; print only the summary")
    verb.add_argument("--progress", choices=("auto", "tty", "plain"), default="auto",
                      help="live status table on a terminal (auto: unless NO_COLOR is set "
                           "or stdout is not a terminal), or plain prefixed lines")
    verb.add_argument("--fresh", action="store_true",
                      help="start every disk overlay and blank disk anew")
    verb.add_argument("-d", "--detach", action="store_true",
                      help="run in the background; return once every VM is running")
    verb.add_argument("--wait", action="store_true",
                      help="with --detach: return once every VM is ready (see `ready`)")


def _ps(verb: argparse.ArgumentParser) -> None:
    _stack()(verb)
    verb.add_argument("--json", action="store_true", help="print JSON")


def _down(verb: argparse.ArgumentParser) -> None:
    _stack()(verb)
    verb.add_argument("--timeout", type=float, metavar="S",
                      help="seconds each guest gets to shut down (default: stop_timeout)")


def _logs(verb: argparse.ArgumentParser) -> None:
    _stack(vms="*")(verb)
    verb.add_argument("-f", "--follow", action="store_true",
                      help="keep printing new output until the stack stops")
    verb.add_argument("--tail", type=int, metavar="N", help="only the last N lines of each VM")


def _ssh(verb: argparse.ArgumentParser) -> None:
    _stack(vms="*")(verb)
    verb.add_argument("--config", action="store_true",
                      help="print an ssh_config snippet (Host VM.STACK) for plain ssh, scp, "
                           "rsync, Ansible, VS Code")
    verb.add_argument("--wait", type=float, default=SSH_WAIT, metavar="S", help=WAIT_HELP)


def _exec(verb: argparse.ArgumentParser) -> None:
    _stack(vms="+")(verb)
    verb.add_argument("--wait", type=float, default=SSH_WAIT, metavar="S", help=WAIT_HELP)
    # a driver's `ready = { ssh = … }` check: from inside the stack's namespaces, where the
    # supervisor is not to be seen (and runs, since the driver does)
    verb.add_argument("--from-driver", action="store_true", help=argparse.SUPPRESS)


def _cp(verb: argparse.ArgumentParser) -> None:
    verb.add_argument("cp_words", nargs="+", metavar="[FILE] SRC DEST",
                      help=FILE_HELP + "; then SRC and DEST, one of them VM:PATH")
    verb.add_argument("-r", "--recursive", action="store_true", help="copy directories")
    _state_dir(verb)
    verb.add_argument("--wait", type=float, default=SSH_WAIT, metavar="S", help=WAIT_HELP)


def _doctor(verb: argparse.ArgumentParser) -> None:
    verb.add_argument("--json", action="store_true", help="print JSON")
    _state_dir(verb, "check this state directory (default: ./.vmrun)")


def _nothing(verb: argparse.ArgumentParser) -> None:
    pass


# Each verb: its help line and what adds its arguments, in the order `vmrun --help` lists.
VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "check": ("validate a manifest (exit 0 or 2)", _file),
    "render": ("print the domain XML vmrun would start", _render),
    "pull": ("fetch and verify every image of a stack ahead of time", _file),
    "up": ("start every VM, stream consoles, wait until all stopped", _up),
    "ps": ("show the state of each VM (exit 0 if the stack runs)", _ps),
    "down": ("stop a running stack, or clean up after a crashed one", _down),
    "logs": ("print the VMs' console output", _logs),
    "console": ("attach to a running VM's serial console (Ctrl-] leaves)", _stack(vms="+")),
    "clean": ("remove the stack's state (refused while it runs)", _stack()),
    "ssh": ("log in to a VM, or run one command there: ssh [FILE] VM [-- CMD...] (its exit "
            "status is passed through)", _ssh),
    "exec": ("run a command in a VM without a terminal, for scripts: exec [FILE] VM -- "
             "CMD... (stdout, stderr and exit status passed through)", _exec),
    "cp": ("copy files between the host and a VM: cp [FILE] SRC DEST, VM:PATH on one side",
           _cp),
    "doctor": ("check that this host can run guests", _doctor),
    "schema": ("print the manifest's JSON Schema", _nothing),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vmrun", description="Run a stack of QEMU guests from a TOML file.")
    parser.add_argument("--version", action="version", version=f"vmrun {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help, add_arguments) in VERBS.items():
        add_arguments(sub.add_parser(name, help=help))
    return parser


def verb_parser(name: str) -> argparse.ArgumentParser:
    """The parser build_parser() gives the verb `name` (prog "vmrun NAME"), on its own:
    what parses `vmrun NAME ...` without building the other verbs' parsers."""
    verb = _Parser(prog=f"vmrun {name}")
    VERBS[name][1](verb)
    return verb


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], argparse.ArgumentParser | None]:
    """What build_parser().parse_known_args(argv) returns, and the parser if one was built.

    When the first word is a verb, argparse hands everything after it to that verb's
    parser, and that is all that runs here: building every verb's parser costs some
    milliseconds of each start (tests/test_cli_imports.py checks that both ways agree)."""
    if argv and argv[0] in VERBS:
        args, extra = verb_parser(argv[0]).parse_known_args(argv[1:])
        args.command = argv[0]
        return args, extra, None
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    return args, extra, parser
