"""Typed messages: frozen dataclasses validated at construction, registered by a type tag.

Define a message type in any package::

    @p2p.message("inference.step")
    @dataclass(frozen=True)
    class Step(p2p.Message):
        session_id: str = p2p.field(max_len=64)
        hidden: p2p.Tensor = p2p.field(dtypes=("float16", "bfloat16", "float32"), ndim=3)
        positions_start: int = p2p.field(min_value=0)

Construction validates every field against its annotation (and the limits given with
`p2p.field`) and raises `LocalProtocolError`; decoding runs the same validation and raises
`RemoteProtocolError`. Sequences are stored as tuples (messages are immutable). `Tensor` fields
travel as raw payload after the msgpack header, never inside it.

Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``bytes``, ``None``, `Tensor`,
``X | None``, ``list[X]`` / ``tuple[X, ...]`` (stored as tuples), ``tuple[X, Y]``,
``dict[str, X]``, ``Literal[...]``, ``Any`` (any msgpack-native value: None, bool, int, float,
str, bytes, lists and str-keyed maps of those) and nested `Message` dataclasses (no tensors
inside; they need no tag). Cross-field checks go in a ``validate(self)`` method that raises
``ValueError``; do not override ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, TypeVar

from ._constants import MAX_TYPE_TAG_LEN
from ._errors import MAX_ERROR_CODE_LEN, MAX_ERROR_MESSAGE_LEN, LocalProtocolError
from ._tensor import DTYPE_SIZES, Tensor

__all__ = ["Message", "message", "field", "REGISTRY", "message_class", "ErrorMessage", "Heartbeat", "Goodbye"]

_TAG_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-/]*$")
_RESERVED_PREFIX = "p2p."
_NOTHING = dataclasses.MISSING

# tag -> class, for every message type that can be sent
REGISTRY: dict[str, type["Message"]] = {}

M = TypeVar("M", bound="Message")


class _Invalid(Exception):
    """Internal: a value does not match its field spec (becomes a Local/RemoteProtocolError)."""


# --- field limits ------------------------------------------------------------------------------
def field(
    *,
    default: Any = _NOTHING,
    default_factory: Any = _NOTHING,
    max_len: int | None = None,
    min_len: int | None = None,
    min_value: float | None = None,
    max_value: float | None = None,
    dtypes: tuple[str, ...] | None = None,
    ndim: int | None = None,
    max_numel: int | None = None,
) -> Any:
    """A dataclass field with validation limits.

    max_len/min_len: for str, bytes, sequences and maps. min_value/max_value: for int and float.
    dtypes, ndim, max_numel: for `Tensor` fields.
    """
    for name in dtypes or ():
        if name not in DTYPE_SIZES:
            raise TypeError(f"unknown dtype {name!r} in field(dtypes=...)")
    limits = {
        "max_len": max_len,
        "min_len": min_len,
        "min_value": min_value,
        "max_value": max_value,
        "dtypes": tuple(dtypes) if dtypes is not None else None,
        "ndim": ndim,
        "max_numel": max_numel,
    }
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"p2p": {k: v for k, v in limits.items() if v is not None}}
    )


# --- type specs --------------------------------------------------------------------------------
# A spec is a pair of functions compiled once per field:
#   check(value) -> value     validates (and normalizes lists to tuples, ints to floats)
#   from_wire(value) -> value converts what msgpack produced into what `check` expects
_Check = Callable[[Any], Any]


def _identity(value: Any) -> Any:
    return value


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _length_checker(limits: Mapping[str, Any]) -> Callable[[Any], None]:
    max_len, min_len = limits.get("max_len"), limits.get("min_len")
    if max_len is None and min_len is None:
        return lambda value: None

    def check_len(value: Any) -> None:
        n = len(value)
        if max_len is not None and n > max_len:
            raise _Invalid(f"length {n} exceeds max_len={max_len}")
        if min_len is not None and n < min_len:
            raise _Invalid(f"length {n} is below min_len={min_len}")

    return check_len


def _range_checker(limits: Mapping[str, Any]) -> Callable[[Any], None]:
    lo, hi = limits.get("min_value"), limits.get("max_value")
    if lo is None and hi is None:
        return lambda value: None

    def check_range(value: Any) -> None:
        if lo is not None and value < lo:
            raise _Invalid(f"{value!r} is below min_value={lo}")
        if hi is not None and value > hi:
            raise _Invalid(f"{value!r} exceeds max_value={hi}")

    return check_range


def _check_any(value: Any, depth: int = 0) -> Any:
    """Any msgpack-native value, sequences normalized to tuples."""
    if depth > 32:
        raise _Invalid("value nested deeper than 32 levels")
    if value is None or type(value) in (bool, int, float, str, bytes):
        if type(value) is int and not -(2**63) <= value < 2**64:
            raise _Invalid("int does not fit in 64 bits")
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_check_any(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise _Invalid(f"map keys must be str, got {type(k).__name__}")
            out[k] = _check_any(v, depth + 1)
        return out
    raise _Invalid(f"{type(value).__name__} is not a msgpack-native value")


def _compile(tp: Any, limits: Mapping[str, Any], owner: str) -> tuple[_Check, _Check, bool]:
    """(check, from_wire, is_tensor) for annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Tensor:
        return _compile_tensor(limits), _identity, True
    if origin in (typing.Union, types.UnionType):
        return _compile_optional(tp, args, limits, owner)
    if tp is Any:
        return _compile_anything(limits), _identity, False
    if tp is type(None) or tp is None or tp is bool or tp is int or tp is float:
        return _compile_scalar(tp, limits), _identity, False
    if tp in (str, bytes):
        return _compile_text(tp, limits), _identity, False
    if origin is Literal:
        return _compile_literal(args, owner), _identity, False
    if origin in (list, tuple) and (origin is list or (len(args) == 2 and args[1] is Ellipsis)):
        return _compile_sequence(tp, args, limits, owner)
    if origin is tuple:
        return _compile_fixed_tuple(tp, args, owner)
    if origin is dict:
        return _compile_map(tp, args, limits, owner)
    if isinstance(tp, type) and issubclass(tp, Message):
        return _compile_nested(tp, owner)
    raise TypeError(f"{owner}: unsupported field annotation {_describe(tp)}")


