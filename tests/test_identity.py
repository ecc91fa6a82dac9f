"""The light identity reader (vmrun/identity.py) gives what manifest.load_identity gives.

`vmrun ps`, `down`, `logs` and the other verbs on a running stack read the stack's
identity without the manifest parser when the manifest is plain, and leave everything
else to the parser.  Both must agree on every manifest: the same Identity, or the same
error (message, lines, exit status).
"""

from __future__ import annotations

import copy
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from vmrun import identity, manifest
from vmrun.errors import Problem, VmrunError
from vmrun.fileconvert import Share
from vmrun.layout import StackPaths
from vmrun.tomlkeys import parse_toml
from vmrun.xmltext import xml_unsafe

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(REPO.glob("examples/*/stack.toml"))

# Manifests, most of them not plain: every way the identity's keys can be written, right
# or wrong (other keys do not matter to an identity, but some are here, wrong, too).
CASES = {
    "plain": 'name = "lab"\n[vm.a]\nkernel = "vmlinuz"\n[vm.b]\n',
    "no vm": 'name = "lab"\n',
    "empty": "",
    "named by the file": "[vm.a]\n",
    "state_dir": 'state_dir = "state"\n[vm.a]\n',
    "state_dir home": 'state_dir = "~/somewhere"\n[vm.a]\n',
    "state_dir absolute": 'state_dir = "/tmp/vmrun-identity-test"\n[vm.a]\n',
    "state_dir dotdot": 'state_dir = "../up/there"\n[vm.a]\n',
    "state_dir interpolated": 'state_dir = "${STATE:-state}"\n[vm.a]\n',
    "state_dir from .env": 'state_dir = "${FROM_ENV_FILE}"\n[vm.a]\n',
    "state_dir $$": 'state_dir = "a$$b"\n[vm.a]\n',
    "state_dir unset": 'state_dir = "${NO_SUCH_VARIABLE_HERE}"\n[vm.a]\n',
    "state_dir number": "state_dir = 5\n[vm.a]\n",
    "state_dir control": 'state_dir = "a\\u0001b"\n[vm.a]\n',
    "state_dir nul": 'state_dir = "a\\u0000b"\n[vm.a]\n',
    "state_dir empty": 'state_dir = ""\n[vm.a]\n',
    "name interpolated": 'name = "${NAME:-lab}"\n[vm.a]\n',
    "name unset": 'name = "${NO_SUCH_VARIABLE_HERE}"\n[vm.a]\n',
    "name upper": 'name = "Lab"\n[vm.a]\n',
    "name long": f'name = "{"a" * 41}"\n[vm.a]\n',
    "name longest": f'name = "{"a" * 40}"\n[vm.a]\n',
    "name number": "name = 3\n[vm.a]\n",
    "name table": "[name]\n[vm.a]\n",
    "count": "[vm.a]\ncount = 3\n[vm.b]\n",
    "count in defaults": "[defaults]\ncount = 2\n[vm.a]\n[vm.b]\ncount = 1\n",
    "count largest": "[vm.a]\ncount = 64\n",
    "count zero": "[vm.a]\ncount = 0\n",
    "count 65": "[vm.a]\ncount = 65\n",
    "count bool": "[vm.a]\ncount = true\n",
    "count float": "[vm.a]\ncount = 2.0\n",
    "count string": '[defaults]\ncount = "two"\n[vm.a]\n',
    "count interpolated": '[vm.a]\ncount = "${N:-2}"\n',
    "count array": '[vm.a]\ncount = ["${N}"]\n',
    "copy name too long": "[vm.abcdefghijklmnopqr]\ncount = 10\n",
    "copy name longest": "[vm.abcdefghijklmnop]\ncount = 10\n",
    "copies clash": "[vm.a]\ncount = 2\n[vm.a-1]\n",
    "vm name upper": "[vm.Alpha]\n",
    "vm name long": f"[vm.{'a' * 21}]\n",
    "vm not a table": 'vm = "a"\n',
    "vm entry not a table": "[vm]\na = 1\n",
    "vm array of tables": "[[vm]]\n",
    "defaults not a table": 'defaults = 3\n[vm.a]\n',
    "defaults count, vm not a table": "[defaults]\ncount = 2\n[vm]\na = 1\n",
    "too many VMs": "".join(f"[vm.v{i}]\ncount = 64\n" for i in range(17)),
    "bad elsewhere": '[vm.a]\nkernel = "gone"\nmemory = "${MEM}"\ncolour = "red"\n'
                     "[network.Bad]\n",
    "bad .env elsewhere": '[vm.a]\nmemory = "${MEM:-128M}"\n',
    "syntax error": 'name = "lab"\n[vm.a]\nkernel = \n',
    "too deep": "x = " + "[" * 30 + "]" * 30 + "\n[vm.a]\n",
}


def answer(load: Callable[..., identity.Identity], path: Path, state_dir: str | None) -> object:
    """What a loader gives: the Identity, or the error as the user sees it."""
    try:
        return load(path, state_dir=state_dir)
    except VmrunError as exc:
        return type(exc), exc.lines(), exc.exit_code


def agree(path: Path, state_dir: str | None = None) -> object:
    light = answer(identity.load_identity, path, state_dir)
    full = answer(manifest.load_identity, path, state_dir)
    assert light == full
    return light


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
@pytest.mark.parametrize("state_dir", [None, "/tmp/elsewhere"])
def test_the_examples_agree_and_are_plain(path: Path, state_dir: str | None) -> None:
    found = agree(path, state_dir)
    assert isinstance(found, identity.Identity)
    assert found == manifest.load(path, state_dir=state_dir).identity
    data, _lines = parse_toml(path.read_text(), path)
    assert identity.plain_identity(data, path, state_dir) == found  # no fallback


