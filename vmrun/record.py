"""Small value classes without `dataclasses`, for the modules the CLI's light verbs load.

`vmrun --help` and `vmrun ps` have a start-up budget of 60 ms (docs/performance.md), and
importing `dataclasses` (with `inspect`, which it imports) costs them about 8 ms before
the first class is made.  The few classes those verbs need (errors.Problem, the paths in
vmrun/layout.py, identity.Identity, operate.DownResult) are `Record`s instead, and so are
a few small ones of `vmrun check` (convert.Context, fileconvert's CloudInit and Share),
where each dataclass costs about half a millisecond to make.  A subclass declares its
fields as class annotations, in order, and sets them in its own `__init__` with `_set`;
it then compares, hashes and prints like a frozen dataclass of those fields
(`frozen=False`: like a plain dataclass, mutable and unhashable).  Classes that
`dataclasses.replace` is used on (manifest.VM and Stack, fileconvert.Disk) stay
dataclasses.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar


class Record:
    """Base of a value class whose fields are its class annotations (see the module)."""

    _fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, frozen: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._fields = cls._fields + tuple(cls.__dict__.get("__annotations__", ()))
        if not frozen:  # mutable, hence unhashable
            setattr(cls, "__setattr__", object.__setattr__)  # noqa: B010
            setattr(cls, "__delattr__", object.__delattr__)  # noqa: B010
            setattr(cls, "__hash__", None)  # noqa: B010

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Record) and other.__class__ is self.__class__:
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{self.__class__.__qualname__}({fields})"
