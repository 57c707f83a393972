"""Value ranges declared in a signature, and the one checker of values against type hints.

A parameter states its range with `typing.Annotated`, either through one of the named aliases below or
inline for a one-off range:

    def __init__(self, alpha: NonNegativeFloat = 0.8, momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9): ...

`mmbalance.config.validate` reads these hints (type, range, `Literal` choices) for every `_target_` node before
anything trains; `checked_arguments` makes a constructor check its own arguments against them (every method's,
through `methods.base.Method`), so the Python API refuses what the command line refuses, with the same message.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from mmbalance.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Bounds on a number: ge/le are inclusive, gt/lt exclusive; None leaves that side open."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def admits(self, value: float) -> bool:
        # written as "not violated" comparisons fail on NaN, so NaN is never admitted
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        low, high = (self.ge if self.gt is None else self.gt), (self.le if self.lt is None else self.lt)
        if low is not None and high is not None:
            opening, closing = ("[" if self.gt is None else "("), ("]" if self.lt is None else ")")
            return f"a value in {opening}{_number(low)}, {_number(high)}{closing}"
        bounds = [(">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)]
        return " and ".join(f"{op} {_number(bound)}" for op, bound in bounds if bound is not None)


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


PositiveFloat = Annotated[float, Range(gt=0)]            # scales, learning rates
NonNegativeFloat = Annotated[float, Range(ge=0)]         # strengths and loss weights (0 = off)
Probability = Annotated[float, Range(ge=0, le=1)]        # probabilities, shares, mixing weights
PositiveInt = Annotated[int, Range(ge=1)]                # counts and periods
NonNegativeInt = Annotated[int, Range(ge=0)]             # 0-based epochs, epoch counts (0 = none)
Fraction = Annotated[float, Range(gt=0, lt=1)]           # a held-out share of a split (neither none nor all)


# ---- values against type hints (config validation and method constructors) ----


def checked_arguments(function: Callable, prefix: str = "") -> Callable:
    """`function` that first checks the arguments it is given against its parameter hints (defaults are trusted):
    a ConfigError lists every problem, each named `<prefix><parameter>` (e.g. "method.alpha=-1: expected >= 0")."""
    signature, hints = inspect.signature(function), None

    @functools.wraps(function)
    def checked(*args, **kwargs):
        nonlocal hints
        if hints is None:  # resolved at the first call, when every name the hints use is defined
            hints = typing.get_type_hints(function, include_extras=True)
        try:
            given = signature.bind(*args, **kwargs).arguments
        except TypeError:  # a wrong argument list: the function's own TypeError says which
            return function(*args, **kwargs)
        problems = [problem for name, value in given.items() if name in hints
                    for problem in value_problems(prefix + name, value, hints[name])]
        if problems:
            raise ConfigError(problems)
        return function(*args, **kwargs)

    return checked

_NONE = type(None)
_PLAIN = {float: "a number (float)", int: "an integer (int)", bool: "true or false (bool)", str: "a string (str)",
          _NONE: "null"}
_PLURAL = {float: "numbers", int: "integers", bool: "booleans", str: "strings"}


def value_problems(where: str, value: Any, hint: Any) -> list[str]:
    """What is wrong with `value` for a parameter hinted `hint` (empty when nothing is).

    Only what the hint states is judged: a class the checker does not know (a Path, a module) accepts any value.
    """
    base, ranges = _unwrap(hint)
    if _is_union(base):
        if value is None and _NONE in typing.get_args(base):
            return []
        fitting = [m for m in typing.get_args(base) if _fits(value, m)]
        if not fitting:
            return [f"{where}={value!r}: expected {_describe(base)}"]
        checked = [value_problems(where, value, member) for member in fitting]
        if all(checked):
            return checked[0]
    elif not _fits(value, base):
        return [f"{where}={value!r}: expected {_describe(base)}"]
    else:
        problems: list[str] = []
        for item_where, item, item_hint in _items(where, value, base):
            problems.extend(value_problems(item_where, item, item_hint))
        if problems:
            return problems
    if _is_number(value):
        return [f"{where}={value!r}: expected {bound}" for bound in ranges if not bound.admits(value)]
    return []


def _unwrap(hint: Any) -> tuple[Any, list[Range]]:
    ranges: list[Range] = []
    while typing.get_origin(hint) is Annotated:
        ranges.extend(m for m in hint.__metadata__ if isinstance(m, Range))
        hint = typing.get_args(hint)[0]
    return hint, ranges


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_sequence(hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    return isinstance(origin, type) and issubclass(origin, Sequence) and not issubclass(origin, str)


def _is_mapping(hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    return isinstance(origin, type) and issubclass(origin, Mapping)


def _fixed_length(hint: Any) -> int | None:
    args = typing.get_args(hint)
    if (typing.get_origin(hint) or hint) is tuple and args and args[-1] is not Ellipsis:
        return len(args)
    return None


def _fits(value: Any, hint: Any) -> bool:
    """Whether the value has the hint's type (ranges and items aside)."""
    hint, _ = _unwrap(hint)
    if hint is None or hint is _NONE:
        return value is None
    if hint is bool or hint is str:
        return isinstance(value, hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return _is_number(value)
    if typing.get_origin(hint) is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint))
    if _is_union(hint):
        return any(_fits(value, member) for member in typing.get_args(hint))
    if _is_sequence(hint):  # any list-like container (instantiate passes OmegaConf's ListConfig), never a string
        length = _fixed_length(hint)
        return (isinstance(value, Sequence) and not isinstance(value, (str, bytes))
                and (length is None or len(value) == length))
    if _is_mapping(hint):
        return isinstance(value, Mapping)
    if hint is typing.Any or not isinstance(hint, type):
        return True
    # a config holds plain values only, so a tensor can never be one; other classes are built from plain values
    return isinstance(value, hint) or not _is_tensor_type(hint)


def _is_tensor_type(hint: type) -> bool:
    return hint.__module__.split(".")[0] == "torch" and hint.__name__ == "Tensor"


def _items(where: str, value: Any, hint: Any) -> list[tuple[str, Any, Any]]:
    """(where, item, item hint) of each element of a list or mapping value."""
    args = typing.get_args(hint)
    if _is_sequence(hint) and args:
        item_hints = args if _fixed_length(hint) else [args[0]] * len(value)
        return [(f"{where}[{i}]", item, h) for i, (item, h) in enumerate(zip(value, item_hints))]
    if _is_mapping(hint) and len(args) == 2:
        return [(f"{where}.{k}", v, args[1]) for k, v in value.items()]
    return []


def _describe(hint: Any) -> str:
    hint, ranges = _unwrap(hint)
    if hint in _PLAIN:
        return _PLAIN[hint]
    if typing.get_origin(hint) is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if _is_union(hint):
        return " or ".join(_describe(member) for member in typing.get_args(hint))
    args = typing.get_args(hint)
    if _is_sequence(hint):
        length = _fixed_length(hint)
        if length is not None:
            return f"a list of {length} {_plural(args[0]) if len(set(args)) == 1 else 'items'}"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if _is_mapping(hint):
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}" if len(args) == 2 else "a mapping"
    return getattr(hint, "__name__", str(hint))


def _plural(hint: Any) -> str:
    base, _ = _unwrap(hint)
    return _PLURAL.get(base, f"values of type {_describe(base)}")
