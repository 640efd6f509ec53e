"""Operations on a recipe's raw YAML tree before validation: parse, merge, override, substitute.

Recipes may come from anyone, so reading one is bounded: text size, nesting depth, the size of the
tree once YAML aliases are expanded (a "billion laughs" file is refused before it is built) and of
``${}`` substitutions; a key given twice in one mapping is refused (YAML would silently keep the
last), and so are NaN/inf numbers and integers no counter can hold.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from typing import Any

import yaml

from viq.config import merge_over
from viq.errors import RecipeError

_VAR = re.compile(r"\$\{([^}]*)\}")

#: limits on what one recipe file (or override) may hold; real recipes are far below each.
MAX_TEXT_CHARS = 1_000_000
MAX_DEPTH = 64
MAX_NODES = 200_000          # nodes of the tree with every alias expanded
MAX_STRING_CHARS = 65_536    # any string after ${} substitution
MAX_VAR_CHAIN = 64           # variables referring to variables
MAX_STEPS = 10 ** 9          # step counts, intervals, epochs
_STEP_KEY = re.compile(r"(steps|_step|_every|epochs|keep_last|grad_accum)$")


class _Duplicate(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 only accepts ``1.0e-4``), refuses keys
    given twice in one mapping and nesting deeper than ``MAX_DEPTH``."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Duplicate(f"line {mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise _Duplicate(f"line {key_node.start_mark.line + 1}: key {key!r} given twice in one "
                                     f"mapping (first at line {seen[key]}); YAML would silently keep only the "
                                     "last: merge them into one")
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _expanded_size(node, memo: dict, active: set) -> int:
    """Nodes in the tree once every alias is expanded (shared nodes counted each time they appear)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise _Duplicate("an alias refers to the mapping that contains it (a loop)")
    active.add(key)
    total = 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            total += _expanded_size(k, memo, active) + _expanded_size(v, memo, active)
            if total > MAX_NODES:
                break
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            total += _expanded_size(v, memo, active)
            if total > MAX_NODES:
                break
    active.discard(key)
    memo[key] = total
    return total


def load_yaml(text: str, where: str):
    if len(text) > MAX_TEXT_CHARS:
        raise RecipeError(f"{where}: {len(text):,} characters; a recipe may hold at most {MAX_TEXT_CHARS:,}")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_NODES:
            raise _Duplicate(f"expands to more than {MAX_NODES:,} values (YAML aliases repeated inside "
                             "each other?); write the values out instead")
        data = loader.construct_document(node)
    except _Duplicate as exc:
        raise RecipeError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: invalid YAML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"{where}: nested too deeply") from None
    finally:
        loader.dispose()
    check_values(data, where)
    return data


def check_values(tree: Any, where: str, path: str = "") -> None:
    """Refuse NaN/inf, integers beyond 64 bits, step counts beyond ``MAX_STEPS`` and NUL characters."""
    def name(key) -> str:
        return f"{path}.{key}" if path else str(key)

    if isinstance(tree, dict):
        for k, v in tree.items():
            if isinstance(v, bool):
                continue
            if isinstance(v, int) and _STEP_KEY.search(str(k)) and not -MAX_STEPS <= v <= MAX_STEPS:
                raise RecipeError(f"{where}: {name(k)}: {v} is out of range (at most {MAX_STEPS:,})")
            check_values(v, where, name(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            check_values(v, where, f"{path}[{i}]")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise RecipeError(f"{where}: {path or 'value'}: {tree} is not a finite number")
    elif isinstance(tree, int) and not isinstance(tree, bool) and not -2 ** 63 <= tree < 2 ** 63:
        raise RecipeError(f"{where}: {path or 'value'}: {tree} is out of range (64-bit integers only)")
    elif isinstance(tree, str) and "\x00" in tree:
        raise RecipeError(f"{where}: {path or 'value'}: contains a NUL character")


def deep_merge(base: Any, over: Any) -> Any:
    """A new tree: dicts merge key by key; anything else (lists, scalars, null) replaces."""
    return copy.deepcopy(merge_over(base, over))


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
        if len(chain) >= MAX_VAR_CHAIN:
            raise RecipeError(f"paths.{name}: variables refer to variables more than {MAX_VAR_CHAIN} deep")
        done[name] = sub(str(paths[name]), f"paths.{name}", chain + (name,))
        return done[name]

    def sub(s: str, where: str, chain: tuple[str, ...] = ()) -> str:
        pieces, size, last = [], 0, 0
        for m in _VAR.finditer(s):  # the size is checked while building: a string never grows past the cap
            value = var(m.group(1).strip(), where, chain)
            pieces += [s[last:m.start()], value]
            size += m.start() - last + len(value)
            last = m.end()
            if size > MAX_STRING_CHARS:
                raise RecipeError(f"{where}: expands to more than {MAX_STRING_CHARS:,} characters "
                                  "(variables repeated inside each other?)")
        return "".join(pieces) + s[last:]

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
