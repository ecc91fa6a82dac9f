"""The `vmrun` command.  The only module that prints or chooses exit codes."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from vmrun.errors import EXIT_USAGE, UsageError, VmrunError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any, TextIO

    from vmrun import manifest
    from vmrun.identity import Identity

# Each verb imports what it needs when it runs: `vmrun --help` and the light verbs
# start without loading lxml, the manifest parser or the supervisor, and `--help`,
# `ps` and `check` have a start-up budget of 60 ms (docs/performance.md; the imports
# each loads are pinned by tests/test_cli_imports.py).  Not even argparse (the command
# line's grammar is vmrun/cliparse.py), json, typing or dataclasses are imported here.

# The quick verbs, over in tens of milliseconds, and the values argparse gives their
# options when none is given.  Their plain forms, `vmrun check [FILE]` and `vmrun ps
# [FILE]`, are read without importing argparse and building a parser: 5 ms of their start
# (tests/test_cli_imports.py checks that argparse agrees).  Run as the program (main()
# given no argv), they do without the cycle collector: its passes over every module they
# import, and its last one at exit, cost them 4-6 ms, and nothing they make needs to be
# collected before they end.
QUICK: dict[str, dict[str, Any]] = {"check": {}, "ps": {"state_dir": None, "json": False}}


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], argparse.ArgumentParser | None]:
    """What cliparse.build_parser().parse_known_args(argv) returns, and the parser if one
    was built."""
    if argv and argv[0] in QUICK and len(argv) <= 2 and \
            not any(word.startswith("-") for word in argv[1:]):
        plain = SimpleNamespace(file=argv[1] if len(argv) == 2 else None, **QUICK[argv[0]],
                                command=argv[0])
        return plain, [], None  # type: ignore[return-value]  # read like argparse's
    from vmrun import cliparse

    return cliparse.parse(argv)


def _is_file_word(word: str) -> bool:
    """A path, not a VM name (VM names have no "." or "/")."""
    return "." in word or "/" in word or os.path.isfile(word)


def resolve_file(args: argparse.Namespace) -> None:
    """Fill args.file (and args.vms) from the positional words; default to the manifest
    in the current directory, and say which one it is."""
    from vmrun.identity import find_manifest

    words = list(getattr(args, "words", None) or [])
    if hasattr(args, "words"):
        args.file = words.pop(0) if words and _is_file_word(words[0]) else None
        args.vms = words
    if args.file is None:
        args.file = os.path.relpath(find_manifest(Path.cwd()))
        print(f"vmrun: using {args.file}", file=sys.stderr)


def load(args: argparse.Namespace) -> manifest.Stack:
    """The manifest, checked as far as it can be before anything starts."""
    from vmrun import manifest

    stack = manifest.load(args.file, state_dir=getattr(args, "state_dir", None))
    if any(vm.xml_devices for vm in stack.vms):  # else domain.validate has nothing to do
        from vmrun import domain  # lxml

        domain.validate(stack)
    return stack


def identity(args: argparse.Namespace) -> Identity:
    """What ps, down, logs, console and clean need: works on a manifest that no longer
    validates (vmrun/identity.py, without the manifest parser when it can)."""
    from vmrun.identity import load_identity

    return load_identity(args.file, state_dir=args.state_dir)


def cmd_check(args: argparse.Namespace) -> int:
    stack = load(args)
    names = ", ".join(vm.name for vm in stack.vms)
    print(f"{args.file}: ok: stack {stack.name}, {len(stack.vms)} VM(s): {names}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from vmrun import disks, domain, firmware, host, images, nat, operate, shares

    stack = images.localize(load(args), fetch=False)
    if len(args.vms) > 1:
        raise UsageError(f"render takes one VM name, not {len(args.vms)}")
    names = operate.check_vm_names(stack.identity, args.vms)
    vms = [stack.vm(name) for name in names]
    accel = host.choose_accel(stack.accel)
    paths = stack.paths
    for vm in vms:
        vm_paths = paths.vm(vm.name)
        uefi = firmware.find(vm.secure_boot) if vm.boot == "uefi" else None
        link = nat.Link(vm_paths.nat_socket, nat.mac(stack.name, vm.name)) if vm.nat else None
        xml = domain.build(vm, accel.name, vm_paths.console_socket, disks.plan(vm, vm_paths),
                           uefi=uefi, nvram=vm_paths.nvram, nat_link=link,
                           mounts=shares.plan(vm, vm_paths), virtiofsd=shares.find_virtiofsd())
        sys.stdout.write(domain.to_string(xml))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    if args.wait and not args.detach:
        raise UsageError("--wait goes with --detach")
    stack = localize(load(args), sys.stderr, cached_lines=False)
    if args.detach:
        return up_detached(stack, args.wait, args.fresh)
    from vmrun import headstart, host

    the_host = host.check(stack.accel)  # exit 3 before anything is made
    # The zygote imports libvirt while this process imports the supervisor (headstart.py).
    head_start = headstart.HeadStart(stack.paths, [vm.name for vm in stack.vms])
    display = None
    try:
        from vmrun import view
        from vmrun.supervisor import Supervisor

        display = view.make(args.progress, [vm.name for vm in stack.vms], args.quiet)
        supervisor = Supervisor(stack, display, fresh=args.fresh, the_host=the_host,
                                head_start=head_start)  # from here on, it ends the head start
    except BaseException:
        head_start.close()
        if display is not None:
            display.close()
        raise
    try:
        result = supervisor.run()
    finally:
        display.close()
    display.summary(result)
    return result.exit if result.exit is not None else 1


def localize(stack: manifest.Stack, out: TextIO, cached_lines: bool = True) -> manifest.Stack:
    """The stack with every image fetched and verified (images.localize), reported."""
    if not any(disk.url or disk.checksum for vm in stack.vms for disk in vm.disks):
        return stack  # as images.localize would, without importing its HTTP client
    from vmrun import images
    from vmrun.pullview import ImageProgress

    progress = ImageProgress(out, cached_lines)
    try:
        return images.localize(stack, progress)
    finally:
        progress.close()


def cmd_pull(args: argparse.Namespace) -> int:
    stack = localize(load(args), sys.stdout)
    if not any(disk.url for vm in stack.vms for disk in vm.disks):
        print(f"vmrun: {args.file} has no image by URL", file=sys.stderr)
    return 0


def up_detached(stack: manifest.Stack, wait_ready: bool, fresh: bool) -> int:
    from vmrun import detach, host
    from vmrun import protocol as p

    the_host = host.check(stack.accel)  # exit 3 here, in the foreground, before forking
    for report in detach.start(stack, the_host, wait_ready, fresh):
        if isinstance(report, p.VMReached):
            print(f"vmrun: {report.vm} {report.state}", file=sys.stderr)
        elif isinstance(report, p.StackUp):
            print(f"vmrun: stack {stack.name} is up (supervisor pid {report.pid}); "
                  f"stop it with: vmrun down {stack.path}", file=sys.stderr)
            return 0
        elif isinstance(report, p.VMFailed):
            print(f"vmrun: error: {report.vm} {report.outcome}"
                  + (f": {report.reason}" if report.reason else ""), file=sys.stderr)
            return 1
        elif isinstance(report, p.StartError):
            for line in report.lines:
                print(f"vmrun: error: {line}", file=sys.stderr)
            return report.code
    print("vmrun: error: the background supervisor ended before the stack was up; "
          f"see {stack.paths.up_log}", file=sys.stderr)
    return 1


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for row in rows:
        cells = [row[i].ljust(widths[i]) for i in range(len(widths))] + [row[-1]]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out) + "\n"


def cmd_ps(args: argparse.Namespace) -> int:
    from vmrun import operate

    stack = identity(args)
    state = operate.status(stack)
    if args.json:
        import json

        data: dict[str, Any] = {"stack": stack.name, "running": state is not None}
        if state is not None:
            data.update(state.to_dict())
        else:
            data["last_run"] = operate.last_run(stack)
        print(json.dumps(data, indent=2))
        return 0 if state is not None else 1
    if state is None:
        last = operate.last_run(stack)
        print(f"stack {stack.name} is not running", file=sys.stderr)
        if last and last.get("exit") is None:
            print("vmrun: its last run did not finish (its vmrun up was killed); "
                  f"`vmrun down {args.file}` removes what it left", file=sys.stderr)
        if last:
            rows: list[tuple[str, ...]] = [("VM", "STATE", "OUTCOME", "RESTARTS", "REASON")]
            rows += [(name, "stopped", vm.get("outcome") or "-", str(vm.get("restarts", 0)),
                      vm.get("reason") or "")
                     for name, vm in last.get("vms", {}).items()]
            sys.stdout.write(_table(rows))
        return 1
    table: list[tuple[str, ...]] = [
        ("VM", "STATE", "OUTCOME", "UPTIME", "RESTARTS", "ACCEL", "QEMU PID", "ADDRESSES",
         "FORWARDS", "REASON")]
    for name, vm in state.vms.items():
        addresses = ",".join(f"{net}={a.ip}" for net, a in vm.addresses.items())
        table.append((name, str(vm.state), str(vm.outcome or "-"), _age(vm.uptime),
                      str(vm.restarts), vm.accel or "-", str(vm.qemu_pid or "-"),
                      addresses or "-",
                      ",".join(vm.forwards) or "-", vm.reason or ""))
    sys.stdout.write(_table(table))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from vmrun import operate

    stack = identity(args)
    result = operate.down(stack, args.timeout)
    if result.was_running:
        print(f"vmrun: stack {stack.name} stopped", file=sys.stderr)
    elif result.killed:
        print(f"vmrun: stack {stack.name} was not running; killed "
              f"{len(result.killed)} leftover process(es) of a crashed run", file=sys.stderr)
    else:
        print(f"vmrun: stack {stack.name} is not running", file=sys.stderr)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from vmrun import operate

    stack = identity(args)
    names = operate.check_vm_names(stack, args.vms)
    width = max(len(n) for n in names)
    for vm, line in operate.logs(stack, names, args.follow, args.tail):
        sys.stdout.write(f"{vm:<{width}} | {line}\n")
        if args.follow:
            sys.stdout.flush()
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from vmrun import operate

    stack = identity(args)
    for path in operate.clean(stack):
        print(f"vmrun: removed {path}", file=sys.stderr)
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    from vmrun import client, console, operate

    stack = identity(args)
    if len(args.vms) != 1:
        raise UsageError("console takes one VM name",
                         hint="VMs: " + ", ".join(stack.vm_names))
    (name,) = operate.check_vm_names(stack, args.vms)
    paths = stack.paths
    if client.lock_holder(paths) is None:
        raise VmrunError(f'stack "{stack.name}" is not running',
                         hint=f"start it with: vmrun up --detach {args.file}")
    print(f"vmrun: connected to {name}'s console; press Ctrl-] to leave", file=sys.stderr)
    try:
        why = console.attach(paths.vm(name).attach_socket)
    except (FileNotFoundError, ConnectionRefusedError):
        raise VmrunError(f'VM "{name}" is not running') from None
    if why == "closed":
        print(f"\r\nvmrun: {name}'s console closed (the VM stopped)", file=sys.stderr)
    else:
        print(f"\r\nvmrun: left {name}'s console", file=sys.stderr)
    return 0


def cmd_ssh(args: argparse.Namespace) -> int:
    from vmrun import access, operate

    stack = identity(args)
    if args.config:
        if args.remote_command:
            raise UsageError("ssh --config takes no command")
        names = operate.check_vm_names(stack, args.vms)
        targets, missing = access.config_targets(stack, names)
        sys.stdout.write(access.config(targets, missing))
        return 0
    if len(args.vms) != 1:
        raise UsageError("ssh takes one VM name (and a command after --)",
                         hint="VMs: " + ", ".join(stack.vm_names))
    return _exec_ssh(args, stack, args.vms[0], args.remote_command, batch=False)


def cmd_exec(args: argparse.Namespace) -> int:
    stack = identity(args)
    if len(args.vms) != 1 or not args.remote_command:
        raise UsageError("exec takes one VM name and a command after --",
                         hint=f"vmrun exec {args.file} VM -- CMD...")
    return _exec_ssh(args, stack, args.vms[0], args.remote_command, batch=True)


def _exec_ssh(args: argparse.Namespace, stack: Identity, vm: str,
              command: list[str], batch: bool) -> int:
    """Become ssh (its exit status is ours: 255 when it cannot connect)."""
    from vmrun import access, operate

    operate.check_vm_names(stack, [vm])
    access.require_ssh()
    target = access.target(stack, vm, args.wait, note=_note,
                           running=getattr(args, "from_driver", False))
    argv = access.ssh_argv(target, command, tty=sys.stdin.isatty(), batch=batch)
    return _become(argv)


def _note(text: str) -> None:
    print(f"vmrun: {text}", file=sys.stderr, flush=True)


def _become(argv: list[str]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        print(f"vmrun: error: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
    return 255


def cmd_cp(args: argparse.Namespace) -> int:
    from vmrun import access, operate

    words = list(args.cp_words)
    if len(words) not in (2, 3):
        raise UsageError("cp takes [FILE] SRC DEST, one of SRC and DEST as VM:PATH")
    args.file = words.pop(0) if len(words) == 3 else None
    resolve_file(args)
    stack = identity(args)
    src, dest = (access.parse_cp_arg(word, stack.vm_names) for word in words)
    if (src[0] is None) == (dest[0] is None):
        raise UsageError("cp copies between the host and one VM: one of SRC and DEST is "
                         "VM:PATH, the other a local path",
                         hint="VMs: " + ", ".join(stack.vm_names))
    vm = src[0] or dest[0]
    assert vm is not None
    operate.check_vm_names(stack, [vm])
    access.require_ssh()
    target = access.target(stack, vm, args.wait, note=_note)
    return _become(access.scp_argv(target, src, dest, args.recursive))


def proxy_main(argv: list[str]) -> int:
    """`vmrun _proxy NETNS HOST PORT`: ssh's ProxyCommand (see vmrun/access.py)."""
    from vmrun import access

    if len(argv) != 3 or not argv[2].isdigit() or not 0 < int(argv[2]) < 65536:
        print("vmrun: error: usage: vmrun _proxy NETNS HOST PORT", file=sys.stderr)
        return EXIT_USAGE
    try:
        return access.proxy(argv[0], argv[1], int(argv[2]))
    except VmrunError as exc:
        for line in exc.lines():
            print(f"vmrun: error: {line}", file=sys.stderr)
        return exc.exit_code


