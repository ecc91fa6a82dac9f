"""`ready` in its three forms: a console regex (bare or `{ console = … }`), a TCP port
(`{ port = N }`) and a command over ssh (`{ ssh = … }`).

The manifest side and the driver's probes are tested without a guest; then on real
guests: with `ready = { port = 80 }`, the first request through a forward right after
`vmrun up --detach --wait` succeeds, 10 runs out of 10; and a port nothing listens on
ends in `failed`, `not ready after Ns`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from conftest import cmdline, in_netns, last_run, write_stack
from vmrun import manifest, readiness, schema
from vmrun import protocol as p
from vmrun.errors import ManifestError
from vmrun.proc import probes
from vmrun.readiness import Ready
from vmrun.watch import MAX_PATTERN_PROGRAM

NET = '[network.lan]\nsubnet = "10.77.0.0/24"\n'


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    return tmp_path


def vm_table(ready: str, networks: bool = True) -> str:
    return ('[vm.a]\nkernel = "vmlinuz"\n' + ('networks = ["lan"]\n' if networks else "")
            + f"ready = {ready}\n" + (NET if networks else ""))


def load(directory: Path, text: str) -> manifest.Stack:
    return manifest.loads(text, directory / "stack.toml", environ={}, host_memory=1 << 20)


def problems(directory: Path, text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load(directory, text)
    return [str(problem) for problem in info.value.problems]


# --- the manifest ----------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ('"guest: serving 80"', Ready(console="guest: serving 80")),
    ('{ console = "^login:" }', Ready(console="^login:")),
    ("{ port = 80 }", Ready(port=80)),
    ("{ port = 65535 }", Ready(port=65535)),
    ('{ ssh = "systemctl is-system-running --wait" }',
     Ready(ssh="systemctl is-system-running --wait")),
])
def test_forms(files: Path, value: str, expected: Ready) -> None:
    vm = load(files, vm_table(value)).vm("a")
    assert vm.ready == expected
    assert vm.ready.form == ("console" if expected.console else
                             "port" if expected.port else "ssh")
    assert vm.ready.probed == (expected.console is None)


def test_no_ready_and_defaults(files: Path) -> None:
    assert load(files, '[vm.a]\nkernel = "vmlinuz"\n').vm("a").ready is None
    stack = load(files, '[defaults]\nready = { port = 22 }\nnetworks = ["lan"]\n'
                 '[vm.a]\nkernel = "vmlinuz"\n[vm.b]\nkernel = "vmlinuz"\nready = "up"\n' + NET)
    assert stack.vm("a").ready == Ready(port=22)
    assert stack.vm("b").ready == Ready(console="up")


@pytest.mark.parametrize(("value", "fragment"), [
    ("{ port = 0 }", "vm.a.ready: invalid value in ready.port: expected a TCP port from 1 "
                     "to 65535, found the number 0"),
    ("{ port = 65536 }", "expected a TCP port from 1 to 65535, found the number 65536"),
    ('{ port = "80" }', 'expected a TCP port from 1 to 65535, found the string "80"'),
    ("{ port = true }", "found the boolean true"),
    ("{ port = 8.0 }", "found the number 8.0"),
    ("{}", "expected exactly one of console, port or ssh, found an empty table"),
    ('{ port = 80, console = "x" }', 'found "port" and "console"'),
    ("{ prot = 80 }", 'invalid value in ready.prot: expected one of console, port or ssh, '
                      'found the key "prot"\n  hint: did you mean "port"?'),
    ('{ ssh = "" }', 'in ready.ssh: expected a non-empty command'),
    ('{ ssh = "  " }', 'in ready.ssh: expected a non-empty command'),
    ("{ ssh = 1 }", "in ready.ssh: expected a non-empty command"),
    ('{ console = "" }', "in ready.console: expected a non-empty regular expression"),
    (r"{ console = '(a)\1' }", "in ready.console: expected a regular expression in RE2 syntax"),
    ("5", "expected a regular expression for a console line, or a table with one of"),
    ("[80]", "found an array"),
])
def test_bad_values_are_located(files: Path, value: str, fragment: str) -> None:
    found = problems(files, vm_table(value))
    assert len(found) == 1, found
    assert found[0].startswith(f"{files / 'stack.toml'}:4: vm.a.ready: invalid value")
    assert fragment in found[0], found[0]


def test_bare_string_errors_are_unchanged(files: Path) -> None:
    found = problems(files, vm_table("'.{0,300}'", networks=False))
    assert found[0].startswith(f"{files / 'stack.toml'}:3: vm.a.ready: invalid value: "
                               f"expected a regular expression of at most "
                               f"{MAX_PATTERN_PROGRAM} RE2 instructions")


@pytest.mark.parametrize("form", ["{ port = 80 }", '{ ssh = "true" }'])
def test_port_and_ssh_need_a_private_network(files: Path, form: str) -> None:
    name = form[2:6].strip()
    found = problems(files, vm_table(form, networks=False) + "nat = true\n")
    assert found == [
        f"{files / 'stack.toml'}:3: vm.a.ready: ready = {{ {name} = … }} needs a private "
        "network (found [vm.a] without networks)\n"
        '  hint: attach the VM to a network (networks = ["lan"] and a [network.lan] table): '
        "the check connects to its first private address; a NAT NIC takes no connections in"]


def test_a_default_ready_without_network_is_reported_at_defaults_per_table(
        files: Path) -> None:
    found = problems(files, '[defaults]\nready = { port = 80 }\n'
                     '[vm.a]\nkernel = "vmlinuz"\ncount = 2\n'
                     '[vm.b]\nkernel = "vmlinuz"\nnetworks = ["lan"]\n'
                     '[vm.c]\nkernel = "vmlinuz"\n' + NET)
    assert [f.split(" (found ")[1].split(")")[0] for f in found] == [
        "[vm.a] without networks", "[vm.c] without networks"]  # once for the copies of a
    assert all(f.startswith(f"{files / 'stack.toml'}:2: defaults.ready: ") for f in found)


def test_no_network_problem_on_top_of_a_bad_networks_value(files: Path) -> None:
    found = problems(files, '[vm.a]\nkernel = "vmlinuz"\nnetworks = "lan"\n'
                     "ready = { port = 80 }\n" + NET)
    assert len(found) == 1 and "vm.a.networks" in found[0], found


def test_check_exits_2_with_the_line(files: Path) -> None:
    path = files / "stack.toml"
    path.write_text(vm_table("{ port = 80 }", networks=False))
    proc = subprocess.run([sys.executable, "-m", "vmrun", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"vmrun: error: {path}:3: vm.a.ready: ready = {{ port = … }} "
                                  "needs a private network"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_schema_agrees() -> None:
    validator = Draft202012Validator(schema.manifest_schema())

    def ok(ready: Any) -> bool:
        return validator.is_valid({"vm": {"a": {"kernel": "k", "ready": ready}}})

    for good in ("up", {"console": "up"}, {"port": 80}, {"ssh": "true"}):
        assert ok(good), good
    for bad in ("", {}, {"port": 0}, {"port": 70000}, {"port": "80"}, {"prot": 80},
                {"port": 80, "ssh": "true"}, {"ssh": ""}, 5, [80]):
        assert not ok(bad), bad


def test_schema_gap_a_port_without_network(files: Path) -> None:
    """docs/schema.md, "Limits": the schema cannot see that a port check needs a network."""
    validator = Draft202012Validator(schema.manifest_schema())
    assert validator.is_valid({"vm": {"a": {"kernel": "k", "ready": {"port": 80}}}})
    assert problems(files, vm_table("{ port = 80 }", networks=False))


def test_the_docs_describe_the_forms() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "manifest.md").read_text()
    for text in ("ready = { port = 80 }", "ready = { ssh =", "{ console = ", "## Readiness"):
        assert text in docs, text
    assert "## Readiness" in (Path(__file__).parent.parent / "docs" / "access.md").read_text()


# --- what the supervisor gives the driver ------------------------------------------------

def test_probe_of_each_form(files: Path) -> None:
    stack = load(files, vm_table("{ port = 8080 }"))
    vm = stack.vm("a")
    probe = readiness.probe_of(stack, vm)
    assert probe == p.ReadyProbe(address=str(vm.addresses[0].ip), port=8080,
                                 interval=readiness.PORT_INTERVAL,
                                 attempt_timeout=readiness.PORT_ATTEMPT_TIMEOUT)
    spec = p.DriverSpec(name="a", root="/r", xml="<domain/>", console_socket="/c",
                        attach_socket="/a", console_log="/l", pidfile="/p", stop_timeout=1,
                        supervisor_pid=1, ready_probe=probe)
    assert p.DriverSpec.from_json(spec.to_json()) == spec
    console = load(files, vm_table('{ console = "x" }'))
    assert readiness.probe_of(console, console.vm("a")) is None


def test_ssh_form_runs_vmrun_exec(files: Path) -> None:
    stack = load(files, vm_table('{ ssh = "systemctl is-system-running --wait" }'))
    probe = readiness.probe_of(stack, stack.vm("a"))
    assert probe is not None and probe.argv is not None and probe.port is None
    argv = list(probe.argv)
    at = argv.index("exec")
    assert argv[at:] == ["exec", "--wait", "0", "--from-driver", "--state-dir",
                         str(files / ".vmrun"), str(files / "stack.toml"), "a", "--",
                         "systemctl is-system-running --wait"]


# --- the driver's probes, on this host ------------------------------------------------------

def run_probe(probe: probes.Probe, timeout: float = 10) -> tuple[bool, str]:
    """One attempt to its end, waiting as the driver does."""
    result = probe.start(time.monotonic())
    deadline = time.monotonic() + timeout
    while result is None:
        assert time.monotonic() < deadline, "the probe never answered"
        reads, writes = probe.fds()
        wait = probe.deadline()
        select.select(reads, writes, [], 0.5 if wait is None else
                      max(0.0, min(0.5, wait - time.monotonic())))
        result = probe.poll(time.monotonic())
    assert not probe.busy
    return result


@pytest.mark.timeout(30)
def test_port_probe() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert run_probe(probes.PortProbe("127.0.0.1", port, 1.0)) == (True, "")
    # nothing listens there any more
    assert run_probe(probes.PortProbe("127.0.0.1", port, 1.0)) == (
        False, f"127.0.0.1:{port}: connection refused")
    # an address that never answers (TEST-NET-1, no route here or a black hole)
    ok, failure = run_probe(probes.PortProbe("192.0.2.1", 9, 0.3))
    assert not ok and failure.startswith("192.0.2.1:9: "), failure


@pytest.mark.timeout(30)
def test_command_probe() -> None:
    assert run_probe(probes.CommandProbe(("true",), None)) == (True, "")
    assert run_probe(probes.CommandProbe(
        ("sh", "-c", "echo first; echo 'not yet' >&2; exit 3"), None)) == (
        False, "sh: exit status 3: not yet")
    ok, failure = run_probe(probes.CommandProbe(("/nonexistent/ssh",), None))
    assert not ok and failure.startswith("ssh: "), failure
    ok, failure = run_probe(probes.CommandProbe(("sleep", "60"), 0.3))
    assert (ok, failure) == (False, "sleep: no answer within 0.3s")


@pytest.mark.timeout(30)
def test_command_probe_cancel_kills_and_reaps_only_its_own_child() -> None:
    """`cancel` kills the command's process group (the command runs in a group of its
    own): the command and what it left running in the background, a grandchild of the
    driver's in that group, are gone at once.  It reaps the command by its pid only: a
    child of the driver's outside the probe is neither killed nor reaped."""
    other = subprocess.Popen(["sleep", "30"])  # a child the probe must leave alone
    grandchild = None  # a pidfd: it stays this process's, whoever reaps it and when
    try:
        # the command prints its background job's pid and waits for it
        probe = probes.CommandProbe(("sh", "-c", "sleep 60 & echo $!; wait"), None)
        assert probe.start(time.monotonic()) is None
        assert probe.proc is not None
        pid = probe.proc.pid
        deadline = time.monotonic() + 10
        while not probe.output.endswith(b"\n"):
            assert time.monotonic() < deadline, f"no pid printed: {bytes(probe.output)!r}"
            select.select(probe.fds()[0], [], [], max(0.0, deadline - time.monotonic()))
            assert probe.poll(time.monotonic()) is None, bytes(probe.output)
        background = int(probe.output)
        grandchild = os.pidfd_open(background)  # still running: the pid is still its
        assert os.getpgid(background) == pid  # in the command's group (not a group of its own)
        probe.cancel()
        assert not probe.busy
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped already
        # a pidfd becomes readable when its process has ended (a zombie counts: its
        # parent is now init, or a subreaper, which reaps it when it sees fit)
        ended, _, _ = select.select([grandchild], [], [], 5)
        assert ended, "the command's background child outlived the cancel"
        assert other.poll() is None  # untouched, not reaped
    finally:
        if grandchild is not None:
            if not select.select([grandchild], [], [], 0)[0]:  # left by the cancel: its
                with contextlib.suppress(ProcessLookupError):  # group is still the probe's
                    os.killpg(pid, signal.SIGKILL)
            os.close(grandchild)
        other.kill()
        other.wait(10)