@pytest.mark.parametrize("text", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("state_dir", [None, "override", "/tmp/elsewhere", "bad\0dir"])
def test_every_case_agrees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str,
                           state_dir: str | None) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STATE", raising=False)
    monkeypatch.delenv("NAME", raising=False)
    (tmp_path / ".env").write_text("FROM_ENV_FILE=from-env\nnot a line\n")
    path = tmp_path / "my-lab.toml"
    path.write_text(text)
    agree(path, state_dir)
    monkeypatch.setenv("STATE", "elsewhere")
    monkeypatch.setenv("NAME", "other")
    agree(path, state_dir)


@pytest.mark.parametrize("name", ["stack.toml", "My Lab.toml", "x" * 41 + ".toml", "a.b.toml",
                                  "vmrun", "lab\x01.toml"])
def test_names_from_the_file_name_agree(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("[vm.a]\n")
    agree(path)


def test_odd_paths_agree(tmp_path: Path) -> None:
    agree(tmp_path / "missing.toml")
    (tmp_path / "dir.toml").mkdir()
    agree(tmp_path / "dir.toml")
    loop = tmp_path / "loop.toml"
    loop.symlink_to(loop)
    agree(loop)
    odd = tmp_path / "odd\x1bdir"
    odd.mkdir()
    (odd / "stack.toml").write_text("[vm.a]\n")
    agree(odd / "stack.toml")
    (tmp_path / "bad-utf8.toml").write_bytes(b'name = "\xff"\n')
    agree(tmp_path / "bad-utf8.toml")


def test_the_plain_cases_take_the_light_path(tmp_path: Path) -> None:
    """The plain manifests are answered without the parser (which then stays unimported:
    tests/test_cli_imports.py checks that for `vmrun ps`)."""
    for key in ("plain", "no vm", "named by the file", "state_dir", "count",
                "count in defaults", "copy name longest", "copies clash", "bad elsewhere"):
        path = tmp_path / "lab.toml"
        path.write_text(CASES[key])
        data, _lines = parse_toml(CASES[key], path)
        assert identity.plain_identity(data, path, None) is not None, key
    path.write_text(CASES["state_dir interpolated"])
    data, _lines = parse_toml(CASES["state_dir interpolated"], path)
    assert identity.plain_identity(data, path, None) is None


def test_identity_is_a_value() -> None:
    one = identity.Identity(Path("/m.toml"), "lab", Path("/s/lab"), ("a", "b"))
    same = manifest.Identity(path=Path("/m.toml"), name="lab", state_dir=Path("/s/lab"),
                             vm_names=("a", "b"))
    assert one == same and hash(one) == hash(same)
    assert one != identity.Identity(Path("/m.toml"), "lab", Path("/s/lab"), ("a",))
    assert repr(one) == ("Identity(path=PosixPath('/m.toml'), name='lab', "
                         "state_dir=PosixPath('/s/lab'), vm_names=('a', 'b'))")
    assert one.paths.dir == Path("/s/lab")
    with pytest.raises(AttributeError):
        one.name = "other"  # type: ignore[misc]


def test_find_manifest_is_the_same(tmp_path: Path) -> None:
    assert manifest.find_manifest is identity.find_manifest
    (tmp_path / "vmrun.toml").write_text("")
    assert identity.find_manifest(tmp_path) == tmp_path / "vmrun.toml"


def test_xml_unsafe_is_xml_1_0() -> None:
    """Exactly the characters outside XML 1.0's Char production are refused."""
    def allowed(code: int) -> bool:
        return code in (0x9, 0xA, 0xD) or 0x20 <= code <= 0xD7FF or \
            0xE000 <= code <= 0xFFFD or 0x10000 <= code <= 0x10FFFF

    text = "".join(chr(code) for code in range(sys.maxunicode + 1))
    refused = {ord(c) for c in text if xml_unsafe(c) is not None}
    assert refused == {code for code in range(sys.maxunicode + 1) if not allowed(code)}
    assert xml_unsafe("ok\x01\x02") == "\x01"
    assert xml_unsafe(os.fsdecode(b"a\xffb")) == "\udcff"


def test_records_behave_as_the_dataclasses_they_replace() -> None:
    """vmrun/record.py: frozen ones compare, hash and print by value; Problem is mutable."""
    paths = StackPaths(Path("/s"))
    assert paths == StackPaths(Path("/s")) and hash(paths) == hash(StackPaths(Path("/s")))
    assert paths != StackPaths(Path("/t")) and paths != Path("/s")
    assert repr(paths) == "StackPaths(dir=PosixPath('/s'))"
    with pytest.raises(AttributeError):
        paths.dir = Path("/t")  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(paths)) == paths == copy.deepcopy(paths)
    share = Share(Path("/src"), "/src", False, "share0")
    assert share == Share(host=Path("/src"), guest="/src", readonly=False, tag="share0")
    assert {share: 1}[Share(Path("/src"), "/src", False, "share0")] == 1
    problem = Problem("bad", key="k")
    assert problem == Problem("bad", None, None, "k") and problem != Problem("bad")
    problem.hint = "fix it"
    assert repr(problem) == ("Problem(message='bad', file=None, line=None, key='k', "
                             "expected=None, found=None, hint='fix it')")
    with pytest.raises(TypeError):
        hash(problem)
