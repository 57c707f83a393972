"""The method registry. A method is one file and one config: the class in `methods/<key>.py` that declares its
`family` (one of `FAMILIES`) is method `<key>`, and `conf/method/<key>.yaml` builds it through `_target_`.
tests/test_methods.py keeps the two in step.

Discovered on first use (`METHODS`, `list_methods()`), so building one method imports only its own file.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from mmbalance.methods import base
from mmbalance.methods.base import FAMILIES, Method, registry_key

__all__ = ["FAMILIES", "METHODS", "Method", "list_methods", "registered_methods", "registry_key"]


@cache
def registered_methods() -> dict[str, type[Method]]:
    """{key: method class}, ordered by family (as in FAMILIES), then by key."""
    found: dict[str, type[Method]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg or info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        declared = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, Method)
                    and c.__module__ == module.__name__ and "family" in vars(c)]
        if len(declared) > 1:
            raise TypeError(f"{module.__name__}: {', '.join(c.__name__ for c in declared)} each declare a family; "
                            "a method file holds one method")
        if not declared:
            continue  # a helper module of the methods, not a method
        found[info.name] = declared[0]  # its family is one of FAMILIES (checked when the class is defined)
    return dict(sorted(found.items(), key=lambda item: (FAMILIES.index(item[1].family), item[0])))


base.registry = registered_methods  # for messages that list methods (base.regression_advice)


def list_methods() -> list[str]:
    return sorted(registered_methods())


def __getattr__(name: str):
    if name == "METHODS":
        return registered_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