# --- real guests ----------------------------------------------------------------------------

def network_stack(directory: Path, guest: Path, vm: dict[str, Any]) -> Path:
    path = write_stack(directory, guest, {"web": {"networks": ["lan"], **vm}}, name="rdy")
    path.write_text(path.read_text() + "\n" + NET)
    return path


# Runs inside the test's network namespace: `up --detach --wait`, then at once one request
# through the forward, then `down`; RUNS times.  Prints one JSON line per run.
UP_AND_REQUEST = textwrap.dedent("""
    import json, socket, subprocess, sys, time
    manifest, port, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    vmrun = [sys.executable, "-m", "vmrun"]
    for run in range(runs):
        start = time.monotonic()
        up = subprocess.run([*vmrun, "up", "--detach", "--wait", manifest],
                            capture_output=True, text=True, timeout=120)
        ready = time.monotonic()
        got = None
        if up.returncode == 0:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.settimeout(10)
                    got = s.makefile().readline().strip()
            except OSError as exc:
                got = "error: " + str(exc)
        answered = time.monotonic()
        down = subprocess.run([*vmrun, "down", "--timeout", "5", manifest],
                              capture_output=True, text=True, timeout=60)
        print(json.dumps({"run": run, "up": up.returncode, "stderr": up.stderr[-600:],
                          "got": got, "up_s": round(ready - start, 2),
                          "request_s": round(answered - ready, 3),
                          "down": down.returncode, "down_stderr": down.stderr[-300:],
                          "total_s": round(time.monotonic() - start, 2)}), flush=True)
""")


