"""Benchmark vmrun against plain QEMU on the test guest, each figure beside its goal.

Parts (`--only`, comma-separated; all by default), medians over `--runs` runs:

  single    one guest: `vmrun up` (warm) and plain qemu-system-x86_64 (same kernel, initrd,
            machine type, TCG), interleaved: wall time, time to the first console output
            and to the guest's `bench` line; goal: vmrun / QEMU <= 1.10 (the ratio of the
            medians; beside it, the median of each pair's own ratio); and, in 3 more warm
            runs of their own (counting polls /proc), how often libvirt probed QEMU's
            capabilities (goal: never)
  poweroff  guest's "reboot: Power down" line -> `vmrun up` exit; goal <= 0.1 s
  scale     1, 4 and 8 VMs at once (warm): time until every VM runs (libvirt resumed its
            vCPUs: each VM's `started` in last-run.json), until every VM's first console
            line, and wall time; goal: 8 VMs <= 1.5 x 1 VM until every VM runs; and 8
            plain QEMUs started at once, until their first console byte
  memory    8-VM stack while the guests sleep: PSS (smaps_rollup) of the supervisor, the
            drivers, their zygote, the PID namespace's init and the forwarder, QEMU excluded; goal
            <= 12 MiB per VM
  cli       `vmrun --help`, `vmrun ps` (stack not running), `vmrun check`; goal <= 60 ms
  teardown  SIGINT to `vmrun up` of a 4-VM stack while the guests sleep: until its QEMUs
            are gone, until vmrun exits; no QEMU left
  cold      4-VM stack with no state directory and no capabilities cache (which this part
            deletes) then warm: wall time, and the roots in which libvirt probed QEMU's
            capabilities (QEMU `-machine none` seen); goal: one cold, none warm

Prints a Markdown report; `--json PATH` keeps every raw value for `bench/compare.py`;
`--write` replaces docs/performance.md up to its first `## ` heading with the report.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "build" / "guest"
_SCRIPT = Path(sys.executable).parent / "vmrun"
VMRUN = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "vmrun"]
CMDLINE = 'console=ttyS0 quiet guest.say="bench"'
PARTS = ("single", "poweroff", "scale", "memory", "cli", "teardown", "cold")
SCALE = (1, 4, 8)
TIMEOUT = 300.0  # seconds for any one `vmrun up` or QEMU run
MIB = 1024 * 1024
CONSOLE = re.compile(r"^(\S+) +\| (.*)$")
ORDER = ("single.ratio", "single.ratio_paired", "single.qemu", "single.vmrun", "single.probed",
         "single.ratio_first", "single.qemu_first", "single.vmrun_first", "single.ratio_bench",
         "single.qemu_bench", "single.vmrun_bench", "poweroff.exit", "scale.ratio",
         "scale.running1", "scale.running4", "scale.running8", "scale.ratio_console",
         "scale.console1", "scale.console4", "scale.console8", "scale.wall1", "scale.wall4",
         "scale.wall8", "scale.vs_qemu", "scale.qemu_running", "scale.vs_sequential",
         "memory.per_vm", "memory.total", "cli.help", "cli.ps", "cli.check", "teardown.gone",
         "teardown.exit", "teardown.qemus", "teardown.left", "cold.cold_probes",
         "cold.warm_probes", "cold.probe_drivers", "cold.cold", "cold.warm")


def log(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


# --- measurements -------------------------------------------------------------------------

@dataclass
class Measure:
    label: str
    unit: str  # "s", "MiB" or "" (a ratio or a count)
    raw: list[float] = field(default_factory=list)
    goal: tuple[str, float] | None = None  # ("<=", x) or ("==", x), on the value
    agg: str = "median"  # or "max" (a count), "mean" (a share of runs)

    @property
    def value(self) -> float | None:
        if not self.raw:
            return None
        if self.agg != "median":
            return max(self.raw) if self.agg == "max" else statistics.mean(self.raw)
        return statistics.median(self.raw)

    @property
    def met(self) -> bool | None:
        value = self.value
        if self.goal is None or value is None:
            return None
        op, target = self.goal
        return value <= target if op == "<=" else value == target and min(self.raw) == target


Results = dict[str, Measure]


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    return f"{value:g}" if value == int(value) else f"{value:.2f}"


# --- processes ----------------------------------------------------------------------------

def parents() -> dict[int, int]:
    """pid -> ppid of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    table[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return table


def descendants(root: int, table: dict[int, int] | None = None) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in (parents() if table is None else table).items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def argv_of(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def is_qemu(argv: list[str]) -> bool:
    return bool(argv) and os.path.basename(argv[0]).startswith("qemu-system")


def caps_probe_root(argv: list[str]) -> str:
    """The root of libvirt's capability probe (QEMU `-machine none -qmp unix:ROOT/lib/qemu/
    qmp-XXXXXX/qmp.monitor`) if `argv` is one, else ""."""
    pairs = dict(zip(argv, argv[1:], strict=False)) if is_qemu(argv) else {}
    if not pairs.get("-machine", "").startswith("none"):
        return ""
    return pairs.get("-qmp", "").removeprefix("unix:").split("/lib/qemu/qmp-")[0] or "?"


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def kind_of(pid: int, supervisor: int, ppids: dict[int, int],
            table: dict[int, list[str]]) -> str | None:
    """supervisor, driver, probe, forwarder, zygote, init; None for QEMU and libvirt's
    forks."""
    argv = table.get(pid, [])
    if pid == supervisor:
        return "supervisor"
    if not argv or is_qemu(argv):
        return None
    text = " ".join(argv)
    if "vmrun.proc.driver" in text:
        # libvirt forks a driver for its helpers: those keep the driver's command line
        parent = ppids.get(pid, 0)
        if "vmrun.proc.driver" in " ".join(table.get(parent, [])):
            return None
        return "probe" if "probe" in argv else "driver"
    if "vmrun.proc.forward" in text:
        return "forwarder"
    if "vmrun.proc.zygote" in text:
        return "zygote"
    return "init" if ppids.get(pid) == supervisor else None


# --- running a command and timing its output ----------------------------------------------

@dataclass
class Output:
    pid: int
    start: float  # time.monotonic()
    start_wall: float = 0.0  # time.time(), at the same moment
    end: float = 0.0  # when the process exited
    code: int | None = None
    first_byte: float | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return self.end - self.start

    def consoles(self) -> Iterator[tuple[float, str, str]]:
        """(time, vm, text) of each `vm | text` line of `vmrun up`."""
        for when, line in self.lines:
            match = CONSOLE.match(line)
            if match:
                yield when, match[1], match[2]

    def first_of_each(self, text: str | None = None) -> dict[str, float]:
        """When each VM printed its first console line (or its first line `text`)."""
        seen: dict[str, float] = {}
        for when, vm, line in self.consoles():
            if text is None or line == text:
                seen.setdefault(vm, when)
        return seen


Hook = Callable[[subprocess.Popen[bytes], Output], None]


def run(argv: list[str], hook: Hook | None = None, every: float = 0.02,
        timeout: float = TIMEOUT, env: dict[str, str] | None = None) -> Output:
    """Run `argv` (with `env` added to the environment) with stdout and stderr on one
    pipe, timing each line as it arrives.

    `hook` is called after each read and at least every `every` seconds until the process
    exits.  The exit time comes from a pidfd, not from the pipe's EOF."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, **env} if env else None)
    out = Output(pid=proc.pid, start=time.monotonic(), start_wall=time.time())
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    pidfd = os.pidfd_open(proc.pid)
    deadline = out.start + timeout
    try:
        waiting, pending = [fd, pidfd], b""
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                if pidfd in waiting:
                    raise TimeoutError(f"{' '.join(argv[:3])} ran for more than {timeout:.0f} s")
                break  # exited; something it left still holds the pipe
            ready = select.select(waiting, [], [], min(every, left) if hook else left)[0]
            now = time.monotonic()
            if fd in ready:
                data = os.read(fd, 65536)
                if not data:
                    waiting.remove(fd)
                elif out.first_byte is None:
                    out.first_byte = now
                *complete, pending = (pending + data).split(b"\n")
                out.lines += [(now, line.decode(errors="replace").rstrip("\r"))
                              for line in complete]
            if pidfd in ready:
                out.end = now
                waiting.remove(pidfd)
                deadline = min(deadline, now + 2)
            elif hook is not None and pidfd in waiting:
                hook(proc, out)
        out.code = proc.wait(timeout=5)
    finally:
        os.close(pidfd)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()
    return out


def checked(out: Output, argv: list[str], codes: tuple[int, ...] = (0,)) -> Output:
    if out.code not in codes:
        failed = {m[1] for _, line in out.lines if (m := re.match(r"(\S+) +failed ", line))}
        shown = [line for _, line in out.lines if (m := CONSOLE.match(line)) and m[1] in failed]
        tail = "\n".join(shown[-40:] + [line for _, line in out.lines[-12:]])
        raise SystemExit(f"{' '.join(argv[:3])} exited {out.code}:\n{tail}")
    return out


class ProbeCount:
    """A hook for `run`: the roots in which libvirt ran its capability probe (QEMU
    `-machine none`), and the probe drivers (`vmrun.proc.driver probe`), seen."""

    def __init__(self) -> None:
        self.roots: set[str] = set()
        self.drivers: set[int] = set()

    def __call__(self, proc: subprocess.Popen[bytes], out: Output) -> None:
        for pid in descendants(proc.pid):
            argv = argv_of(pid)
            if root := caps_probe_root(argv):
                self.roots.add(root)
            elif "vmrun.proc.driver" in argv and "probe" in argv:
                self.drivers.add(pid)


def vmrun_up(path: Path, hook: Hook | None = None, every: float = 0.02,
             codes: tuple[int, ...] = (0,), env: dict[str, str] | None = None) -> Output:
    argv = [*VMRUN, "up", "--progress", "plain", str(path)]
    return checked(run(argv, hook, every, env=env), argv, codes)


def qemu() -> Output:
    argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "256",
            "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
            "-kernel", str(GUEST / "vmlinuz"), "-initrd", str(GUEST / "initrd.gz"),
            "-append", CMDLINE]
    return checked(run(argv), argv)


def qemus_at_once(count: int) -> list[Output]:
    """`count` plain QEMU runs of the test guest, started together (one thread each)."""
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: qemu(), range(count)))


def started_times(path: Path) -> list[float]:
    """When libvirt resumed each VM of the last run of the stack `path` (wall clock, ms):
    the `started` of each VM in last-run.json (vmrun/results.py)."""
    run = json.loads((path.parent / ".vmrun" / "bench" / "last-run.json").read_text())
    return [datetime.datetime.fromisoformat(vm["started"].replace("Z", "+00:00")).timestamp()
            for vm in run["vms"].values()]


def manifest(directory: Path, vms: int, sleep: float = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cmdline = CMDLINE + (f" guest.sleep={sleep:g}" if sleep else "")
    lines = ['name = "bench"', 'accel = "tcg"', "", "[defaults]",
             f'kernel = "{GUEST / "vmlinuz"}"', f'initrd = "{GUEST / "initrd.gz"}"',
             'memory = "256M"', "timeout = 120", f"cmdline = '{cmdline}'"]
    for i in range(vms):
        lines += ["", f"[vm.vm{i}]"]
    path = directory / "bench.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the parts ----------------------------------------------------------------------------

class Bench:
    def __init__(self, work: Path, runs: int) -> None:
        self.work = work
        self.runs = runs
        self.results: Results = {}
        self.manifests: list[Path] = []
        self.memory_kinds: dict[str, tuple[int, float]] = {}  # kind -> (count, largest MiB)

    def measure(self, key: str, label: str, unit: str, goal: tuple[str, float] | None = None,
                agg: str = "median") -> Measure:
        if key not in self.results:
            self.results[key] = Measure(label, unit, goal=goal, agg=agg)
        return self.results[key]

    def stack(self, name: str, vms: int, sleep: float = 0) -> Path:
        path = manifest(self.work / name, vms, sleep)
        if path not in self.manifests:
            self.manifests.append(path)
        return path

    def single(self, with_qemu: bool) -> None:
        """Interleaved runs (alternating which goes first) of vmrun up and plain QEMU."""
        one = self.stack("one", 1)
        log("single: warming up")
        vmrun_up(one)
        if with_qemu:
            qemu()
        m = self.measure
        for i in range(self.runs):
            log(f"single: run {i + 1} of {self.runs}")
            order = [False, True] if i % 2 else [True, False]
            for plain in order if with_qemu else [False]:
                if plain:
                    q = qemu()
                    m("single.qemu", "one guest, plain QEMU, start to exit", "s").raw.append(
                        q.wall)
                    if q.first_byte is not None:
                        m("single.qemu_first", "one guest, plain QEMU, start to first console "
                          "byte", "s").raw.append(q.first_byte - q.start)
                    bench = next((t for t, line in q.lines if line == "bench"), None)
                    if bench is not None:
                        m("single.qemu_bench", "one guest, plain QEMU, start to `bench` line",
                          "s").raw.append(bench - q.start)
                    continue
                v = vmrun_up(one)  # nothing else runs meanwhile: no probe count (below)
                m("single.vmrun", "one guest, `vmrun up` (warm), start to exit", "s").raw.append(
                    v.wall)
                first = v.first_of_each()
                if "vm0" in first:
                    m("single.vmrun_first", "one guest, `vmrun up`, start to first console line",
                      "s").raw.append(first["vm0"] - v.start)
                bench_at = v.first_of_each("bench")
                if "vm0" in bench_at:
                    m("single.vmrun_bench", "one guest, `vmrun up`, start to `bench` line",
                      "s").raw.append(bench_at["vm0"] - v.start)
                power_down = [t for t, _, line in v.consoles() if "reboot: Power down" in line]
                if power_down:
                    m("poweroff.exit", 'guest poweroff ("reboot: Power down") to `vmrun up` '
                      "exit", "s", ("<=", 0.1)).raw.append(v.end - power_down[-1])
        # Counting probes polls /proc, which takes CPU from the guest: in runs of their own.
        for i in range(min(3, self.runs)):
            log(f"single: probe count, run {i + 1} of {min(3, self.runs)}")
            vmrun_up(one, probes := ProbeCount(), every=0.1)
            m("single.probed", "one guest, `vmrun up` (warm): share of runs in which "
              "libvirt probed QEMU's capabilities", "", ("==", 0),
              agg="mean").raw.append(min(1, len(probes.roots)))
        if with_qemu:
            self.ratio("single.ratio", "ratio `vmrun up` / plain QEMU, start to exit",
                       "single.vmrun", "single.qemu", ("<=", 1.10))
            pairs = zip(self.results["single.vmrun"].raw, self.results["single.qemu"].raw,
                        strict=True)
            self.measure("single.ratio_paired", "the same, median of each run's own ratio (a run "
                         "of each, one after the other)", "").raw = [a / b for a, b in pairs]
            self.ratio("single.ratio_first", "ratio `vmrun up` / plain QEMU, start to first "
                       "console output", "single.vmrun_first", "single.qemu_first")
            self.ratio("single.ratio_bench", "ratio `vmrun up` / plain QEMU, start to `bench` "
                       "line", "single.vmrun_bench", "single.qemu_bench")

    def ratio(self, key: str, label: str, num: str, den: str,
              goal: tuple[str, float] | None = None, factor: float = 1) -> None:
        a, b = self.results.get(num), self.results.get(den)
        if a and b and a.value is not None and b.value:
            self.measure(key, label, "", goal).raw = [a.value / (factor * b.value)]

    def qemu_median(self) -> None:
        """Plain QEMU's median for the sequential estimate, if `single` did not measure it."""
        if "single.qemu" not in self.results:
            qemu()  # warm up
            for i in range(self.runs):
                log(f"scale: plain QEMU run {i + 1} of {self.runs}")
                self.measure("single.qemu", "one guest, plain QEMU, start to exit",
                             "s").raw.append(qemu().wall)

    def scale(self) -> None:
        stacks = {n: self.stack(f"scale{n}", n) for n in SCALE}
        log("scale: warming up")
        for path in stacks.values():
            vmrun_up(path)
        for i in range(self.runs):
            for n, path in stacks.items():
                log(f"scale: run {i + 1} of {self.runs}, {n} VMs")
                out = vmrun_up(path)
                first = out.first_of_each()
                if len(first) != n:
                    raise SystemExit(f"scale: {len(first)} of {n} VMs printed a line")
                self.measure(f"scale.running{n}", f"{n}-VM stack, start until every VM runs "
                             "(libvirt resumed its vCPUs)", "s").raw.append(
                                 max(started_times(path)) - out.start_wall)
                self.measure(f"scale.console{n}", f"{n}-VM stack, start until every VM's "
                             "first console line", "s").raw.append(
                                 max(first.values()) - out.start)
                self.measure(f"scale.wall{n}", f"{n}-VM stack, start to exit",
                             "s").raw.append(out.wall)
            log(f"scale: run {i + 1} of {self.runs}, {max(SCALE)} plain QEMUs at once")
            outs = qemus_at_once(max(SCALE))
            start = min(out.start for out in outs)
            self.measure("scale.qemu_running", f"{max(SCALE)} plain QEMUs started at once, "
                         "until every guest runs (its first console byte)", "s").raw.append(
                             max(out.first_byte or out.end for out in outs) - start)
        self.ratio("scale.ratio", "8 VMs / 1 VM, start until every VM runs", "scale.running8",
                   "scale.running1", ("<=", 1.5))
        self.ratio("scale.ratio_console", "8 VMs / 1 VM, start until every VM's first console "
                   "line", "scale.console8", "scale.console1")
        self.ratio("scale.vs_qemu", f"{max(SCALE)}-VM stack / {max(SCALE)} plain QEMUs at once, "
                   "until every guest's first console output", f"scale.console{max(SCALE)}",
                   "scale.qemu_running")
        self.qemu_median()
        self.ratio("scale.vs_sequential", "8-VM stack / 8 sequential plain QEMU runs "
                   "(estimated: 8 x plain QEMU's median)", "scale.wall8", "single.qemu",
                   factor=8)

    def memory(self) -> None:
        path = self.stack("memory", 8, sleep=5)
        for i in range(self.runs):
            log(f"memory: run {i + 1} of {self.runs}")
            sample, qemus = self.memory_run(path)
            if qemus != 8 or len(sample.get("driver", [])) != 8:
                log(f"memory: warning: {qemus} QEMUs and {len(sample.get('driver', []))} "
                    "drivers running when sampled, not 8")
            total = sum(sum(values) for values in sample.values())
            self.measure("memory.total", "8-VM stack, PSS of vmrun's processes (QEMU "
                         "excluded)", "MiB").raw.append(total)
            self.measure("memory.per_vm", "8-VM stack, vmrun's PSS per VM", "MiB",
                         ("<=", 12)).raw.append(total / 8)
            for kind, values in sorted(sample.items()):
                self.measure(f"memory.max_{kind}", f"8-VM stack, largest {kind} process (PSS)",
                             "MiB").raw.append(max(values))
                count, largest = self.memory_kinds.get(kind, (0, 0.0))
                self.memory_kinds[kind] = (max(count, len(values)), max(largest, max(values)))

    @staticmethod
    def memory_run(path: Path) -> tuple[dict[str, list[float]], int]:
        """PSS (MiB) of each of vmrun's processes by kind, once every guest has said `bench`
        (it then sleeps 5 s), and how many QEMUs ran then."""
        sample: dict[str, list[float]] = {}
        qemus = [0]

        def take(proc: subprocess.Popen[bytes], out: Output) -> None:
            if sample or len(out.first_of_each("bench")) < 8:
                return
            ppids = parents()
            table = {pid: argv_of(pid) for pid in [proc.pid, *descendants(proc.pid, ppids)]}
            qemus[0] = sum(is_qemu(argv) for argv in table.values())
            for pid in table:
                kind = kind_of(pid, proc.pid, ppids, table)
                if kind is not None:
                    sample.setdefault(kind, []).append(pss_kib(pid) / 1024)

        vmrun_up(path, take, every=0.1)
        if not sample:
            raise SystemExit("memory: the 8 guests never all printed `bench`")
        return sample, qemus[0]

    def cli(self) -> None:
        path = self.stack("one", 1)
        commands = {"help": ([*VMRUN, "--help"], (0,)),
                    "ps": ([*VMRUN, "ps", str(path)], (0, 1, 2, 3, 4)),
                    "check": ([*VMRUN, "check", str(path)], (0,))}
        count = max(5, 5 * self.runs)
        log(f"cli: vmrun --help, ps and check, {count} runs each, interleaved")
        for argv, codes in commands.values():
            checked(run(argv, timeout=30), argv, codes)  # warm up
        # Interleaved: a slow spell of the machine (seconds long, here) hits all three alike.
        for _ in range(count):
            for name, (argv, codes) in commands.items():
                self.measure(f"cli.{name}", f"`vmrun {argv[len(VMRUN)]}` wall time"
                             + (" (stack not running)" if name == "ps" else ""),
                             "s", ("<=", 0.060)).raw.append(
                                 checked(run(argv, timeout=30), argv, codes).wall)

    def teardown(self) -> None:
        path = self.stack("teardown", 4, sleep=60)
        for i in range(self.runs):
            log(f"teardown: run {i + 1} of {self.runs}")
            qemus, gone, exited, left = self.teardown_run(path)
            self.measure("teardown.qemus", "4-VM stack, QEMUs running at SIGINT", "",
                         ("==", 4), agg="max").raw.append(qemus)
            if gone is not None:
                self.measure("teardown.gone", "4-VM stack, SIGINT until its QEMUs are gone",
                             "s").raw.append(gone)
            self.measure("teardown.exit", "4-VM stack, SIGINT until `vmrun up` exits",
                         "s").raw.append(exited)
            self.measure("teardown.left", "4-VM stack, QEMUs left 10 s after SIGINT", "",
                         ("==", 0), agg="max").raw.append(left)

    @staticmethod
    def teardown_run(path: Path) -> tuple[int, float | None, float, int]:
        """SIGINT once every guest sleeps: QEMUs then, seconds until they are gone (None: not
        within 10 s) and until vmrun exits, QEMUs left."""
        qemus: list[int] = []
        times: dict[str, float] = {}

        def alive() -> bool:
            return any(os.path.exists(f"/proc/{pid}") for pid in qemus)

        def interrupt(proc: subprocess.Popen[bytes], out: Output) -> None:
            if "sent" not in times:
                if len(out.first_of_each("bench")) == 4:
                    qemus.extend(p for p in descendants(proc.pid) if is_qemu(argv_of(p)))
                    proc.send_signal(signal.SIGINT)
                    times["sent"] = time.monotonic()
            elif "gone" not in times and not alive():
                times["gone"] = time.monotonic()

        out = vmrun_up(path, interrupt, every=0.005, codes=(128 + signal.SIGINT,))
        if "sent" not in times:
            raise SystemExit("teardown: no SIGINT sent")
        deadline = times["sent"] + 10
        while "gone" not in times and time.monotonic() < deadline:
            if not alive():
                times["gone"] = time.monotonic()
            time.sleep(0.005)
        gone = times["gone"] - times["sent"] if "gone" in times else None
        left = sum(os.path.exists(f"/proc/{pid}") for pid in qemus)
        return len(qemus), gone, out.end - times["sent"], left

    def cold(self) -> None:
        path = self.stack("cold", 4)
        # a capabilities cache of the benchmark's own: the host's stays as it is
        caps = path.parent / "caps-cache"
        for i in range(max(1, (self.runs + 1) // 2)):
            log(f"cold: run {i + 1}")
            shutil.rmtree(path.parent / ".vmrun", ignore_errors=True)
            shutil.rmtree(caps, ignore_errors=True)
            for state in ("cold", "warm"):
                out = vmrun_up(path, count := ProbeCount(), env={"VMRUN_CAPS_CACHE": str(caps)})
                m = self.measure
                m(f"cold.{state}", f"4-VM stack, {state}" + (
                    " (no state directory, no capabilities cache)" if state == "cold" else "")
                  + ", start to exit", "s").raw.append(out.wall)
                m(f"cold.{state}_probes", f"4-VM stack, {state}: roots in which libvirt probed "
                  "QEMU's capabilities", "", ("==", 1 if state == "cold" else 0),
                  agg="max").raw.append(len(count.roots))
                if state == "cold":
                    m("cold.probe_drivers", "4-VM stack, cold: probe drivers "
                      "(`vmrun.proc.driver probe`)", "", agg="max").raw.append(
                          len(count.drivers))

    def clean(self) -> None:
        for path in self.manifests:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([*VMRUN, "clean", str(path)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=60, check=False)


# --- the machine and the report -----------------------------------------------------------

def output_of(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              check=False, cwd=REPO).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict[str, Any]:
    info = {"cpu": "unknown CPU", "memory": ""}
    for name, key, word in (("cpuinfo", "cpu", "model name"), ("meminfo", "memory", "MemTotal")):
        with open(f"/proc/{name}", encoding="ascii", errors="replace") as f:
            line = next((line for line in f if line.startswith(word)), "")
        if line:
            info[key] = line.split(":", 1)[1].strip()
    libvirt = output_of([sys.executable, "-c", "import libvirt; v = libvirt.getVersion(); "
                         "print(f'{v // 1000000}.{v // 1000 % 1000}.{v % 1000}')"])
    return {
        "cpu": info["cpu"],
        "cores": os.cpu_count(),
        "memory_gib": round(int(info["memory"].split()[0]) / MIB, 1) if info["memory"] else None,
        "kernel": f"{platform.system()} {platform.release()}",
        "qemu": output_of(["qemu-system-x86_64", "--version"]).split("\n")[0],
        "libvirt": libvirt or "unknown",
        "python": platform.python_version(),
        "accel": "TCG (forced; no usable KVM)",
    }


def wrap(text: str) -> list[str]:
    return textwrap.wrap(text, width=92, break_on_hyphens=False, break_long_words=False)


def report(results: Results, meta: dict[str, Any], kinds: dict[str, tuple[int, float]]) -> str:
    mach = meta["machine"]
    commit = meta["commit"][:12] + (" with local changes" if meta["dirty"] else "")
    lines = [
        "# Performance", "", *wrap(
        f"Measured by `make bench` (`bench/bench.py --runs {meta['runs']}`, medians) on "
        f"{meta['date'][:10]}, commit {commit}: {mach['cpu']}, {mach['cores']} cores, "
        f"{mach['memory_gib']} GiB, {mach['kernel']}, {mach['qemu']}, libvirt "
        f"{mach['libvirt']}, {mach['accel']}. The guest is the test guest (`build/guest/`): "
        "it boots, prints `bench` (then sleeps, where said) and powers off. `bench/bench.py "
        "--json FILE` keeps every raw value; `bench/compare.py OLD NEW` compares two runs."),
        "", "| measurement | value | goal | met? |", "|---|---|---|---|"]
    rank = {key: i for i, key in enumerate(ORDER)}
    for _, m in sorted(results.items(), key=lambda item: (
            PARTS.index(item[0].split(".")[0]), rank.get(item[0], len(ORDER)))):
        goal = "—" if m.goal is None else f"{'≤' if m.goal[0] == '<=' else '='} " + fmt(
            m.goal[1], m.unit)
        met = {None: "", True: "yes", False: "**no**"}[m.met]
        lines.append(f"| {m.label} | {fmt(m.value, m.unit)} | {goal} | {met} |")
    if any(f"scale.wall{n}" in results for n in SCALE):
        lines += ["", "### Scaling (warm, every VM of the stack booting at once)", "",
                  "| VMs | until every VM runs | until every first console line | start to exit |",
                  "|---|---|---|---|"]
        for n in SCALE:
            cells = [results.get(f"scale.{what}{n}") for what in ("running", "console", "wall")]
            lines.append(f"| {n} | " + " | ".join(fmt(m.value if m else None, "s")
                                                   for m in cells) + " |")
        lines += ["", *wrap("A VM runs from the moment libvirt resumed its vCPUs (vmrun's "
                            "`started` in last-run.json, to the millisecond): what vmrun does "
                            "to start a stack. Its first console line comes once the guest "
                            "has booted, and 8 guests booting at once on this machine's 2 "
                            "cores take as long as 8 plain QEMUs do (the `vs_qemu` line). The "
                            "8 sequential plain QEMU runs are not run: they are estimated as "
                            "8 × plain QEMU's median of this run.")]
    if kinds:
        lines += ["", "### Memory of vmrun's processes, 8-VM stack (PSS from smaps_rollup)", "",
                  "| process | count | largest |", "|---|---|---|"]
        lines += [f"| {kind} | {count} | {largest:.1f} MiB |"
                  for kind, (count, largest) in sorted(kinds.items())]
        lines += ["", *wrap("Sampled once per run, when every guest has printed `bench` and "
                            "sleeps (`guest.sleep=5`); the largest process of each kind over "
                            "the runs. QEMU and libvirt's short-lived forks are excluded.")]
    if "teardown.exit" in results:
        lines += ["", *wrap("Teardown: SIGINT reaches `vmrun up` once every guest has printed "
                            "`bench` and sleeps (`guest.sleep=60`); a QEMU is gone when its "
                            "/proc entry is (reaped), polled every 5 ms.")]
    return "\n".join(lines) + "\n"


def write_doc(doc: Path, text: str) -> None:
    """Replace `doc` up to its first `## ` heading with `text`; keep the rest."""
    old = doc.read_text() if doc.exists() else ""
    match = re.search(r"^## ", old, re.MULTILINE)
    doc.write_text(text + ("\n" + old[match.start():] if match else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (default 5)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default: all of {','.join(PARTS)})")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every raw value here")
    parser.add_argument("--write", action="store_true",
                        help="replace docs/performance.md up to its first `## ` heading")
    args = parser.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts or args.runs < 1:
        parser.error(f"unknown part {', '.join(unknown)}" if unknown else "nothing to run")

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="vmrun-bench-"))
    bench = Bench(work, args.runs)
    try:
        if "single" in parts or "poweroff" in parts:
            bench.single(with_qemu="single" in parts)
        for part in ("scale", "memory", "cli", "teardown", "cold"):
            if part in parts:
                getattr(bench, part)()
    finally:
        bench.clean()
        shutil.rmtree(work, ignore_errors=True)

    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "commit": output_of(["git", "rev-parse", "HEAD"]),
        "dirty": bool(output_of(["git", "status", "--porcelain", "--untracked-files=no"])),
        "runs": args.runs, "parts": parts, "machine": machine(),
        "duration_s": round(time.time() - started, 1),
    }
    text = report(bench.results, meta, bench.memory_kinds)
    print(text)
    if args.json:
        data = {**meta, "measurements": {
            key: {"label": m.label, "unit": m.unit, "value": m.value, "raw": m.raw,
                  "aggregate": m.agg, "goal": list(m.goal) if m.goal else None, "met": m.met,
                  "better": "lower"}
            for key, m in bench.results.items()},
            "memory_by_kind": {k: {"count": c, "largest_mib": x}
                               for k, (c, x) in bench.memory_kinds.items()}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    if args.write:
        write_doc(REPO / "docs" / "performance.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
