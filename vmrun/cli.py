"""The `vmrun` command.  The only module that prints or chooses exit codes."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, TextIO

from vmrun import __version__, domain, host, manifest
from vmrun.errors import EXIT_USAGE, UsageError, VmrunError
from vmrun.layout import StackPaths


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's exit status 2 matches ours
        self.print_usage(sys.stderr)
        print(f"vmrun: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vmrun", description="Run a stack of QEMU guests from a TOML file.")
    parser.add_argument("--version", action="version", version=f"vmrun {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    check = sub.add_parser("check", help="validate a manifest (exit 0 or 2)")
    check.add_argument("file")

    render = sub.add_parser("render", help="print the domain XML vmrun would start")
    render.add_argument("file")
    render.add_argument("vm", nargs="?", help="only this VM")

    up = sub.add_parser("up", help="start every VM, stream consoles, wait until all stopped")
    up.add_argument("file")
    up.add_argument("--state-dir", metavar="DIR",
                    help="keep state in DIR/<name>/ instead of the manifest's state_dir")
    up.add_argument("-q", "--quiet", action="store_true",
                    help="do not stream consoles; print only the summary")
    return parser


def cmd_check(args: argparse.Namespace) -> int:
    stack = manifest.load(args.file)
    names = ", ".join(vm.name for vm in stack.vms)
    print(f"{args.file}: ok: stack {stack.name}, {len(stack.vms)} VM(s): {names}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    stack = manifest.load(args.file)
    vms = stack.vms
    if args.vm is not None:
        vms = tuple(vm for vm in stack.vms if vm.name == args.vm)
        if not vms:
            raise UsageError(f'{args.file}: no VM named "{args.vm}"',
                             hint="VMs: " + ", ".join(vm.name for vm in stack.vms))
    accel = host.choose_accel(stack.accel)
    paths = StackPaths(stack.state_dir)
    for vm in vms:
        xml = domain.build(vm, accel.name, paths.vm(vm.name).console_socket)
        sys.stdout.write(domain.to_string(xml))
    return 0


class Printer:
    """Prints consoles prefixed by VM name, progress notes, and the summary."""

    def __init__(self, names: list[str], quiet: bool, out: TextIO = sys.stdout) -> None:
        self.width = max(len(n) for n in names)
        self.quiet = quiet
        self.out = out

    def note(self, text: str) -> None:
        print(f"vmrun: {text}", file=sys.stderr, flush=True)

    def __call__(self, vm: str, event: str, data: dict[str, Any]) -> None:
        if event == "console":
            if not self.quiet:
                try:
                    self.out.write(f"{vm:<{self.width}} | {data.get('line', '')}\n")
                    self.out.flush()
                except BrokenPipeError:
                    # The reader went away (`vmrun up | head`): keep running the stack.
                    os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())
                    self.quiet = True
        elif event == "probing":
            self.note("probing QEMU's capabilities (once per host and QEMU build)")
        elif event == "signal":
            name = signal.Signals(data["signal"]).name
            self.note(f"{name}: shutting every VM down")
        elif event == "result" and not self.quiet:
            reason = data.get("reason") or ""
            self.note(f"{vm} {data.get('outcome')}" + (f" ({reason})" if reason else ""))

    def summary(self, result: Any) -> None:
        rows = [("VM", "OUTCOME", "DURATION", "REASON")]
        for name, vm in result.vms.items():
            duration = f"{vm.duration:.1f}s" if vm.duration is not None else "-"
            rows.append((name, vm.outcome, duration, vm.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        self.out.write("\n")
        for row in rows:
            cells = [row[i].ljust(widths[i]) for i in range(3)] + [row[3]]
            self.out.write("  ".join(cells).rstrip() + "\n")
        self.out.flush()


def cmd_up(args: argparse.Namespace) -> int:
    from vmrun.supervisor import Supervisor

    stack = manifest.load(args.file, state_dir=args.state_dir)
    printer = Printer([vm.name for vm in stack.vms], args.quiet)
    result = Supervisor(stack, printer).run()
    printer.summary(result)
    return result.exit


COMMANDS = {"check": cmd_check, "render": cmd_render, "up": cmd_up}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except VmrunError as exc:
        for line in exc.lines():
            print(f"vmrun: error: {line}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:  # before any VM was started (afterwards SIGINT is handled)
        print("vmrun: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
