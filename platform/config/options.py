"""Typed configuration fields: a dataclass field that also describes its command-line flag.

Every command-line flag is generated from these fields (`ctplatform.config.cli_args`), so a flag's name, type,
default, choices and help text are written once, next to the field they set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

MISSING = dataclasses.MISSING


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    choices: Sequence[Any] | None = None,
    aliases: Sequence[str] = (),
    flag: str | None = None,
    default_factory: Any = MISSING,
    metavar: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with its flag's description.

    `flag` overrides the generated name (`--field-name`), `aliases` adds other spellings (`--model-name`),
    `choices` restricts the value (checked on the command line and in config files), `cli=False` keeps a field
    out of the command line (set by code or config files only).
    """
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "aliases": tuple(aliases),
                "flag": flag, "metavar": metavar, "cli": cli}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
