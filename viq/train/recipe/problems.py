"""Readable validation errors: one line per problem, each naming its dotted key and, for a typo,
the nearest valid name (pydantic's own messages name neither clearly)."""

from __future__ import annotations

import difflib
import types
from typing import Optional, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError


def _section_class(annotation) -> Optional[type]:
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            found = _section_class(arg)
            if found is not None:
                return found
        return None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _class_at(root: type, loc: tuple) -> Optional[type]:
    cls = root
    for part in loc:
        if cls is None or not isinstance(part, str) or part not in cls.model_fields:
            return None
        cls = _section_class(cls.model_fields[part].annotation)
    return cls


def _describe(err: dict, root: type, prefix: tuple, top_keys: tuple) -> str:
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in prefix + loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _class_at(root, loc[:-1])
        names = list(parent.model_fields) if parent else []
        if parent is root:
            names += list(top_keys)
        close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.5)
        if close:
            nearest = ".".join(str(p) for p in prefix + loc[:-1] + (close[0],))
            return f"{where}: unknown key; did you mean {nearest!r}?"
        return f"{where}: unknown key; valid keys here: {', '.join(names)}"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if err["type"] != "value_error" and isinstance(value, (str, int, float, bool)):
        msg += f" (got {value!r})"
    return f"{where}: {msg}"


def problems(exc: ValidationError, root: type, prefix: tuple = (), top_keys: tuple = ()) -> list[str]:
    """One line per problem, each starting with its dotted key."""
    lines = []
    for err in exc.errors():
        if not err["loc"] and err["type"] == "value_error":  # cross-field rules name their own keys
            lines += err["msg"].removeprefix("Value error, ").split("\n")
        else:
            lines.append(_describe(err, root, prefix, top_keys))
    return list(dict.fromkeys(lines))


def report(source: str, lines: list[str]) -> str:
    return f"{source} is invalid:\n" + "\n".join(f"  - {line}" for line in lines)