def cmd_doctor(args: argparse.Namespace) -> int:
    from vmrun import doctor

    checks = doctor.run_checks(Path(args.state_dir) if args.state_dir else None)
    if args.json:
        import json

        print(json.dumps(doctor.report_json(checks), indent=2))
    else:
        sys.stdout.write(doctor.format_table(checks))
    return doctor.exit_code(checks)


def cmd_schema(args: argparse.Namespace) -> int:
    from vmrun import schema

    print(schema.schema_json())
    return 0


COMMANDS = {
    "check": cmd_check, "render": cmd_render, "up": cmd_up, "ps": cmd_ps, "down": cmd_down,
    "logs": cmd_logs, "console": cmd_console, "clean": cmd_clean, "doctor": cmd_doctor,
    "schema": cmd_schema, "pull": cmd_pull, "ssh": cmd_ssh, "exec": cmd_exec, "cp": cmd_cp,
}


def main(argv: list[str] | None = None) -> int:
    program = argv is None  # the process is ours: `vmrun` or `python -m vmrun`
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_proxy"]:  # hidden: ssh's ProxyCommand, kept short
        return proxy_main(argv[1:])
    remote_command: list[str] = []
    if argv[:1] in (["ssh"], ["exec"]) and "--" in argv:  # the guest's command
        cut = argv.index("--")
        argv, remote_command = argv[:cut], argv[cut + 1:]
    args, extra, parser = parse(argv)
    args.remote_command = remote_command
    # `vmrun logs FILE --tail 5 web`: VM names after an option end up here
    if extra and args.command == "logs" and not any(e.startswith("-") for e in extra):
        args.words += extra
    elif extra:
        if parser is None:
            from vmrun.cliparse import build_parser

            parser = build_parser()
        parser.error("unrecognized arguments: " + " ".join(extra))
    quick = program and args.command in QUICK
    if quick:
        gc.disable()  # see QUICK
    try:
        code = dispatch(args)
    finally:
        if quick:
            gc.freeze()  # for the collection at exit: nothing left to look at
    if program and args.command == "up":
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """End `vmrun up` without the interpreter's teardown of every module it loaded (18 ms
    with the supervisor's, measured; the benchmark times `up` to its exit).  By now the
    stack has ended, its files are closed and written, and its children are reaped: only
    our own output is left to flush."""
    import contextlib

    for stream in (sys.stdout, sys.stderr):
        # a reader gone (`vmrun up | head`) or a closed stream: nothing more to say there
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def dispatch(args: argparse.Namespace) -> int:
    """Run the verb; print its error and return its exit status."""
    try:
        if hasattr(args, "file") or hasattr(args, "words"):
            resolve_file(args)
        return COMMANDS[args.command](args)
    except VmrunError as exc:
        for line in exc.lines():
            print(f"vmrun: error: {line}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:  # before any VM was started, or in ps/logs/down
        import signal

        print("vmrun: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
