"""Fuzz the manifest: seeded manifests, valid and mutated, through exactly what `vmrun
check` and `vmrun render` run (manifest.load, domain.validate, then disks.plan,
domain.build and domain.to_string for each VM), and through manifest.load_identity.

Nothing but a VmrunError may escape; every ManifestError problem names its file, has a
line whenever its key is in the document, and echoes no control character; when load()
succeeds, load_identity() agrees with it.

    VMRUN_FUZZ_COUNT=100000 VMRUN_FUZZ_SEED=7 .venv/bin/pytest -q tests/test_fuzz.py

VMRUN_FUZZ_COUNT=0 runs for VMRUN_FUZZ_SECONDS (default 60) instead of a count.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
import tomllib
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmrun import disks, domain, errors, manifest

SEED = int(os.environ.get("VMRUN_FUZZ_SEED", "1729"))
# The default fits in about 60 s on this 2-core machine: 230-325 manifests/s measured,
# depending on what else ran (16000 took 61.5-66.5 s at the slow end).
COUNT = int(os.environ.get("VMRUN_FUZZ_COUNT", "15000"))
SECONDS = float(os.environ.get("VMRUN_FUZZ_SECONDS", "60"))
# More time than pytest's default 120 s, in proportion to the count (at least 50/s).
TIMEOUT = max(120.0, COUNT / 50) if COUNT else SECONDS + 60

ODD_TEXT = ["", " ", "\t", "a\nb", "\x00", "\x01", "\x1b[31mred\x1b[0m", "\x1b]0;title\x07",
            "\x7f", "\x85", "\x9b2J", "\u202eevil", "\u2028", "\ufeff", "\ufffe", "\uffff",
            "é", "e\u0301", "𝔘𝔫𝔦", "🙂", "中文", "a" * 300, "x" * 5000, "${UNSET_VMRUN_FUZZ}",
            "${VMRUN_FUZZ_ESC}", "${VMRUN_FUZZ_SURROGATE}", "${X:-dflt}", "${", "$$", "${a b}",
            "{vm.name}", "{nope}", "{{", "}}", "{", "~", "~root", "~\u0000", "..", "/",
            "\\", '"', "'", "'''", '"""', "[", "]", "=", "#"]
BAD_NAMES = ["", "A", "Bad Name", "a.b", "a b", "2a", "-a", "a_b", "é", "a" * 21,
             "a" * 41, "\x00", "nul\x00", "\x1b[2J", "a\u202e", "vm", "x" * 300]
SIZES = ["128M", "1G", "16", "256MiB", "65536K", "2gib", " 3 g ", "0", "15M", "100K",
         "1.5G", "-1", "1P", "lots", "9" * 40 + "T", "9" * 5000, "64T", "1M"]


@dataclass(frozen=True)
class Raw:
    """TOML text written as is (numbers Python cannot print, dates, broken values)."""

    text: str


HUGE = [Raw("1" + "0" * 400), Raw("-1" + "0" * 400), Raw("9" * 5000), Raw("inf"),
        Raw("-inf"), Raw("nan"), Raw("1979-05-27T07:32:00Z"), Raw("07:32:00"),
        Raw("1979-05-27"), Raw("0x7fffffffffffffff"), Raw("0b1"), Raw("1e999"),
        2**63, -(2**63), 0, -1, 1.5, 1e-300]


# --- a small TOML writer ----------------------------------------------------------------

def _string(text: str, rng: random.Random) -> str:
    literal_ok = "'" not in text and "\n" not in text and \
        not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text if c != "\t")
    if literal_ok and rng.random() < 0.2:
        return f"'{text}'"
    out = []
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif code < 0x20 or code == 0x7F:
            out.append(rng.choice([f"\\u{code:04x}", f"\\U{code:08x}"]))
        elif 0xD800 <= code <= 0xDFFF:  # TOML cannot hold a lone surrogate
            out.append("?")
        elif code > 0x7E and rng.random() < 0.1:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


_BARE = re.compile(r"[A-Za-z0-9_-]+\Z")


def _key(key: str, rng: random.Random) -> str:
    if _BARE.match(key) and rng.random() < 0.8:
        return key
    return _string(key, rng)


