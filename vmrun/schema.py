"""The manifest's JSON Schema (draft 2020-12), generated from the parser's own tables.

Every key, type, bound and pattern comes from `vmrun.manifest` (`STACK_SETTINGS`,
`VM_SETTINGS`, `STACK_TABLES`, `NAME_RE`, the limits), so the schema cannot drift from
what `vmrun check` accepts.  What JSON Schema cannot say (files must exist, memory at most
the host's, regexes in RE2 syntax, ...) is listed in docs/schema.md.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from vmrun import manifest

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _value_schema(setting: manifest.Setting) -> dict[str, Any]:
    out = copy.deepcopy(dict(setting.schema))
    out["description"] = setting.doc
    if setting.default is not None:
        default = setting.default
        out["default"] = list(default) if isinstance(default, tuple) else default
    return out


def _table(settings: tuple[manifest.Setting, ...], description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "properties": {s.key: _value_schema(s) for s in settings},
        "additionalProperties": False,
    }


def vm_name_pattern() -> str:
    """`NAME_RE` with the `VM_NAME_MAX` length limit built in, anchored."""
    match = re.fullmatch(r"\^(\[[^\]]+\])(\[[^\]]+\])\*\$", manifest.json_pattern(manifest.NAME_RE))
    if match is None:  # NAME_RE changed shape: teach this function the new one
        raise ValueError(f"cannot bound the length of {manifest.NAME_RE.pattern!r}")
    first, rest = match.groups()
    return f"^{first}{rest}{{0,{manifest.VM_NAME_MAX - 1}}}$"


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of a stack manifest, as a fresh dict."""
    top = _table(manifest.STACK_SETTINGS, "A vmrun stack manifest (TOML).")
    top["properties"]["defaults"] = {
        "$ref": "#/$defs/defaults", "description": manifest.STACK_TABLES["defaults"]}
    top["properties"]["vm"] = {
        "type": "object",
        "description": manifest.STACK_TABLES["vm"],
        "minProperties": 1,
        "maxProperties": manifest.MAX_VMS,
        "propertyNames": {"pattern": manifest.json_pattern(manifest.NAME_RE),
                          "maxLength": manifest.VM_NAME_MAX},
        "patternProperties": {vm_name_pattern(): {"$ref": "#/$defs/vm"}},
        "additionalProperties": False,
    }
    top["properties"]["network"] = {
        "type": "object",
        "description": manifest.STACK_TABLES["network"],
        "maxProperties": manifest.MAX_NETWORKS,
        "propertyNames": {"pattern": manifest.json_pattern(manifest.NAME_RE),
                          "maxLength": manifest.NETWORK_NAME_MAX},
        "additionalProperties": {
            "type": "object", "additionalProperties": False,
            "properties": {"subnet": {"type": "string",
                                      "description": "IPv4 subnet, prefix /8 to /28"}}},
    }
    top["required"] = ["vm"]
    # A VM needs something to boot, a kernel or a disk, unless [defaults] gives one.
    bootable = {"anyOf": [{"required": ["kernel"]}, {"required": ["disks"]}]}
    top["allOf"] = [{
        "if": {"not": {"required": ["defaults"], "properties": {"defaults": bootable}}},
        "then": {"properties": {"vm": {"patternProperties": {vm_name_pattern(): bootable}}}},
    }]
    top["$defs"] = {
        "vm": _table(manifest.VM_SETTINGS, "One VM: `[vm.NAME]`."),
        "defaults": _table(manifest.VM_SETTINGS, manifest.STACK_TABLES["defaults"]),
    }
    return {"$schema": DIALECT, "title": "vmrun stack manifest", **top}


def schema_json() -> str:
    """`manifest_schema()` as JSON: indented by 2, keys sorted, no trailing newline."""
    return json.dumps(manifest_schema(), indent=2, sort_keys=True, ensure_ascii=False)
