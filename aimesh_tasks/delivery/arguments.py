"""Do a task message's arguments fit the task function? (pure, cached per function)

Two checks, both before a worker process is given the message: the arguments bind to the
signature (what Python would raise as a TypeError inside the task), and each argument
annotated with a JSON type (dict, list, str, int, float, bool, None, and unions of them)
holds that type. Anything else (Any, classes, unresolvable annotations) is not checked.
Without the second check, `aimesh.route` given `[42]` fails inside pydantic with an error
that reaches the producer as an empty message.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

_JSON_TYPES: dict[Any, tuple[type, ...]] = {
    dict: (dict,), Mapping: (dict,), list: (list,), Sequence: (list,), str: (str,),
    int: (int,), float: (int, float), bool: (bool,), type(None): (type(None),),
}
_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer",
          float: "a number", bool: "a boolean", type(None): "null"}


def _accepted(annotation: Any) -> tuple[type, ...] | None:
    """The Python types a JSON value may have for `annotation`; None = not checked."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        parts = [_accepted(arg) for arg in typing.get_args(annotation)]
        if any(part is None for part in parts):
            return None
        return tuple(t for part in parts if part for t in part)
    return _JSON_TYPES.get(typing.get_origin(annotation) or annotation)


@lru_cache(maxsize=256)
def _shape(fun: Callable[..., Any]) -> tuple[inspect.Signature, dict[str, tuple[type, ...]]]:
    try:
        signature = inspect.signature(fun, eval_str=True)
    except (NameError, SyntaxError, TypeError):
        return inspect.signature(fun), {}
    checked = {name: accepted for name, p in signature.parameters.items()
               if (accepted := _accepted(p.annotation)) is not None}
    return signature, checked


def _describe(kinds: tuple[type, ...]) -> str:
    return " or ".join(dict.fromkeys(_NAMES.get(k, k.__name__) for k in kinds))


def argument_problem(fun: Callable[..., Any], args: Any, kwargs: Any) -> str | None:
    """Why `fun(*args, **kwargs)` would fail on its arguments, or None if they fit."""
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return "a task message's args must be a list and its kwargs an object"
    signature, checked = _shape(fun)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        return f"arguments do not fit {getattr(fun, '__name__', 'the task')}{signature}: {exc}"
    for name, value in bound.arguments.items():
        kinds = checked.get(name)
        # bool is an int in Python, not in JSON
        wrong = kinds is not None and (not isinstance(value, kinds) or (
            isinstance(value, bool) and bool not in kinds))
        if wrong:
            assert kinds is not None
            return f"argument '{name}' must be {_describe(kinds)}, got {type(value).__name__}"
    return None
