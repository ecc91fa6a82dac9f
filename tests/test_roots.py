"""Short embedded roots: made for deep state directories, collected when those are gone."""

from __future__ import annotations

import shutil
from pathlib import Path

from vmrun import roots
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
