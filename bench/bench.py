"""Benchmark vmrun against plain QEMU on the test guest.

Measures, with medians over --runs runs:

1. one guest via `vmrun up` (warm state) versus the same kernel/initrd started by plain
   qemu-system-x86_64 (same machine type, TCG), wall time from start to exit, as a ratio;
2. guest poweroff -> `vmrun up` exit: from the moment the kernel's "reboot: Power down"
   line reaches vmrun's output to the moment vmrun has exited;
3. a 4-VM stack with a cold state directory and capabilities cache versus a warm one.

Prints a Markdown report (machine and date included); `--write` also stores it in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "build" / "guest"
VMRUN = [sys.executable, "-m", "vmrun"]
CMDLINE = 'console=ttyS0 quiet guest.say="bench"'
CAPS_CACHE = Path("/var/cache/vmrun/qemu-capabilities")


def manifest(directory: Path, vms: int) -> Path:
    lines = ['name = "bench"', 'accel = "tcg"', "", "[defaults]",
             f'kernel = "{GUEST / "vmlinuz"}"', f'initrd = "{GUEST / "initrd.gz"}"',
             'memory = "256M"', "timeout = 120", f"cmdline = '{CMDLINE}'"]
    for i in range(vms):
        lines += ["", f"[vm.vm{i}]"]
    path = directory / "bench.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_vmrun(path: Path) -> tuple[float, float | None]:
    """Wall time of `vmrun up`, and the delay from the last "Power down" line to exit."""
    start = time.monotonic()
    proc = subprocess.Popen([*VMRUN, "up", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    last_power_down = None
    for line in proc.stdout:
        if "reboot: Power down" in line:
            last_power_down = time.monotonic()
    code = proc.wait()
    end = time.monotonic()
    if code != 0:
        raise SystemExit(f"vmrun up exited {code}")
    return end - start, (end - last_power_down) if last_power_down else None


def run_qemu() -> float:
    start = time.monotonic()
    subprocess.run(
        ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "256",
         "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
         "-kernel", str(GUEST / "vmlinuz"), "-initrd", str(GUEST / "initrd.gz"),
         "-append", CMDLINE],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        check=True, timeout=120,
    )
    return time.monotonic() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="update docs/performance.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vmrun-bench-"))
    try:
        (work / "one").mkdir()
        one = manifest(work / "one", 1)
        run_vmrun(one)  # warm the state directory and the capabilities cache
        vmrun_times, exit_delays, qemu_times = [], [], []
        for _ in range(args.runs):
            qemu_times.append(run_qemu())
            wall, delay = run_vmrun(one)
            vmrun_times.append(wall)
            if delay is not None:
                exit_delays.append(delay)

        (work / "four").mkdir()
        four = manifest(work / "four", 4)
        cold, warm = [], []
        for _ in range(max(3, args.runs // 2)):
            shutil.rmtree(work / "four" / ".vmrun", ignore_errors=True)
            shutil.rmtree(CAPS_CACHE, ignore_errors=True)
            cold.append(run_vmrun(four)[0])
            warm.append(run_vmrun(four)[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cpu = "unknown CPU"
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu_version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                  text=True, check=False).stdout.splitlines()[0]
    report = f"""# Performance

Measured by `make bench` (`bench/bench.py`, {args.runs} runs, medians) on
{time.strftime('%Y-%m-%d')}: {platform.node()}, {os.cpu_count()} cores, {cpu},
Linux {platform.release()}, {qemu_version}, TCG (no usable KVM). The guest is the test
guest (`build/guest/`): it boots, prints a line and powers off.

| measurement | median |
|---|---|
| one guest, plain `qemu-system-x86_64` (q35, TCG), start to exit | {median(qemu_times):.2f} s |
| one guest, `vmrun up` (warm state), start to exit | {median(vmrun_times):.2f} s |
| ratio `vmrun up` / plain QEMU | {median(vmrun_times) / median(qemu_times):.2f} |
| guest poweroff ("reboot: Power down") to `vmrun up` exit | {median(exit_delays):.3f} s |
| 4-VM stack, cold (no state directory, no capabilities cache) | {median(cold):.2f} s |
| 4-VM stack, warm | {median(warm):.2f} s |

Raw values (s): plain QEMU {', '.join(f'{t:.2f}' for t in qemu_times)};
`vmrun up` {', '.join(f'{t:.2f}' for t in vmrun_times)};
poweroff to exit {', '.join(f'{t:.3f}' for t in exit_delays)};
cold {', '.join(f'{t:.2f}' for t in cold)}; warm {', '.join(f'{t:.2f}' for t in warm)}.
"""
    print(report)
    if args.write:
        (REPO / "docs" / "performance.md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
