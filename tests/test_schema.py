"""The generated JSON Schema: valid, complete, and in agreement with the parser."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator, Draft202012Validator

from vmrun import manifest, schema
from vmrun.errors import ManifestError

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("**/*.toml"))


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    return Draft202012Validator(schema.manifest_schema())


def schema_errors(validator: Draft202012Validator, source: str) -> list[str]:
    return [e.message for e in validator.iter_errors(tomllib.loads(source))]


def parser_accepts(directory: Path, source: str, filename: str = "stack.toml") -> bool:
    (directory / "vmlinuz").write_bytes(b"kernel")
    try:
        manifest.loads(source, directory / filename, host_memory=1 << 20)
    except ManifestError:
        return False
    return True


def test_schema_is_valid_draft_2020_12() -> None:
    Draft202012Validator.check_schema(schema.manifest_schema())
    assert schema.manifest_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_json_is_stable_and_sorted() -> None:
    text = schema.schema_json()
    assert text == schema.schema_json()
    assert json.loads(text) == schema.manifest_schema()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
    assert not text.endswith("\n")


def test_manifest_schema_returns_a_fresh_copy() -> None:
    first = schema.manifest_schema()
    first["$defs"]["vm"]["properties"]["cpus"]["maximum"] = 1
    assert schema.manifest_schema()["$defs"]["vm"]["properties"]["cpus"]["maximum"] == 64
    cpus = next(s for s in manifest.VM_SETTINGS if s.key == "cpus")
    assert dict(cpus.schema)["maximum"] == 64


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_examples_validate(validator: Draft202012Validator, path: Path) -> None:
    assert schema_errors(validator, path.read_text()) == []


def test_there_are_examples() -> None:
    assert EXAMPLES


def test_keys_match_the_parser_tables() -> None:
    doc = schema.manifest_schema()
    stack_keys = {s.key for s in manifest.STACK_SETTINGS} | set(manifest.STACK_TABLES)
    vm_keys = {s.key for s in manifest.VM_SETTINGS}
    assert set(doc["properties"]) == stack_keys
    assert set(doc["$defs"]["vm"]["properties"]) == vm_keys
    assert set(doc["$defs"]["defaults"]["properties"]) == vm_keys
    for table in (doc, doc["$defs"]["vm"], doc["$defs"]["defaults"], doc["properties"]["vm"]):
        assert table["additionalProperties"] is False
    assert doc["$defs"]["defaults"].get("required", []) == []
    assert doc["$defs"]["vm"].get("required", []) == []


def test_descriptions_and_defaults_come_from_the_settings() -> None:
    doc = schema.manifest_schema()
    tables = [(doc["properties"], manifest.STACK_SETTINGS),
              (doc["$defs"]["vm"]["properties"], manifest.VM_SETTINGS)]
    for properties, settings in tables:
        for setting in settings:
            prop = properties[setting.key]
            assert prop["description"] == setting.doc
            if setting.default is None:
                assert "default" not in prop
            else:
                # as JSON has it (a tuple default is an array)
                assert prop["default"] == json.loads(json.dumps(setting.default))


@pytest.mark.parametrize("name", [
    "a", "alpha", "beta-2", "a" * manifest.VM_NAME_MAX, "a" * (manifest.VM_NAME_MAX + 1),
    "Alpha", "2a", "-a", "a_b", "a.b", "", "a b", "é",
])
def test_vm_name_pattern_agrees_with_the_parser(name: str) -> None:
    parser_ok = bool(manifest.NAME_RE.match(name)) and len(name) <= manifest.VM_NAME_MAX
    assert bool(re.search(schema.vm_name_pattern(), name)) == parser_ok


@pytest.mark.parametrize("text", [
    "128", "512M", "1G", "65536K", "2GiB", "2gib", " 3 g ", "7T", "256B", "16MB",
    "lots", "", "M", "1.5G", "-1", "1 P", "1GiBB", "0x10",
])
def test_size_pattern_agrees_with_the_parser(text: str) -> None:
    try:
        manifest.parse_size_mib(text)
        parser_ok = True
    except manifest.Invalid:
        parser_ok = False
    assert bool(re.search(manifest.SIZE_JSON_PATTERN, text)) == parser_ok


GOOD = [
    '[vm.a]\nkernel = "vmlinuz"\n',
    '[defaults]\nkernel = "vmlinuz"\n[vm.a]\n[vm.b]\ncpus = 2\n',
    'name = "lab"\naccel = "tcg"\nstop_timeout = 2.5\nstate_dir = "s"\n'
    '[vm.a]\nkernel = "vmlinuz"\nmemory = "1G"\ncpus = 64\ntimeout = 60\n'
    'success = "ok"\nfailure = "FAIL"\ncmdline = "console=ttyS0"\n',
    '[vm.a]\nkernel = "vmlinuz"\nmemory = 16\n',
    f'[vm.{"a" * manifest.VM_NAME_MAX}]\nkernel = "vmlinuz"\n',
]

BAD = [
    ('[vm.a]\nkernel = "vmlinuz"\ncolour = "red"\n', "unknown VM key"),
    ('colour = "red"\n[vm.a]\nkernel = "vmlinuz"\n', "unknown stack key"),
    ('[defaults]\nmemroy = 128\n[vm.a]\nkernel = "vmlinuz"\n', "unknown defaults key"),
    ('[vm.a]\nkernel = "vmlinuz"\ncpus = "two"\n', "wrong type"),
    ('[vm.a]\nkernel = "vmlinuz"\ncpus = 0\n', "too few CPUs"),
    ('[vm.a]\nkernel = "vmlinuz"\ncpus = 65\n', "too many CPUs"),
    ('[vm.a]\nkernel = "vmlinuz"\nmemory = "lots"\n', "bad size"),
    ('[vm.a]\nkernel = "vmlinuz"\nmemory = 8\n', "too little memory"),
    ('[vm.a]\nkernel = "vmlinuz"\ntimeout = 0\n', "zero timeout"),
    ('[vm.a]\nkernel = "vmlinuz"\ntimeout = 700000\n', "huge timeout"),
    ('stop_timeout = "soon"\n[vm.a]\nkernel = "vmlinuz"\n', "wrong type seconds"),
    ('[vm.a]\nkernel = 1\n', "kernel not a string"),
    ('[vm.a]\nkernel = "vmlinuz"\nsuccess = ""\n', "empty regex"),
    ('[vm.Alpha]\nkernel = "vmlinuz"\n', "bad VM name"),
    ('[vm.2a]\nkernel = "vmlinuz"\n', "VM name starts with a digit"),
    (f'[vm.{"a" * (manifest.VM_NAME_MAX + 1)}]\nkernel = "vmlinuz"\n', "VM name too long"),
    ('accel = "fast"\n[vm.a]\nkernel = "vmlinuz"\n', "bad accel"),
    ('name = "Bad Name"\n[vm.a]\nkernel = "vmlinuz"\n', "bad stack name"),
    (f'name = "{"a" * 41}"\n[vm.a]\nkernel = "vmlinuz"\n', "stack name too long"),
    ('name = "x"\n', "no VM"),
    ('name = "x"\nvm = {}\n', "empty vm table"),
    ('[vm]\na = 1\n', "VM not a table"),
    ('defaults = 1\n[vm.a]\nkernel = "vmlinuz"\n', "defaults not a table"),
    ('[vm.a]\ncpus = 1\n', "kernel missing"),
    ('[defaults]\ncpus = 1\n[vm.a]\nkernel = "vmlinuz"\n[vm.b]\n', "kernel missing in one VM"),
]


@pytest.mark.parametrize("source", GOOD)
def test_good_manifests_pass_both(tmp_path: Path, validator: Draft202012Validator,
                                  source: str) -> None:
    assert parser_accepts(tmp_path, source)
    assert schema_errors(validator, source) == []


@pytest.mark.parametrize(("source", "what"), BAD, ids=[what for _, what in BAD])
def test_bad_manifests_fail_both(tmp_path: Path, validator: Draft202012Validator,
                                 source: str, what: str) -> None:
    assert not parser_accepts(tmp_path, source), what
    assert schema_errors(validator, source), what


@pytest.mark.parametrize("source", [*GOOD, *(source for source, _ in BAD),
                                    *(path.read_text() for path in EXAMPLES)])
def test_draft_7_validators_agree(validator: Draft202012Validator, source: str) -> None:
    """Only keywords that mean the same in draft 7 are used, so a validator that knows
    draft 7 but not 2020-12 reaches the same verdict."""
    data = tomllib.loads(source)
    draft7 = Draft7Validator(schema.manifest_schema())
    assert draft7.is_valid(data) == validator.is_valid(data)


def test_every_setting_has_a_schema() -> None:
    for setting in (*manifest.STACK_SETTINGS, *manifest.VM_SETTINGS):
        value_schema: dict[str, Any] = dict(setting.schema)
        assert "type" in value_schema or "anyOf" in value_schema, setting.key


# What JSON Schema cannot check (docs/schema.md, "Limits"): the schema accepts these and
# `vmrun check` rejects them.  If one starts failing the schema, update the docs.
KNOWN_GAPS = [
    ('[vm.a]\nkernel = "missing"\n', "stack.toml", "file must exist"),
    ('[vm.a]\nkernel = "vmlinuz"\nmemory = "4096G"\n', "stack.toml", "host memory"),
    ('[vm.a]\nkernel = "vmlinuz"\nmemory = "8M"\n', "stack.toml", "size string below 16M"),
    ('[vm.a]\nkernel = "vmlinuz"\nmemory = "100K"\n', "stack.toml", "not whole MiB"),
    ('[vm.a]\nkernel = "vmlinuz"\nsuccess = "(("\n', "stack.toml", "RE2 regex syntax"),
    ('[vm.a]\nkernel = "vmlinuz"\ncpus = 2.0\n', "stack.toml", "2.0 is an integer"),
    ('[vm.a]\nkernel = "vmlinuz"\ntimeout = nan\n', "stack.toml", "nan"),
    ('[vm.a]\nkernel = "vmlinuz"\n', "Bad Name.toml", "name from the file name"),
    ('[vm.a]\nkernel = "vmlinuz"\nshares = [{ host = "missing", guest = "/m" }]\n',
     "stack.toml", "shared directory must exist"),
    ('[vm.a]\nkernel = "vmlinuz"\nshares = [{ host = ".", guest = "/a/../b" }]\n',
     "stack.toml", "guest path with .."),
    ('[vm.a]\nkernel = "vmlinuz"\ncmdline = "\\u001b[2J"\n', "stack.toml",
     "control character libvirt's XML cannot hold"),
]


@pytest.mark.parametrize(("source", "filename", "what"), KNOWN_GAPS,
                         ids=[what for _, _, what in KNOWN_GAPS])
def test_known_gaps(tmp_path: Path, validator: Draft202012Validator, source: str,
                    filename: str, what: str) -> None:
    assert schema_errors(validator, source) == [], what
    assert not parser_accepts(tmp_path, source, filename), what
