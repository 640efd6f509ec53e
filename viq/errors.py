"""Typed errors. Raised where the fault is found, with the offending name and what to do.

The CLI turns a ``ViQError`` into one red line and exit code 2 (usage/config) or 1 (some inputs
failed); anything else is a bug and shows a traceback with ``--debug``.
"""

from __future__ import annotations


class ViQError(Exception):
    """Base class for every error viq raises on purpose."""

    exit_code = 2


class ConfigError(ViQError):
    """A config, recipe or argument is invalid."""


class WeightsError(ViQError):
    """A weights file or directory cannot be used (missing, unreadable, wrong keys or shapes)."""


class IntegrityError(WeightsError):
    """A weights file is not what its directory's config.json recorded (digest), or holds values
    no model can use (wrong dtype, NaN/inf): tampered, corrupt or half-written."""


class KeyMismatchError(WeightsError):
    """Strict state-dict loading found missing or unexpected keys (or shape mismatches)."""

    def __init__(self, where: str, missing=(), unexpected=(), mismatched=(), file_name=None):
        """Keys are viq names; ``file_name(key)`` gives the name the file uses, shown beside it."""
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)

        def show(entry: str) -> str:
            key, _, rest = entry.partition(" ")
            other = file_name(key) if file_name else None
            named = f"{key} (file: {other})" if other and other != key else key
            return f"{named} {rest}" if rest else named

        parts = [f"{where}: the weights do not match the model"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape mismatch", self.mismatched)):
            if keys:
                keys = [show(k) for k in keys]
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
                parts.append(f"{label} ({len(keys)}): {shown}")
        super().__init__("; ".join(parts))


class ImageError(ViQError):
    """One input image cannot be decoded; reported per file, never stops a run."""

    exit_code = 1


class StoreError(ViQError):
    """A code store is missing, corrupt, or was made by a different model."""


class RecipeError(ConfigError):
    """A training recipe does not validate."""


class HubError(ViQError):
    """A download or model lookup failed (offline, unknown name, missing files)."""