def _value(value: Any, rng: random.Random) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _string(value, rng)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") \
            if math.isinf(value) else repr(value)
    if isinstance(value, list):
        sep = ",\n  " if len(value) > 1 and rng.random() < 0.2 else ", "
        return "[" + sep.join(_value(v, rng) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k, rng)} = {_value(v, rng)}"
                                for k, v in value.items()) + " }"
    raise TypeError(type(value))


def dump(data: dict[str, Any], rng: random.Random) -> str:
    """TOML for `data`: scalars first, tables as [headers] (sometimes as dotted keys, or
    with sub-tables as [a.b.c] headers of their own)."""
    lines: list[str] = []

    def table(prefix: list[str], body: dict[str, Any]) -> None:
        later = []
        for key, value in body.items():
            flat = isinstance(value, dict) and value and \
                all(not isinstance(v, dict) for v in value.values())
            if flat and rng.random() < 0.1:  # dotted keys: key.sub = value
                lines.extend(f"{_key(key, rng)}.{_key(sub, rng)} = {_value(item, rng)}"
                             for sub, item in value.items())
            elif isinstance(value, dict) and (not prefix or rng.random() < 0.3):
                later.append((key, value))
            else:
                lines.append(f"{_key(key, rng)} = {_value(value, rng)}")
        for key, value in later:
            path = [*prefix, key]
            lines.append("")
            lines.append("[" + ".".join(_key(k, rng) for k in path) + "]")
            table(path, value)

    table([], data)
    return "\n".join(lines) + "\n"


# --- the generator ----------------------------------------------------------------------

