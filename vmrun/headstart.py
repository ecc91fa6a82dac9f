"""`vmrun up`'s head start: the PID namespace and the driver zygote, started by the CLI as
soon as the manifest is read, before it imports the supervisor.

Why: the zygote needs ~0.1 s to import the driver and libvirt before it can fork the
first driver.  Started from `Supervisor.run`, it began only after the supervisor's own
imports (~0.1 s), and the first driver waited for it (docs/performance.md).  Started
here, its imports run while the supervisor's do.  This module imports little for that
reason: the manifest is already loaded, and the supervisor is not.

Nothing of the stack is held here: the zygote has no lock (each driver gets it with its
fork request) and writes `zygote.log.new` until the supervisor, holding the lock, adopts
it (`Children.adopt` renames the log), so that a second `vmrun up` of a running stack,
which fails on the lock, does not touch the running zygote's log.  `close()` ends both if
the supervisor never adopts them; they also end with this process (the zygote's parent-
death signal; the init's guard pipe).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from vmrun import lock, zygote
from vmrun.layout import StackPaths
from vmrun.pidns import PidNamespace

NEW = ".new"  # the suffix of the zygote's log until it is adopted


def titles(paths: StackPaths, names: list[str]) -> list[list[str]]:
    """The command line of every driver a run of the stack may start (vmrun/zygote.py)."""
    return [zygote.title("probe", "", str(paths.probe_root())),
            *(zygote.title("run", name, str(paths.vm(name).dir)) for name in names)]


class HeadStart:
    def __init__(self, paths: StackPaths, names: list[str]) -> None:
        self.titles = titles(paths, names)
        lock.claim(paths)  # the stack's directory, made as the lock would (or refused)
        self.pidns: PidNamespace | None = PidNamespace.create()
        try:
            self.zygote: zygote.Zygote | None = zygote.start(
                paths.dir, self.titles, Path(f"{paths.zygote_log}{NEW}"), self.pidns)
        except BaseException:
            self.close()
            raise

    def pids(self) -> set[int]:
        """Its processes a search for a crashed run's leftovers must spare."""
        return {self.zygote.pid} if self.zygote is not None else set()

    def taken(self) -> tuple[PidNamespace | None, zygote.Zygote]:
        """Hand both over (to `Children.adopt`): `close()` then leaves them alone."""
        assert self.zygote is not None
        taken = (self.pidns, self.zygote)
        self.pidns = self.zygote = None
        return taken

    def close(self) -> None:
        """End and reap the zygote and the namespace's init, and remove the log."""
        if self.zygote is not None:
            self.zygote.end()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.zygote.log)
            self.zygote = None
        if self.pidns is not None:
            self.pidns.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pidns.init_pid, 0)
            self.pidns = None
