"""Job objects: one dataclass per command, from which its command-line flags are generated.

A long-running command (``photoz train``, ``predict``, ``cutouts``, ``sdss-dataset``, ``export``, ``ship``) takes
one job object instead of a dozen keyword arguments: the dataclass is the one place its options, defaults and help
live; :func:`add_arguments` makes the subcommand's flags from it and :func:`from_arguments` the job from the
parsed flags, so the Python call and the command cannot drift apart. Imports only the standard library.

Per field, ``metadata`` (set with :func:`option`) holds ``help`` and optionally ``flag`` (the flag's name, or a
positional name without dashes), ``parse`` (argparse's ``type=``: a function of the string), ``choices``,
``metavar``, ``nargs``, ``append`` (the flag may repeat: a list of its values, then ``parse``\\ d as a whole)
and ``cli=False`` (no flag: set from Python only).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import Any, TypeVar

Job = TypeVar("Job")


def option(default: Any, help: str, **cli: Any) -> Any:
    """A job field with its command-line help (and ``flag``, ``parse``, ``choices``, ... as above). A callable
    ``default`` is a factory; :data:`dataclasses.MISSING` makes the option required."""
    if callable(default):
        return dataclasses.field(default_factory=default, metadata={"help": help, **cli})
    return dataclasses.field(default=default, metadata={"help": help, **cli})


def required(help: str, **cli: Any) -> Any:
    """A job field without a default: a required flag, or a positional argument if ``flag`` has no dashes."""
    return dataclasses.field(metadata={"help": help, **cli})


def positive_int(value: str) -> int:
    """argparse's ``type=`` for counts: an integer of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _scalar(kind: Any) -> Any:
    """The type argparse converts one value to: ``int`` of ``int | None``, ``str`` of ``list[str | Path]`` (the
    first member of a union), ``str`` of ``Any``."""
    if kind is Any:
        return str
    args = [t for t in typing.get_args(kind) if t is not type(None)]
    return _scalar(args[0]) if args else kind


def add_arguments(parser: argparse.ArgumentParser, job: type[Any]) -> None:
    """One flag (or positional argument) per field of the dataclass ``job``, with its type, default and help."""
    hints = typing.get_type_hints(job)
    for f in dataclasses.fields(job):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        is_required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if is_required else (f.default if f.default_factory is dataclasses.MISSING
                                            else f.default_factory())
        unset = default is None or default is False or (isinstance(default, (list, dict)) and not default)
        shown = "" if is_required or unset else f" (default {_shown(default)})"
        common: dict[str, Any] = {"help": meta["help"] + shown}
        if meta.get("metavar"):
            common["metavar"] = meta["metavar"]
        if not flag.startswith("-"):  # positional
            parser.add_argument(flag, nargs=meta.get("nargs"), type=meta.get("parse", _scalar(hints[f.name])),
                                **common)
            continue
        common["dest"] = f.name
        if hints[f.name] is bool:
            action = "store_true" if default is False else argparse.BooleanOptionalAction  # --no-X for defaults on
            parser.add_argument(flag, action=action, default=default, **common)
        elif meta.get("append"):
            parser.add_argument(flag, action="append", required=is_required, **common)
        else:
            if not is_required:
                common["default"] = default
            parser.add_argument(flag, type=meta.get("parse", _scalar(hints[f.name])), required=is_required,
                                choices=meta.get("choices"), nargs=meta.get("nargs"), **common)


def add_command(sub: Any, name: str, job: type[Any], func: Callable[[argparse.Namespace], int], help: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """The subcommand ``name`` of ``sub`` (an argparse sub-parsers action): its flags from the dataclass ``job``,
    ``func`` to run it."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    add_arguments(parser, job)
    parser.set_defaults(func=func)
    return parser


def _shown(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def from_arguments(args: argparse.Namespace, job: Callable[..., Job]) -> Job:
    """The job the parsed flags describe (repeated flags through their field's ``parse``)."""
    values = {}
    for f in dataclasses.fields(job):  # type: ignore[arg-type]
        if not f.metadata.get("cli", True):
            continue
        value = getattr(args, f.name)
        if f.metadata.get("append") and "parse" in f.metadata:
            value = f.metadata["parse"](value)
        values[f.name] = value
    return job(**values)