class Generator:
    def __init__(self, rng: random.Random, files: dict[str, list[str]]) -> None:
        self.rng = rng
        self.files = files
        self.messy = 0.0  # how often a choice is a bad one, per manifest

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def bad(self) -> bool:
        return self.rng.random() < self.messy

    def name(self, prefix: str = "") -> str:
        names = ["a", "b", "db", "web", "x1"] + (["long-name-here"] if self.bad() else [])
        return prefix + self.rng.choice(names) + \
            (str(self.rng.randrange(10)) if self.chance(0.5) else "")

    def text(self) -> str:
        return self.rng.choice(ODD_TEXT) if self.chance(0.3) else self.name()

    def odd(self) -> Any:
        kind = self.rng.randrange(8)
        if kind == 0:
            return self.rng.choice(HUGE)
        if kind == 1:
            return self.rng.choice(ODD_TEXT)
        if kind == 2:
            return self.rng.choice([True, False, 0, 1, -5, 3.25, [], {}, [1, "a"], {"k": 1}])
        if kind == 3:
            return self.rng.choice(self.files["any"])
        if kind == 4:
            return {self.text(): self.odd() for _ in range(self.rng.randrange(3))}
        if kind == 5:
            return [self.odd() for _ in range(self.rng.randrange(3))]
        if kind == 6:
            return self.rng.choice(SIZES)
        return self.deep()

    def deep(self) -> Raw:
        depth = self.rng.choice([2, 15, 19, 20, 21, 25, 200, 3000])
        if self.chance(0.5):
            return Raw("[" * depth + "1" + "]" * depth)
        return Raw("{ a = " * depth + "1" + " }" * depth)

    def regex(self) -> str:
        if not self.bad():
            return self.rng.choice(["ok", "ALL OK", "^x$", "a{3}", "é+", "\\d+ done"])
        return self.rng.choice(["((", "a{99999999999999999999}", "(" * 300 + ")" * 300, "[",
                                "\\", "(?P<a>x)(?P<a>y)", "\x1b\\[32m", "", "a" * 2000])

    def file(self, kind: str = "file") -> str:
        return self.rng.choice(self.files["any"] if self.bad() else self.files[kind])

    def cmdline(self, vms: list[str], nets: list[str]) -> str:
        parts = ["console=ttyS0"]
        for _ in range(self.rng.randrange(4)):
            choice = self.rng.randrange(7)
            if choice == 0:
                parts.append("n={vm.name}-{index}-{vm.index}-{stack.name}")
            elif choice == 1 and nets:
                net = self.rng.choice(nets)
                parts.append(f"ip={{net.{net}.cidr}} gw={{net.{net}.gateway}} "
                             f"mac={{net.{net}.mac}} p={{net.{net}.prefix}}")
            elif choice == 2 and vms and nets and self.bad():
                parts.append(f"peer={{vm.{self.rng.choice(vms)}.net.{self.rng.choice(nets)}.ip}}")
            elif choice == 3:
                parts.append(self.rng.choice(["{{lit}}", "x=${UNSET_Q-}", "$$", "tab\there",
                                              "nl\nhere", "${VMRUN_FUZZ_OK:-d}"]))
            elif choice == 4 and self.bad():
                parts.append(self.rng.choice(["{nope}", "{", "}", "{net.zz.ip}"]))
            else:
                parts.append(f"k{choice}=v")
        return " ".join(parts)

    def disk(self) -> Any:
        kind = self.rng.randrange(6 if self.bad() else 4)
        if kind == 0:
            return {"size": self.rng.choice(SIZES[:6] + [64, 1])}
        if kind == 1:
            return {"image": self.file("image")}
        if kind == 2:
            return {"image": self.file("image"), "readonly": True}
        if kind == 3:
            return {"image": self.file("image"),
                    "format": self.rng.choice(["raw", "vmdk", 1] if self.bad() else ["raw"])}
        if kind == 4:
            return {"size": self.rng.choice(SIZES), "readonly": self.odd()}
        return self.rng.choice([{}, {"imgae": "x"}, {"image": "x", "size": "1G"}, "disk", 5])

    def vm(self, vms: list[str], nets: list[str], with_kernel: bool) -> dict[str, Any]:
        table: dict[str, Any] = {}
        if with_kernel:
            table["kernel"] = self.file()
        if self.chance(0.3):
            table["initrd"] = self.file()
        if nets and self.chance(0.5):
            table["networks"] = self.rng.sample(nets, self.rng.randint(1, len(nets)))
        if self.chance(0.6):
            table["cmdline"] = self.cmdline(vms, table.get("networks", []) if not self.bad()
                                            else nets)
        if self.chance(0.4):
            table["memory"] = self.rng.choice(SIZES[:6] + [64, 300, 16])
        if self.chance(0.3):
            table["cpus"] = self.rng.randint(1, 8)
        for key in ("timeout", "ready_timeout"):
            if self.chance(0.15):
                table[key] = self.rng.choice([1, 2.5, 60, 604800])
        for key in ("success", "failure", "ready"):
            if self.chance(0.15):
                table[key] = self.regex() if self.chance(0.3) else "ok"
        if self.chance(0.25):
            table["count"] = self.rng.randint(1, 4)
        if vms and self.chance(0.3):
            targets = self.rng.sample(vms, self.rng.randint(1, len(vms)))
            table["depends_on"] = targets if self.chance(0.5) else {
                t: self.rng.choice(["ok", "ready"]) for t in targets}
        if self.chance(0.3):
            table["disks"] = [self.disk() for _ in range(self.rng.randint(0, 3))]
        if self.chance(0.1):
            table["ephemeral"] = self.chance(0.5)
        if ("networks" in table or self.bad()) and self.chance(0.3):
            table["forward"] = [f"{self.rng.randint(1024, 9000)}:{self.rng.randint(1, 90)}"
                                for _ in range(self.rng.randint(1, 2))]
        if self.chance(0.1):
            table["cloud_init"] = {"user_data": self.file()}
            if self.chance(0.3):
                table["cloud_init"]["network_config"] = self.file()
        if self.chance(0.03):
            table["xml_devices"] = self.rng.choice([
                "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>",
                "<watchdog model='i6300esb'/>"] + ([
                "<rng model='bogus'/>", "<rng>", " ", "</devices><devices>", "<a:b/>",
                "<!DOCTYPE x>", "&lol;"] if self.bad() else []))
        return table

    def valid(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.chance(0.7):
            data["name"] = self.name("s")
        if self.chance(0.3):
            data["accel"] = self.rng.choice(["auto", "kvm", "tcg"])
        if self.chance(0.2):
            data["stop_timeout"] = self.rng.choice([1, 10, 0.5])
        if self.chance(0.2):
            data["state_dir"] = self.rng.choice(["state", "s/t", ".", "x" * 90])
        nets = list(dict.fromkeys(self.name("n") for _ in range(self.rng.randrange(3))))
        if nets:
            data["network"] = {}
            for i, net in enumerate(nets):
                data["network"][net] = {"subnet": f"10.{i + 1}.0.0/24"} \
                    if self.chance(0.4) else {}
        names = list(dict.fromkeys(self.name() for _ in range(self.rng.randint(1, 5))))
        in_defaults = self.chance(0.4)
        if in_defaults or self.chance(0.2):
            data["defaults"] = self.vm([], nets, in_defaults)
            data["defaults"].pop("depends_on", None)
        data["vm"] = {}
        for i, vm in enumerate(names):
            data["vm"][vm] = self.vm(names if self.bad() else names[:i], nets,
                                     not in_defaults)
        return data

    def mutate_data(self, data: dict[str, Any]) -> None:
        for _ in range(self.rng.randint(1, 3)):
            tables: list[dict[str, Any]] = [data]
            vm_tables = data.get("vm") if isinstance(data.get("vm"), dict) else {}
            tables += [t for t in vm_tables.values() if isinstance(t, dict)]
            if isinstance(data.get("defaults"), dict):
                tables.append(data["defaults"])
            if isinstance(data.get("network"), dict):
                tables += [t for t in data["network"].values() if isinstance(t, dict)]
            table = self.rng.choice(tables)
            kind = self.rng.randrange(7)
            keys = [s.key for s in (*manifest.VM_SETTINGS, *manifest.STACK_SETTINGS)]
            if kind == 0 and table:  # a wrong or odd value for a key it has
                table[self.rng.choice(list(table))] = self.odd()
            elif kind == 1:  # any key, any value
                table[self.rng.choice([*keys, "subnet", "colour", "memroy", self.text()])] = \
                    self.odd()
            elif kind == 2 and isinstance(data.get("vm"), dict) and data["vm"]:
                old = self.rng.choice(list(data["vm"]))
                new = self.rng.choice([*BAD_NAMES, self.name()])
                data["vm"][new] = data["vm"].pop(old)
            elif kind == 3 and table:
                table.pop(self.rng.choice(list(table)))
            elif kind == 4:  # a cycle, or a dependency on anything
                for vm, vm_table in vm_tables.items():
                    if isinstance(vm_table, dict) and self.chance(0.5):
                        vm_table["depends_on"] = [self.rng.choice([*vm_tables, vm, "zz"])]
            elif kind == 5:
                table[self.rng.choice(keys)] = self.deep()
            elif kind == 6:
                data[self.rng.choice(["vm", "network", "defaults"])] = self.odd()

    def mutate_text(self, text: str) -> str | bytes:
        kind = self.rng.randrange(8)
        at = self.rng.randrange(len(text) + 1)
        lines = text.split("\n")
        if kind == 0:
            return text[:at] + text[at + self.rng.randint(1, 5):]
        if kind == 1:
            return text[:at] + self.rng.choice(
                ["[", "]", "{", "}", '"', "'", "=", "\n", ".", "#", "\\", "\x00", "\x1b",
                 "é", "\r", '"""', "[[", ",", "\u2028"]) + text[at:]
        if kind == 2:  # a duplicate key or table
            line = self.rng.randrange(len(lines))
            return "\n".join(lines[:line + 1] + [lines[line]] + lines[line + 1:])
        if kind == 3:
            return text[:at]
        if kind == 4:
            i, j = self.rng.randrange(len(lines)), self.rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
            return "\n".join(lines)
        if kind == 5:
            return text + self.rng.choice(["x = " + "[" * 3000 + "]" * 3000,
                                           "y = " + "{a=" * 3000 + "1" + "}" * 3000,
                                           ".".join("k" * 3000) + " = 1",
                                           "z = " + "9" * 5000, "[vm.alpha.disks]\nq = 1"])
        if kind == 6:  # not UTF-8
            raw = text.encode()
            return raw[:at] + self.rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"]) + raw[at:]
        return text.replace("\n", "\r\n")

    def manifest(self) -> tuple[str | bytes, str | None]:
        """A manifest's contents, and a .env to put beside it (or None)."""
        self.messy = 0.0 if self.chance(0.4) else self.rng.uniform(0.02, 0.3)
        data = self.valid()
        if self.chance(0.4):
            self.mutate_data(data)
        text: str | bytes = dump(data, self.rng)
        if self.chance(0.2):
            assert isinstance(text, str)
            text = self.mutate_text(text)
        env = None
        if self.chance(0.1):
            env = self.rng.choice(["A=1\n", "VMRUN_FUZZ_ESC=\x1b[2J\n", "bad line\n",
                                   "X='quoted'\nexport Y=2 # c\n", "\udcff"])
        return text, env


# --- the properties ---------------------------------------------------------------------

def _exists(data: Any, key: str) -> bool:
    """Whether the dotted `key` (a Problem's key) names something in the TOML data; a
    part may itself hold dots (vm."a.b"), so the longest matching part is taken first."""
    parts = key.split(".")
    while parts:
        for size in range(len(parts), 0, -1):
            part = ".".join(parts[:size])
            if isinstance(data, dict) and part in data:
                data, parts = data[part], parts[size:]
                break
            if isinstance(data, list) and part.isdigit() and int(part) < len(data):
                data, parts = data[int(part)], parts[size:]
                break
        else:
            return False
    return True


def check_problems(exc: errors.VmrunError, data: Any, path: Path) -> None:
    for line in "\n".join(exc.lines()).split("\n"):
        assert errors.printable(line) == line, f"unescaped control character: {line!r}"
    for problem in exc.problems if isinstance(exc, errors.ManifestError) else ():
        assert problem.file is not None, problem
        if problem.file == path and problem.key and data is not None and \
                _exists(data, problem.key):
            assert problem.line is not None, f"no line for {problem}"


def run_one(path: Path) -> str:
    """What check and render do with `path`, then load_identity; the outcome's name."""
    try:
        stack = manifest.load(path)
        domain.validate(stack)
        for vm in stack.vms:
            vm_paths = stack.paths.vm(vm.name)
            for accel in ("tcg", "kvm"):
                xml = domain.build(vm, accel, vm_paths.console_socket, disks.plan(vm, vm_paths))
                assert domain.to_string(xml)
    except errors.VmrunError as exc:  # a ManifestError, in practice
        outcome = "error"
        try:
            data = tomllib.loads(path.read_text())
        except (ValueError, RecursionError):
            data = None
        check_problems(exc, data, path)
    else:
        outcome = "ok"
    try:
        identity = manifest.load_identity(path)
    except errors.VmrunError as exc:
        assert outcome == "error", f"load() accepted what load_identity() refused: {exc}"
        check_problems(exc, None, path)
    else:
        if outcome == "ok":
            assert (identity.name, identity.state_dir, identity.vm_names) == \
                (stack.name, stack.state_dir, tuple(vm.name for vm in stack.vms))
    return outcome


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, list[str]]]:
    monkeypatch.setenv("VMRUN_FUZZ_ESC", "\x1b[2J")
    monkeypatch.setenv("VMRUN_FUZZ_SURROGATE", "a\udcffb")
    monkeypatch.delenv("UNSET_VMRUN_FUZZ", raising=False)
    stack = tmp_path / "stack"
    stack.mkdir()
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "initrd.gz").write_bytes(b"initrd")
    (tmp_path / "base.qcow2").write_bytes(b"QFI\xfb" + bytes(60))
    (tmp_path / "base.raw").write_bytes(bytes(512))
    (tmp_path / "disk.vmdk").write_bytes(b"KDMV" + bytes(60))
    (tmp_path / "user-data").write_text("#cloud-config\n")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "loop").symlink_to("loop")
    os.mkfifo(tmp_path / "fifo")
    files = {
        "file": ["../vmlinuz", "../initrd.gz", "../user-data", "../empty", "../base.raw"],
        "image": ["../base.qcow2", "../base.raw", "../empty", "../vmlinuz"],
        "any": ["../vmlinuz", "missing", "../a-dir", "../loop", "../fifo", "/dev/zero",
                "/dev/null", "/proc/self/mem", "/proc/self/status", "x" * 300 + "/y", "~",
                "~/nope", "/", str(tmp_path / "vmlinuz"), "../disk.vmdk", "", "a\x01b",
                "/etc/shadow"],
    }
    return stack, files


