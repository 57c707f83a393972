"""Value ranges declared in a signature, so config validation can check a value before anything trains.

A parameter states its range with `typing.Annotated`, either through one of the named aliases below or
inline for a one-off range:

    def __init__(self, alpha: NonNegativeFloat = 0.8, momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9): ...

`mmbalance.config.validate` reads these hints (type and range) for every `_target_` node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated


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
