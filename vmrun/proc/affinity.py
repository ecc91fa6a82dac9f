"""Keep libvirt from probing QEMU's capabilities again in every warm root.

libvirt (9.0) records, with the capabilities it probed, the CPUID data of the host CPU,
and probes again when a later driver reads different data.  Some CPUID leaves (0xb and
0x1f: the x2APIC id) differ from one CPU of the same host to the next, so a driver that
happened to run on another CPU than the probe paid a new probe (0.6-0.8 s here, measured
in docs/performance.md) and rewrote its root's cache.

`one_cpu()` runs a block (the probe; a driver's opening of its root, when libvirt reads
the CPUID data) with every thread of the process on one CPU, the same one each time (the
lowest the process may use), and gives the threads their CPUs back afterwards, so that
the QEMU libvirt starts later is not confined.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def _set_all(cpus: set[int]) -> None:
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that has just ended
            os.sched_setaffinity(int(tid), cpus)


def cpu() -> int | None:
    """The CPU `one_cpu` uses (None if the affinity cannot be read)."""
    try:
        return min(os.sched_getaffinity(0))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def one_cpu() -> Iterator[None]:
    try:
        allowed = os.sched_getaffinity(0)
    except OSError:
        allowed = set()
    if len(allowed) < 2:
        yield
        return
    _set_all({min(allowed)})
    try:
        yield
    finally:
        _set_all(allowed)