@pytest.mark.timeout(300)
def test_port_ready_means_the_first_request_through_a_forward_succeeds(
        guest: Path, tmp_path: Path, test_netns: str) -> None:
    port = 18480  # the test's own namespace: nothing else listens there
    manifest_path = network_stack(tmp_path, guest, {
        # the server answers only after the guest has booted, its modules are loaded and
        # its address is up: well after `running`, and after the first console lines
        "cmdline": cmdline(action="hang", sleep=2,
                           extra="guest.ip={net.lan.cidr} guest.serve=80:hello"),
        "forward": [f"{port}:80"],
        "ready": {"port": 80},
        "ready_timeout": 60,
    })
    proc = subprocess.run([*in_netns(test_netns), sys.executable, "-c", UP_AND_REQUEST,
                           str(manifest_path), str(port), "10"],
                          capture_output=True, text=True, timeout=280)
    runs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and len(runs) == 10, (proc.stdout, proc.stderr)
    for run in runs:
        assert run["up"] == 0 and run["got"] == "hello" and run["down"] == 0, run
    print("up --detach --wait seconds:", [r["up_s"] for r in runs])
    print("first request seconds:", [r["request_s"] for r in runs])
    assert last_run(manifest_path, "rdy")["vms"]["web"]["outcome"] == "stopped"