def describe_failure(number: int, path: Path, env: str | None) -> str:
    """The error, and the failing manifest: as a Python literal (it may hold control
    characters or bytes that are not UTF-8) and kept in a file beside the run's files."""
    kept = path.parent.parent / f"failing-{number}.toml"
    kept.write_bytes(path.read_bytes())
    return (f"manifest #{number} (VMRUN_FUZZ_SEED={SEED}) failed:\n"
            f"{traceback.format_exc()}\n--- stack.toml (kept as {kept}) ---\n"
            f"{path.read_bytes()!r}\n"
            + (f"--- .env ---\n{env!r}\n" if env is not None else ""))


def fuzz(workdir: tuple[Path, dict[str, list[str]]], count: int, seconds: float,
         check: Callable[[Path], str] = run_one) -> dict[str, int]:
    directory, files = workdir
    rng = random.Random(SEED)
    generator = Generator(rng, files)
    path = directory / "stack.toml"
    env_path = directory / ".env"
    outcomes = {"ok": 0, "error": 0}
    deadline = time.monotonic() + seconds
    number = 0
    while (number < count) if count else (time.monotonic() < deadline):
        text, env = generator.manifest()
        path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str)
                         else text)
        if env is None:
            env_path.unlink(missing_ok=True)
        else:
            env_path.write_bytes(env.encode("utf-8", "surrogateescape"))
        try:
            outcomes[check(path)] += 1
        except Exception:  # anything but a ManifestError, or a property that does not hold
            pytest.fail(describe_failure(number, path, env), pytrace=False)
        number += 1
    assert not (directory / ".vmrun").exists(), "check/render wrote a state directory"
    return outcomes


