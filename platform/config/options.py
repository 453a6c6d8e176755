"""Typed configuration fields: a dataclass field that also describes its command-line flag.

Every command-line flag is generated from these fields (`ctplatform.config.cli_args`), so a flag's name, type,
default, choices and help text are written once, next to the field they set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

MISSING = dataclasses.MISSING
PATH_KINDS = ("read", "write", "uri")


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    choices: Sequence[Any] | None = None,
    aliases: Sequence[str] = (),
    flag: str | None = None,
    const: Any = MISSING,
    parse: Callable[[str], Any] | None = None,
    default_factory: Any = MISSING,
    metavar: str | None = None,
    required: bool = False,
    secret: bool = False,
    cli: bool = True,
    positional: bool = False,
    path: str | None = None,
) -> Any:
    """A dataclass field with its flag's description.

    `flag` overrides the generated name (`--field-name`); `aliases` adds other spellings (`--model-name`);
    `choices` restricts the value (checked on the command line and in config files); `const` makes a flag that
    takes no value and sets this constant (`--cpu` sets `use_gpu` to False); `parse` turns the flag's text (or a
    config file's value) into the field's value where the annotation alone cannot; `required` makes a command
    refuse to run without a value (from the command line or a config file); `cli=False` keeps a field out of the
    command line (set by code or config files only); `positional=True` makes it a positional argument
    (`ctplatform compare RUN_A RUN_B`), named by `metavar`.

    `path` marks a path option (a local path or an object-store URI, parsed by `ctplatform.storage.user_path`) and
    says how the command line treats a URI (`ctplatform.staging`): "read" (copied to a local temp folder first),
    "write" (written locally, uploaded when the command succeeds) or "uri" (the command reads and writes it
    itself: data, caches and run storage too large to copy whole).
    """
    if path is not None:
        if path not in PATH_KINDS:
            raise ValueError(f"path must be one of {PATH_KINDS}, got {path!r}")
        if parse is None:
            from ctplatform.storage import user_path

            parse = user_path
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "aliases": tuple(aliases),
                "flag": flag, "const": const, "parse": parse, "metavar": metavar, "required": required,
                "secret": secret, "cli": cli, "positional": positional, "path": path}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(config: Any) -> None:
    """Raise ValueError naming the valid values when a field with `choices` holds another value."""
    for item in dataclasses.fields(config):
        valid = item.metadata.get("choices")
        value = getattr(config, item.name)
        if valid and value is not None and value not in valid:
            raise ValueError(f"invalid {item.name.replace('_', '-')} {value!r}: choose one of "
                             f"{', '.join(map(str, valid))}")


def project(config: Any, cls: type) -> Any:
    """The `cls` part of a composed configuration (its fields, taken from `config`)."""
    return cls(**{item.name: getattr(config, item.name) for item in dataclasses.fields(cls)})