def _compile_optional(tp: Any, args: tuple[Any, ...], limits: Mapping[str, Any], owner: str) -> tuple[_Check, _Check, bool]:
    """`X | None`: X's check and conversion, None let through."""
    non_none = [a for a in args if a is not type(None)]
    if len(non_none) != 1 or len(args) != 2:
        raise TypeError(f"{owner}: only `X | None` unions are supported, got {tp}")
    inner_check, inner_wire, is_tensor = _compile(non_none[0], limits, owner)

    def check_optional(value: Any) -> Any:
        return None if value is None else inner_check(value)

    def wire_optional(value: Any) -> Any:
        return None if value is None else inner_wire(value)

    return check_optional, wire_optional, is_tensor


def _compile_anything(limits: Mapping[str, Any]) -> _Check:
    """`Any`: any msgpack-native value (`_check_any`), its length limited if it has one."""
    check_len = _length_checker(limits)

    def check_anything(value: Any) -> Any:
        value = _check_any(value)
        if isinstance(value, (str, bytes, tuple, dict)):
            check_len(value)
        return value

    return check_anything


def _compile_scalar(tp: Any, limits: Mapping[str, Any]) -> _Check:
    """None, bool, int (64 bits, in range) and float (ints that convert exactly, in range)."""
    if tp is bool:

        def check_bool(value: Any) -> Any:
            if type(value) is not bool:
                raise _Invalid(f"expected bool, got {type(value).__name__}")
            return value

        return check_bool

    if tp is int:
        check_range = _range_checker(limits)

        def check_int(value: Any) -> Any:
            if type(value) is not int:
                raise _Invalid(f"expected int, got {type(value).__name__}")
            if not -(2**63) <= value < 2**64:
                raise _Invalid("int does not fit in 64 bits")
            check_range(value)
            return value

        return check_int

    if tp is float:
        check_range = _range_checker(limits)

        def check_float(value: Any) -> Any:
            if type(value) is int and -(2**53) <= value <= 2**53:
                value = float(value)
            elif type(value) is not float:
                raise _Invalid(f"expected float, got {type(value).__name__}")
            check_range(value)
            return value

        return check_float

    def check_none(value: Any) -> Any:
        if value is not None:
            raise _Invalid(f"expected None, got {type(value).__name__}")
        return value

    return check_none


def _compile_text(tp: type, limits: Mapping[str, Any]) -> _Check:
    """str or bytes, exactly that type, its length limited."""
    check_len = _length_checker(limits)

    def check_text(value: Any) -> Any:
        if type(value) is not tp:
            raise _Invalid(f"expected {tp.__name__}, got {type(value).__name__}")
        check_len(value)
        return value

    return check_text


