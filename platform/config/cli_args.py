"""Command-line flags generated from typed configs, with `--config FILE.yaml` and `--print-config`.

A command's config is a dataclass composed of concern dataclasses (`class TuneCommand(TuneConfig, TrainConfig)`).
Each concern becomes one help group; each field one flag (`option()` metadata gives help, choices and aliases).
Precedence: the dataclass default, then the config file, then flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ctplatform.config.options import MISSING, check_choices


def _concerns(cls: type) -> list[type]:
    """The dataclasses `cls` is made of, most basic first (help groups in that order)."""
    return [base for base in reversed(cls.__mro__) if dataclasses.is_dataclass(base)]


def _owner(cls: type) -> dict[str, type]:
    """Each field -> the concern whose definition it uses (the first in the method resolution order)."""
    owner: dict[str, type] = {}
    for base in cls.__mro__:
        for name in vars(base).get("__annotations__", {}):
            if dataclasses.is_dataclass(base) and name in base.__dataclass_fields__:
                owner.setdefault(name, base)
    return owner


def _inner(hint: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def coerce(value: Any, hint: Any, item: dataclasses.Field) -> Any:
    """A flag's text or a config file's value -> the field's type; ValueError naming what was expected."""
    parse = item.metadata.get("parse")
    inner, optional = _inner(hint)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{item.name} may not be empty")
    if parse is not None:
        return parse(value)
    if typing.get_origin(inner) is list:
        return [str(v) for v in (value if isinstance(value, list | tuple) else [value])]
    if inner is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"{item.name}: expected true or false, got {value!r}")
    if inner in (int, float, str):
        try:
            number = inner(value)
        except (TypeError, ValueError):
            raise ValueError(f"{item.name}: expected {inner.__name__}, got {value!r}") from None
        if inner is int and isinstance(value, float) and value != number:
            raise ValueError(f"{item.name}: expected an integer, got {value!r}")
        return number
    return value


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add `--config`, `--print-config` and one flag per field of `cls`, grouped by concern."""
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="read settings from a YAML file (field names as the flags, with underscores); flags "
                             "given here override it")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")
    hints = typing.get_type_hints(cls)
    owner = _owner(cls)
    for concern in _concerns(cls):
        names = [f.name for f in dataclasses.fields(cls)
                 if owner.get(f.name) is concern and f.metadata.get("cli", True)]
        if not names:
            continue
        title = (concern.__doc__ or concern.__name__).strip().splitlines()[0]
        group = parser.add_argument_group(title)
        for name in names:
            _add_flag(group, cls.__dataclass_fields__[name], hints[name])
    parser.set_defaults(config_class=cls)


def _default_text(item: dataclasses.Field) -> str:
    if "default" in (item.metadata.get("help") or ""):
        return ""
    if item.default is not MISSING and item.default is not None and not isinstance(item.default, bool):
        return f" (default {item.default})"
    return ""


def _add_flag(group, item: dataclasses.Field, hint: Any) -> None:
    meta = item.metadata
    if meta.get("positional"):
        group.add_argument(item.name, metavar=meta.get("metavar"), help=meta.get("help") or "",
                           type=lambda text, item=item, hint=hint: _parse_flag(text, item, hint))
        return
    flags = [meta.get("flag") or "--" + item.name.replace("_", "-"), *meta.get("aliases", ())]
    kwargs: dict[str, Any] = {"dest": item.name, "default": argparse.SUPPRESS,
                              "help": (meta.get("help") or "") + _default_text(item)}
    inner, _ = _inner(hint)
    if meta.get("const", MISSING) is not MISSING:
        kwargs.update(action="store_const", const=meta["const"])
    elif inner is bool:
        kwargs.update(action="store_true")
    else:
        if typing.get_origin(inner) is list:
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = lambda text, item=item, hint=hint: _parse_flag(text, item, hint)
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
    group.add_argument(*flags, **kwargs)


def _parse_flag(text: str, item: dataclasses.Field, hint: Any) -> Any:
    try:
        return coerce(text, hint, item)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_config_file(path: str | Path, cls: type, known_elsewhere: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A YAML file's settings for `cls`, typed. Keys of other commands' settings (`known_elsewhere`) are ignored,
    so one run's config file serves `run`, `train` and `tune`; any other key is an error naming it."""
    text = Path(path).read_text()
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of setting names to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields) - known_elsewhere)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        if name in fields:
            try:
                out[name] = coerce(value, hints[name], fields[name])
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
    return out


def resolve(args: argparse.Namespace, known_elsewhere: frozenset[str] = frozenset()) -> Any:
    """The command's config: defaults, then `--config`, then the flags given."""
    cls = args.config_class
    values = load_config_file(args.config, cls, known_elsewhere) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
    config = cls(**values)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.metadata.get("required") and getattr(config, f.name) is None]
    if missing:
        raise ValueError("missing required setting(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
    check_choices(config)
    return config


def to_yaml(config: Any) -> str:
    """The settings as a YAML mapping, one concern after another (the file `--config` reads back). Secrets (an API
    key) are left out: they come from the environment or a flag, never from a file someone may share."""
    values = {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)
              if not f.metadata.get("secret")}
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=False)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
