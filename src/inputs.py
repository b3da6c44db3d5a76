"""Coercion of Cog input values (Cog's schema lets 2.0 through for an int, so check again
here), and of the on/off switches read from the environment."""

import os
from typing import Any

from src.errors import UserInputError


def as_int(name: str, value: Any, problems: list[str]) -> Any:
    """`value` as an int if it is a whole number; else a problem is recorded and it is returned."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        problems.append(f"{name} must be a whole number, got {value!r}")
        return value
    return int(value)


def as_float(name: str, value: Any, problems: list[str]) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{name} must be a number, got {value!r}")
        return value
    return float(value)


def switch_on(variable: str) -> bool:
    """An environment variable that turns something off with 0 (on when unset)."""
    value = os.environ.get(variable, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", ""):
        raise ValueError(f"{variable} must be 0 or 1, got {value!r}")
    return value not in ("0", "false", "no")


def auto_switch(variable: str) -> str:
    """An environment variable that is `auto` (unset), `1` or `0` (true/yes/on and
    false/no/off too): "auto", "1" or "0"."""
    value = os.environ.get(variable, "auto").strip().lower() or "auto"
    aliases = {"true": "1", "yes": "1", "on": "1", "false": "0", "no": "0", "off": "0"}
    value = aliases.get(value, value)
    if value not in ("auto", "1", "0"):
        raise UserInputError(f"{variable} must be auto, 1 or 0, got {value!r}")
    return value
