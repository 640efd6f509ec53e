"""Operations on a recipe's raw YAML tree before validation: parse, merge, override, substitute."""

from __future__ import annotations

import copy
import difflib
import re
from typing import Any

import yaml

from viq.errors import RecipeError

_VAR = re.compile(r"\$\{([^}]*)\}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 only accepts ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str, where: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: invalid YAML: {exc}") from None


def deep_merge(base: Any, over: Any) -> Any:
    """Dicts merge key by key; anything else (lists, scalars, null) replaces."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if k in out else copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 0.0003); the value is read as YAML."""
    key, sep, raw = str(text).partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise RecipeError(f"override {text!r} must look like key.path=value (e.g. optim.lr=3e-4)")
    return parts, load_yaml(raw, f"override {text!r}") if raw.strip() else None


def apply_override(tree: dict, text: str, skip_null: bool = False) -> None:
    """Set one ``key.path=value``; into a section that is null, refuse (or, with ``skip_null``, skip)."""
    parts, value = parse_override(text)
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None and part in node:  # null on purpose (e.g. stage 1 has no head): do not revive it
            if skip_null:
                return
            where = ".".join(parts[:i + 1])
            raise RecipeError(f"override {text!r}: {where} is null here; set the whole section "
                              f"({where}={{...}}) to bring it back")
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise RecipeError(f"override {text!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def substitute(tree: dict) -> dict:
    """Replace ``${name}`` by ``paths[name]`` in every string (paths may refer to each other)."""
    paths = tree.get("paths") or {}
    if not isinstance(paths, dict):
        raise RecipeError("paths must map names to strings")
    done: dict[str, str] = {}

    def var(name: str, where: str, chain: tuple[str, ...]) -> str:
        if name in done:
            return done[name]
        if name not in paths:
            close = difflib.get_close_matches(name, list(paths), n=1)
            hint = (f"did you mean ${{{close[0]}}}?" if close
                    else f"define it under paths: (defined: {', '.join(paths) or 'none'})")
            raise RecipeError(f"{where}: unknown variable ${{{name}}}; {hint}")
        if name in chain:
            loop = " -> ".join(chain + (name,))
            raise RecipeError(f"paths.{name}: variables refer to each other in a loop ({loop})")
        done[name] = sub(str(paths[name]), f"paths.{name}", chain + (name,))
        return done[name]

    def sub(s: str, where: str, chain: tuple[str, ...] = ()) -> str:
        return _VAR.sub(lambda m: var(m.group(1).strip(), where, chain), s)

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, str):
            return sub(node, where)
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        return node

    out = walk({k: v for k, v in tree.items() if k != "paths"}, "")
    if "paths" in tree:
        out = {"paths": {k: var(str(k), f"paths.{k}", ()) for k in paths}, **out}
    return out