@pytest.mark.timeout(200)
def test_a_port_nothing_listens_on_is_not_ready_after_ready_timeout(
        guest: Path, tmp_path: Path, test_netns: str) -> None:
    manifest_path = network_stack(tmp_path, guest, {
        "cmdline": cmdline(action="hang", extra="guest.ip={net.lan.cidr} guest.serve=80:hi"),
        "ready": {"port": 81},
        "ready_timeout": 8,
    })
    started = time.monotonic()
    up = subprocess.run([*in_netns(test_netns), sys.executable, "-m", "vmrun", "up",
                         "--detach", "--wait", str(manifest_path)],
                        capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert up.returncode == 1, up.stderr
    assert "vmrun: error: web failed: not ready after 8s (last check: " in up.stderr, up.stderr
    assert took < 30, took
    down = subprocess.run([*in_netns(test_netns), sys.executable, "-m", "vmrun", "down",
                           str(manifest_path)], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    result = last_run(manifest_path, "rdy")["vms"]["web"]
    assert result["outcome"] == "failed"
    address = manifest.load(manifest_path).vm("web").addresses[0].ip
    # the guest was up and refused port 81 (under heavy load it may still have been booting)
    assert result["reason"].startswith(f"not ready after 8s (last check: {address}:81: "), result
