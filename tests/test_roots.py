"""Short embedded roots: made for deep state directories, collected when those are gone."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from vmrun import layout, roots
from vmrun.errors import HostError
from vmrun.layout import ROOT_PATH_MAX, StackPaths


def test_short_root_is_linked_and_collected(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / "stack"
    paths = StackPaths(deep).vm("alpha")
    assert len(str(paths.root_link)) > ROOT_PATH_MAX
    roots.prepare(paths)
    try:
        assert paths.root != paths.root_link and len(str(paths.root)) <= ROOT_PATH_MAX
        assert paths.root_link.resolve() == paths.root
        assert (paths.root / "etc" / "qemu.conf").read_text().startswith("# Written by vmrun")
        assert paths.root not in roots.collect_garbage()  # its state directory exists
        assert paths.root.exists()
        shutil.rmtree(deep)  # deleted without `vmrun clean`
        assert paths.root in roots.collect_garbage()
        assert not paths.root.exists()
    finally:
        shutil.rmtree(paths.root, ignore_errors=True)


def test_a_short_state_dir_keeps_the_root_in_place(tmp_path: Path) -> None:
    paths = StackPaths(Path("/tmp/v")).vm("a")
    assert paths.root == paths.root_link


def test_private_dir_refuses_what_others_can_touch(tmp_path: Path) -> None:
    mine = layout.private_dir(tmp_path / "mine")
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    assert layout.private_dir(mine) == mine  # again: fine
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)  # another user made it first
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    link = tmp_path / "link"
    link.symlink_to(mine)
    for bad, why in ((theirs, "belongs to uid 65534"), (shared, "others can write"),
                     (link, "symbolic link")):
        with pytest.raises(HostError, match=why):
            layout.private_dir(bad)


def test_roots_are_written_without_following_symlinks(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    paths = StackPaths(tmp_path / "s").vm("a")
    paths.qemu_conf.parent.mkdir(parents=True)
    paths.qemu_conf.symlink_to(victim)  # planted where vmrun writes qemu.conf
    with pytest.raises(OSError):
        roots.prepare(paths)
    assert victim.read_text() == "precious\n"
