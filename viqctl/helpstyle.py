"""The conventional Click/Typer look of --help, whatever the installed Typer draws by default.

Newer Typer releases print ``<bool>`` beside plain flags, ``<list[str]>`` and ``{inputs}...``; users
of other ML CLIs expect ``--json`` alone, ``PATH``, ``TEXT``, ``INTEGER`` and ``INPUTS...``. Only
how help is drawn changes, never how arguments parse; on a Typer without these hooks nothing is done.
"""

from __future__ import annotations

import re

_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "bool": "BOOLEAN"}


def conventional(label: str | None) -> str | None:
    """``<path>`` -> ``PATH``, ``<list[str]>`` -> ``TEXT``, ``<a|b>`` -> ``[a|b]``."""
    if label is None:
        return None
    inner = label[1:-1] if label.startswith("<") and label.endswith(">") else label
    m = re.fullmatch(r"list\[(.*)\]", inner)
    if m:
        inner = m.group(1)
    if "|" in inner:
        return f"[{inner}]"
    return _NAMES.get(inner.lower(), inner.upper())


def apply() -> None:
    try:
        from typer.core import TyperArgument, TyperOption
    except ImportError:  # pragma: no cover
        return
    if hasattr(TyperOption, "display_type_rich") and not getattr(TyperOption, "_viq_style", False):
        typed = TyperOption.display_type_rich

        def option_type(self, ctx):
            if getattr(self, "is_flag", False) or getattr(self, "count", False):
                return None
            if self.metavar is not None:
                return self.metavar
            return conventional(typed(self, ctx))

        TyperOption.display_type_rich = option_type
        TyperOption._viq_style = True
    if hasattr(TyperArgument, "_usage_display_name") and not getattr(TyperArgument, "_viq_style", False):
        def shown(self) -> str:
            name = (self.metavar or self.name or "").upper()
            return name + ("..." if self.nargs != 1 else "")

        def usage(self) -> str:
            name = (self.metavar or self.name or "").upper()
            name = name if self.required else f"[{name}]"
            return name + ("..." if self.nargs != 1 else "")

        TyperArgument._usage_display_name = usage
        if hasattr(TyperArgument, "display_type_rich"):
            TyperArgument.display_type_rich = lambda self, ctx: shown(self)
        TyperArgument._viq_style = True