def _compile_literal(args: tuple[Any, ...], owner: str) -> _Check:
    """`Literal[...]` of str, int or bool values: one of them, of the same type."""
    for a in args:
        if type(a) not in (str, int, bool):
            raise TypeError(f"{owner}: Literal values must be str, int or bool")

    def check_literal(value: Any) -> Any:
        if not any(type(a) is type(value) and a == value for a in args):
            raise _Invalid(f"{value!r} is not one of {sorted(map(repr, args))}")
        return value

    return check_literal


def _compile_sequence(tp: Any, args: tuple[Any, ...], limits: Mapping[str, Any], owner: str) -> tuple[_Check, _Check, bool]:
    """`list[X]` or `tuple[X, ...]`: a tuple of checked items (a list on the wire)."""
    if not args:
        raise TypeError(f"{owner}: bare {tp} needs an item type")
    item_check, item_wire, item_tensor = _compile(args[0], {}, owner)
    if item_tensor:
        raise TypeError(f"{owner}: tensors are only supported as direct fields, not in {tp}")
    check_len = _length_checker(limits)

    def check_seq(value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"expected a sequence, got {type(value).__name__}")
        check_len(value)
        return tuple(item_check(v) for v in value)

    def wire_seq(value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            return value  # check_seq reports it
        return [item_wire(v) for v in value]

    return check_seq, (wire_seq if item_wire is not _identity else _identity), False


def _compile_fixed_tuple(tp: Any, args: tuple[Any, ...], owner: str) -> tuple[_Check, _Check, bool]:
    """`tuple[X, Y, ...]` of a fixed length, each item checked by its own type."""
    compiled = [_compile(a, {}, owner) for a in args]
    if any(c[2] for c in compiled):
        raise TypeError(f"{owner}: tensors are only supported as direct fields, not in {tp}")

    def check_fixed(value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != len(compiled):
            raise _Invalid(f"expected a {len(compiled)}-tuple")
        return tuple(c[0](v) for c, v in zip(compiled, value))

    def wire_fixed(value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != len(compiled):
            return value
        return [c[1](v) for c, v in zip(compiled, value)]

    return check_fixed, wire_fixed, False


def _compile_map(tp: Any, args: tuple[Any, ...], limits: Mapping[str, Any], owner: str) -> tuple[_Check, _Check, bool]:
    """`dict[str, X]`: str keys, checked values, its size limited."""
    if len(args) != 2 or args[0] is not str:
        raise TypeError(f"{owner}: only dict[str, X] is supported, got {tp}")
    value_check, value_wire, value_tensor = _compile(args[1], {}, owner)
    if value_tensor:
        raise TypeError(f"{owner}: tensors are only supported as direct fields, not in {tp}")
    check_len = _length_checker(limits)

    def check_map(value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise _Invalid(f"expected a dict, got {type(value).__name__}")
        check_len(value)
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise _Invalid(f"map keys must be str, got {type(k).__name__}")
            out[k] = value_check(v)
        return out

    def wire_map(value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        return {k: value_wire(v) for k, v in value.items()}

    return check_map, (wire_map if value_wire is not _identity else _identity), False


def _compile_nested(tp: type, owner: str) -> tuple[_Check, _Check, bool]:
    """A nested `Message` dataclass without tensors (a map on the wire)."""
    if not dataclasses.is_dataclass(tp):
        raise TypeError(f"{owner}: nested {tp.__name__} must be a dataclass")

    def check_nested(value: Any) -> Any:
        if type(value) is not tp:
            raise _Invalid(f"expected {tp.__name__}, got {type(value).__name__}")
        return value

    def wire_nested(value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value  # check_nested reports it
        spec = _spec(tp)
        if spec.tensor_fields:
            raise _Invalid(f"nested {tp.__name__} cannot carry tensors")
        return _construct(tp, spec, dict(value))

    spec = _spec(tp)
    if spec.tensor_fields:
        raise TypeError(f"{owner}: nested {tp.__name__} cannot carry tensors")
    return check_nested, wire_nested, False


def _compile_tensor(limits: Mapping[str, Any]) -> _Check:
    dtypes, ndim, max_numel = limits.get("dtypes"), limits.get("ndim"), limits.get("max_numel")

    def check_tensor(value: Any) -> Any:
        if type(value) is not Tensor:
            raise _Invalid(f"expected p2p.Tensor, got {type(value).__name__}")
        if dtypes is not None and value.dtype not in dtypes:
            raise _Invalid(f"dtype {value.dtype} not in {dtypes}")
        if ndim is not None and value.ndim != ndim:
            raise _Invalid(f"expected {ndim} dimensions, got shape {list(value.shape)}")
        if max_numel is not None and value.numel > max_numel:
            raise _Invalid(f"{value.numel} elements exceed max_numel={max_numel}")
        return value

    return check_tensor


class _FieldSpec(typing.NamedTuple):
    name: str
    check: _Check
    from_wire: _Check
    is_tensor: bool


class _Spec(typing.NamedTuple):
    fields: tuple[_FieldSpec, ...]
    names: frozenset[str]
    tensor_fields: tuple[str, ...]
    required: frozenset[str]
    # all-fields-valid test compiled into one function for classes whose fields are all of
    # the simple kinds (`_fast_test`): True means every per-field check passes and leaves the
    # value as it is. False says nothing; the per-field checks then run and report.
    fast: Callable[[Any], bool] | None = None
    # the same test per field, as Python expressions over `v` with the names they use (for
    # the codecs `_wire` compiles for these classes)
    tests: tuple[str, ...] | None = None
    test_env: Mapping[str, Any] | None = None


def _fast_test(tp: Any, limits: Mapping[str, Any], env: dict[str, Any]) -> str | None:
    """A Python expression over `v`, true only for values `_compile`'s check accepts unchanged;
    None for the kinds it does not cover (then the class has no fast test)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) != 1 or len(args) != 2:
            return None
        inner = _fast_test(non_none[0], limits, env)
        return None if inner is None else f"(v is None or ({inner}))"
    if tp is bool:
        return "type(v) is bool"
    if tp is int:
        lo, hi = limits.get("min_value"), limits.get("max_value")
        lo = -(2**63) if lo is None else max(lo, -(2**63))
        hi = 2**64 - 1 if hi is None else min(hi, 2**64 - 1)
        if type(lo) is not int or type(hi) is not int:
            return None
        return f"(type(v) is int and {lo} <= v <= {hi})"
    if tp in (str, bytes):
        test = f"type(v) is {tp.__name__}"
        if limits.get("max_len") is not None:
            test += f" and len(v) <= {int(limits['max_len'])}"
        if limits.get("min_len") is not None:
            test += f" and len(v) >= {int(limits['min_len'])}"
        return f"({test})"
    if tp is Tensor:
        test = "type(v) is _Tensor"
        if limits.get("dtypes") is not None:
            key = f"_dtypes{len(env)}"
            env[key] = frozenset(limits["dtypes"])
            test += f" and v.dtype in {key}"
        if limits.get("ndim") is not None:
            test += f" and len(v.shape) == {int(limits['ndim'])}"
        if limits.get("max_numel") is not None:
            test += f" and _prod(v.shape) <= {int(limits['max_numel'])}"
        return f"({test})"
    return None


def _compile_fast(cls: type, hints: Mapping[str, Any]) -> tuple[Callable[[Any], bool], tuple[str, ...], dict[str, Any]] | None:
    """(the all-fields test, each field's test expression, the names they use), or None."""
    env: dict[str, Any] = {"_Tensor": Tensor, "_prod": math.prod}
    tests = []
    lines = ["def fast(self):"]
    for f in dataclasses.fields(cls):
        test = _fast_test(hints[f.name], f.metadata.get("p2p", {}), env)
        if test is None:
            return None
        tests.append(test)
        lines += [f"    v = self.{f.name}", f"    if not {test}:", "        return False"]
    lines.append("    return True")
    scope = dict(env)
    exec("\n".join(lines), scope)  # noqa: S102 - built only from annotations and numeric limits
    return scope["fast"], tuple(tests), env


def _spec(cls: type, localns: dict[str, Any] | None = None) -> _Spec:
    spec = cls.__dict__.get("_p2p_spec")
    if spec is None:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        try:
            hints = typing.get_type_hints(cls, localns=localns)
        except NameError as exc:
            raise TypeError(f"{cls.__name__}: cannot resolve an annotation ({exc})") from exc
        specs = []
        required = set()
        for f in dataclasses.fields(cls):
            if not f.init:
                raise TypeError(f"{cls.__name__}.{f.name}: init=False fields are not supported")
            check, from_wire, is_tensor = _compile(hints[f.name], f.metadata.get("p2p", {}), f"{cls.__name__}.{f.name}")
            specs.append(_FieldSpec(f.name, check, from_wire, is_tensor))
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.add(f.name)
        fast = _compile_fast(cls, hints)
        spec = _Spec(
            tuple(specs),
            frozenset(s.name for s in specs),
            tuple(s.name for s in specs if s.is_tensor),
            frozenset(required),
            *(fast or ()),
        )
        setattr(cls, "_p2p_spec", spec)
    return spec


def _construct(cls: type[M], spec: _Spec, values: dict[str, Any]) -> M:
    """Build `cls` from wire values (raises _Invalid or LocalProtocolError on bad input)."""
    unknown = values.keys() - spec.names
    if unknown:
        raise _Invalid(f"unknown fields {sorted(unknown)} for {cls.__name__}")
    missing = spec.required - values.keys()
    if missing:
        raise _Invalid(f"missing fields {sorted(missing)} for {cls.__name__}")
    for f in spec.fields:
        if f.from_wire is not _identity and f.name in values:
            values[f.name] = f.from_wire(values[f.name])
    return cls(**values)


# --- the base class and the decorator ---------------------------------------------------------
class Message:
    """Base class of every message. Subclasses are frozen dataclasses; see the module docstring."""

    TYPE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        cls = type(self)
        spec = cls.__dict__.get("_p2p_spec")
        if spec is None:
            try:
                spec = _spec(cls)
            except TypeError as exc:
                raise LocalProtocolError(str(exc)) from exc
        if spec.fast is not None and spec.fast(self):
            self._validate_cross_fields(cls)
            return
        for f in spec.fields:
            value = getattr(self, f.name)
            try:
                checked = f.check(value)
            except _Invalid as exc:
                raise LocalProtocolError(f"{cls.__name__}.{f.name}: {exc}") from None
            except LocalProtocolError as exc:
                raise LocalProtocolError(f"{cls.__name__}.{f.name}: {exc}") from None
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        self._validate_cross_fields(cls)

    def _validate_cross_fields(self, cls: type) -> None:
        try:
            self.validate()
        except (ValueError, TypeError) as exc:
            if isinstance(exc, LocalProtocolError):
                raise
            raise LocalProtocolError(f"{cls.__name__}: {exc}") from exc

    def validate(self) -> None:
        """Cross-field checks; raise ValueError. Runs after the per-field checks."""


def message(tag: str, *, _reserved: bool = False) -> Callable[[type[M]], type[M]]:
    """Register a `Message` dataclass under the wire type `tag` (e.g. ``"inference.step"``).

    Apply it above ``@dataclass(frozen=True)``; a class that is not yet a dataclass is made a
    frozen one. Tags are lowercase ``[a-z0-9_.-/]``, at most 64 chars; ``p2p.`` is reserved.
    """
    if not isinstance(tag, str) or not _TAG_RE.match(tag) or len(tag) > MAX_TYPE_TAG_LEN:
        raise TypeError(f"invalid message tag {tag!r}")
    if tag.startswith(_RESERVED_PREFIX) and not _reserved:
        raise TypeError(f"message tags starting with {_RESERVED_PREFIX!r} are reserved")

    def register(cls: type[M]) -> type[M]:
        # names visible where the decorator is applied (a class defined inside a function with
        # `from __future__ import annotations` has string annotations naming its locals)
        caller = sys._getframe(1)
        localns = {**caller.f_globals, **caller.f_locals}
        if not (isinstance(cls, type) and issubclass(cls, Message)):
            raise TypeError(f"@message needs a subclass of p2p.Message, got {cls!r}")
        if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
            cls = dataclasses.dataclass(frozen=True)(cls)
        if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        existing = REGISTRY.get(tag)
        if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"message tag {tag!r} is already used by {existing.__module__}.{existing.__qualname__}")
        _spec(cls, localns)  # fail at definition time on unsupported annotations
        cls.TYPE = tag
        REGISTRY[tag] = cls
        return cls

    return register


def message_class(tag: str) -> type[Message] | None:
    """The class registered for `tag`, or None."""
    return REGISTRY.get(tag)


# --- built-in control messages ----------------------------------------------------------------
@message("p2p.error", _reserved=True)
@dataclasses.dataclass(frozen=True)
class ErrorMessage(Message):
    """An error frame: the peer's handler failed or refused. Raised as `RemoteError` on receipt."""

    code: str = field(min_len=1, max_len=MAX_ERROR_CODE_LEN)
    message: str = field(default="", max_len=MAX_ERROR_MESSAGE_LEN)


@message("p2p.heartbeat", _reserved=True)
@dataclasses.dataclass(frozen=True)
class Heartbeat(Message):
    """Sent on a session that has been quiet for `HEARTBEAT_INTERVAL`; never surfaced."""


@message("p2p.bye", _reserved=True)
@dataclasses.dataclass(frozen=True)
class Goodbye(Message):
    """The sender will send nothing more on this stream. EOF without it means a broken peer."""
