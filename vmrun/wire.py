"""The wire format of vmrun.protocol: typed messages as single JSON lines.

A `Message` is a frozen dataclass; `to_json` writes it, `from_json` / `from_dict` read it
back and check every field against its annotation (str, int, float, bool, None, enums,
tuples, dicts and nested messages), raising ProtocolError for anything that does not fit.
Tagged messages carry their `kind` under `tag` ("ev" unless a message says otherwise);
`decode` picks the message type by it.  `LineReader` cuts a byte stream into lines and
drops a line longer than its limit instead of buffering it without end.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import types
import typing
from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar, Union


class ProtocolError(ValueError):
    """A message that does not fit its type."""


T = TypeVar("T", bound="Message")
M = TypeVar("M", bound="Message")


def _check(value: Any, hint: Any, where: str) -> Any:
    """`value` converted to the annotated type `hint`, or ProtocolError."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check(value, option, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: unexpected {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ProtocolError(f"{where}: expected null, got {value!r}")
    if origin is tuple:
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise ProtocolError(f"{where}: expected a list, got {value!r}")
        return tuple(_check(item, item_type, where) for item in value)
    if origin is dict:
        key_type, item_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected an object, got {value!r}")
        return {_check(k, key_type, where): _check(v, item_type, where)
                for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ProtocolError(f"{where}: unexpected {value!r}") from None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, where)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (str, bool):
        if isinstance(value, hint):
            return value
    else:  # pragma: no cover - a type this module does not use
        raise TypeError(f"unsupported field type {hint!r}")
    raise ProtocolError(f"{where}: expected {hint.__name__}, got {value!r}")


def _from_dict(cls: type[Any], data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ProtocolError(f"{where}: expected an object, got {data!r}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in data:
            values[f.name] = _check(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{where}: missing {f.name}")
    return cls(**values)


def _to_plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class Message:
    """Base of every message: a frozen dataclass that knows its JSON form."""

    kind: ClassVar[str] = ""
    tag: ClassVar[str] = "ev"  # the key that holds `kind`

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = _to_plain(self)
        if self.kind:
            data = {self.tag: self.kind, **data}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        if isinstance(data, dict) and cls.kind:
            data = {k: v for k, v in data.items() if k != cls.tag}
        result: T = _from_dict(cls, data, cls.__name__)
        return result

    @classmethod
    def from_json(cls: type[T], text: str | bytes) -> T:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ProtocolError(f"{cls.__name__}: not JSON: {exc}") from None
        return cls.from_dict(data)


def decode(line: bytes | str, kinds: Iterable[type[M]]) -> M:
    """The message of one of `kinds` that `line` holds, chosen by its tag."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    return decode_dict(data, kinds)


def decode_dict(data: Any, kinds: Iterable[type[M]]) -> M:
    if isinstance(data, dict):
        for cls in kinds:
            if data.get(cls.tag) == cls.kind:
                return cls.from_dict(data)
    raise ProtocolError(f"unexpected message: {str(data)[:80]}")


def encode(message: Message) -> bytes:
    """One message as one line."""
    return (message.to_json() + "\n").encode()


def send(fd: int, message: Message) -> bool:
    """Write one message line whole to `fd`; False when the reader is gone (EPIPE)."""
    data = encode(message)
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        return False
    return True


class LineReader:
    """Splits a byte stream into lines; a line over `max_line` bytes is dropped whole."""

    def __init__(self, max_line: int = 1 << 20) -> None:
        self.max_line = max_line
        self.buffer = bytearray()
        self.skipping = False  # inside an over-long line: drop until its end
        self.dropped = 0  # over-long lines dropped so far

    def feed(self, data: bytes) -> list[bytes]:
        """The complete lines that `data` finishes, without their newline."""
        lines: list[bytes] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            piece = data[start:end]
            start = end + 1
            if self.skipping or len(self.buffer) + len(piece) > self.max_line:
                self.skipping = False
                self.dropped += 1
                self.buffer.clear()
                continue
            if self.buffer:
                self.buffer += piece
                lines.append(bytes(self.buffer))
                self.buffer.clear()
            else:
                lines.append(piece)
        rest = data[start:]
        if self.skipping:
            return lines
        if len(self.buffer) + len(rest) > self.max_line:
            self.buffer.clear()
            self.skipping = True
        else:
            self.buffer += rest
        return lines

    def tail(self) -> bytes:
        """What is left after the stream ended without a newline."""
        rest = b"" if self.skipping else bytes(self.buffer)
        self.buffer.clear()
        return rest