@pytest.mark.timeout(TIMEOUT)
def test_fuzz_check_and_render(workdir: tuple[Path, dict[str, list[str]]]) -> None:
    started = time.monotonic()
    outcomes = fuzz(workdir, COUNT, SECONDS)
    elapsed = time.monotonic() - started
    total = sum(outcomes.values())
    print(f"\nfuzz: {total} manifests in {elapsed:.1f}s ({total / elapsed:.0f}/s), "
          f"{outcomes['ok']} valid, {outcomes['error']} refused, seed {SEED}")
    # the generator must make both kinds, or it tests little
    assert outcomes["ok"] > total // 20 and outcomes["error"] > total // 5, outcomes


def test_locate_keys_and_the_scanner_never_fail() -> None:
    rng = random.Random(SEED)
    alphabet = '[]{}"\'=.#,\n\\ abc123_-\t\x00é'
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        assert isinstance(manifest.locate_keys(text), dict)


def _key_paths(data: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    pending = [(prefix, data)]
    while pending:
        path, item = pending.pop()
        children = item.items() if isinstance(item, dict) else \
            ((str(i), v) for i, v in enumerate(item)) if isinstance(item, list) else ()
        for key, value in children:
            found.append((*path, key))
            pending.append(((*path, key), value))
    return found


def test_locate_keys_finds_every_key_tomllib_finds() -> None:
    """Differential: on generated documents tomllib accepts (and not nested too deeply),
    every key and array element has a line."""
    rng = random.Random(SEED)
    generator = Generator(rng, {"file": ["f"], "image": ["i"], "any": ["a", "b"]})
    checked = 0
    for _ in range(1200):
        generator.messy = rng.random() * 0.3
        data = generator.valid()
        if generator.chance(0.5):
            generator.mutate_data(data)
        text = generator.mutate_text(dump(data, rng)) if generator.chance(0.3) \
            else dump(data, rng)
        try:
            assert isinstance(text, str)
            parsed = tomllib.loads(text)
        except (AssertionError, ValueError, RecursionError):
            continue
        paths = _key_paths(parsed)
        if any(len(path) >= manifest.MAX_NESTING for path in paths):
            continue
        lines = manifest.locate_keys(text)
        missing = [path for path in paths if path not in lines]
        assert not missing, f"no line for {missing[0]} in:\n{text!r}"
        checked += 1
    assert checked > 600
