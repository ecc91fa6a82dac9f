"""What crosses process boundaries (vmrun.protocol): round trips, rejected messages,
bounded line reading; and the import boundaries between the processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vmrun import protocol as p


def test_specs_round_trip() -> None:
    spec = p.DriverSpec(name="a", root="/r", xml="<domain/>", console_socket="/r/c",
                        attach_socket="/r/a", console_log="/s/c.log", pidfile="/r/p",
                        stop_timeout=10, supervisor_pid=1, success="OK", timeout=None,
                        netns="/run/netns/x")
    assert p.DriverSpec.from_json(spec.to_json()) == spec
    fwd = p.ForwarderSpec(netns="/n", forwards=(p.ForwardTarget(fd=3, ip="10.0.0.2",
                                                                port=80),),
                          supervisor_pid=2)
    assert p.ForwarderSpec.from_json(fwd.to_json()) == fwd
    probe = p.ProbeSpec(root="/r", emulator="/usr/bin/qemu", virttype="qemu", supervisor_pid=3)
    assert p.ProbeSpec.from_json(probe.to_json()) == probe


@pytest.mark.parametrize("event", [
    p.Starting(), p.Running(pid=42), p.Running(), p.Ready(), p.Console(line="héllo \x1b"),
    p.Rebooted(), p.Stopping(reason="signal SIGINT"), p.Probed(),
    p.Result(outcome=p.Outcome.FAILED, reason="panic", started=1.5, stopped=2.0),
])
def test_events_round_trip(event: p.DriverEvent) -> None:
    line = p.encode(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert p.decode_event(line[:-1]) == event


@pytest.mark.parametrize("line", [
    b"", b"[1]", b"null", b'"x"', b"{}", b'{"ev": "nope"}', b'{"ev": "running", "pid": "1"}',
    b'{"ev": "result", "outcome": "maybe"}', b'{"ev": "console"}', b"\xff\xfe",
])
def test_bad_events_are_rejected(line: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.decode_event(line)


def test_requests() -> None:
    assert p.decode_request({"cmd": "ps"}) == p.PsRequest()
    assert p.decode_request(p.DownRequest(timeout=3).to_dict()) == p.DownRequest(timeout=3.0)
    assert p.decode_request({"cmd": "down"}) == p.DownRequest(timeout=None)
    for bad in ([1], None, "x", {"cmd": "rm"}, {"cmd": "down", "timeout": -1},
                {"cmd": "down", "timeout": "5"}, {"cmd": "down", "timeout": float("nan")}):
        with pytest.raises(p.ProtocolError):
            p.decode_request(bad)


def test_commands_and_reports() -> None:
    for command in (p.Stop(timeout=5, reason="r"), p.Destroy(reason="d")):
        assert p.decode_command(p.encode(command)) == command
    for report in (p.VMReached(vm="a", state=p.VMState.READY), p.StackUp(pid=1),
                   p.VMFailed(vm="a", outcome=p.Outcome.FAILED, reason="panic"),
                   p.StartError(code=3, lines=("no", "way"))):
        assert p.decode_report(p.encode(report)) == report


def test_stack_status_round_trip() -> None:
    status = p.StackStatus(stack="s", pid=1, accel="tcg", started=None, manifest="/m",
                           stopping=False, vms={"a": p.VMStatus(
                               state=p.VMState.RUNNING, outcome=None, reason=None,
                               started="2026-01-01T00:00:00.000Z", uptime=1.5, qemu_pid=9,
                               accel="tcg", forwards=("8080:80",),
                               addresses={"lan": p.Address(ip="10.77.0.5",
                                                           cidr="10.77.0.5/24",
                                                           mac="52:54:00:00:00:01")})})
    assert p.StackStatus.from_json(status.to_json()) == status
    assert json.loads(status.to_json())["vms"]["a"]["state"] == "running"


def test_next_state() -> None:
    s = p.VMState.STARTING
    for event, expected in [(p.Console(line="x"), p.VMState.STARTING),
                            (p.Running(pid=1), p.VMState.RUNNING),
                            (p.Ready(), p.VMState.READY),
                            (p.Stopping(), p.VMState.STOPPING),
                            (p.Result(outcome=p.Outcome.OK), p.VMState.STOPPED)]:
        s = p.next_state(s, event)
        assert s is expected


def test_line_reader_splits_and_bounds() -> None:
    reader = p.LineReader(max_line=8)
    assert reader.feed(b"ab") == []
    assert reader.feed(b"c\nde\nf") == [b"abc", b"de"]
    assert reader.feed(b"0123456789") == []  # over the limit: dropped, not kept
    assert len(reader.buffer) == 0
    assert reader.feed(b"xyz\nok\n") == [b"ok"]
    assert reader.dropped == 1
    assert reader.feed(b"tail") == [] and reader.tail() == b"tail"


IMPORT_CHECK = """
import sys
import {module}
bad = sorted(m for m in {forbidden!r} if m in sys.modules)
print(",".join(bad))
"""


@pytest.mark.parametrize("module, forbidden", [
    # the driver: no lxml, no manifest (libvirt comes later, after setns)
    ("vmrun.proc.driver", ["lxml", "vmrun.manifest", "vmrun.settings", "libvirt", "rich"]),
    ("vmrun.proc.forward", ["lxml", "vmrun.manifest", "libvirt", "rich"]),
    # the zygote: what the drivers it forks share, the driver's imports only
    ("vmrun.proc.zygote", ["lxml", "vmrun.manifest", "vmrun.settings", "libvirt", "rich",
                           "vmrun.supervisor"]),
    # the supervisor never imports libvirt
    ("vmrun.supervisor", ["libvirt"]),
    # the CLI's light verbs load neither libvirt nor the supervisor
    ("vmrun.cli", ["libvirt", "vmrun.supervisor", "rich", "lxml", "vmrun.manifest"]),
])
def test_import_boundaries(module: str, forbidden: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK.format(module=module,
                                                                    forbidden=forbidden)],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"
