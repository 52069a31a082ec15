"""Every command the README and docs/ show is checked against the code it runs.

The cheap ones run for real elsewhere (tests/integration/test_readme.py: the README's curl, Python and predict
commands; tests/integration/test_doc_examples.py: the field-to-photo-z walk-through and the API page's curl
calls). Here every ``photoz ...`` command, in code blocks and inline, is parsed by the real ``photoz`` parser,
every ``python -m MODULE ...`` by that module's own argument parser (stopped once it has parsed), and every
``make TARGET`` is a target of the Makefile: a renamed flag, a removed option or a moved module fails here
instead of in a reader's terminal. Training runs, Docker and Kubernetes commands are parsed, not run (hours, or
a cluster; the images are built and smoke-tested by ``make docker-test``).
"""
import argparse
import contextlib
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Placeholders in prose that are not commands to check (``python -m benchmarks.NAME``, ``--flag``).
PLACEHOLDERS = ("NAME", "...", "<", "--flag")


def _commands(prefix: str) -> list[tuple[str, str, bool]]:
    """(page, command, whole) for every shell command starting with ``prefix``: code-block lines (continuations
    joined, comments dropped: ``whole``) and inline code spans (often a command's name and one option in prose)."""
    found = []
    for page in PAGES:
        text = page.read_text()
        blocks = re.findall(r"```(?:sh|bash|shell|console)\n(.*?)```", text, re.S)
        lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
        spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
        for candidate, whole in [(line, True) for line in lines] + [(span, False) for span in spans]:
            command = candidate.split(" # ")[0].split("  #")[0].strip().rstrip("&").strip()
            command = re.sub(r"^\w+=\S+ ", "", command)  # a leading VAR=value
            if command.startswith(prefix) and not any(p in command for p in PLACEHOLDERS):
                found.append((page.name, command, whole))
    return sorted(set(found))


def _argv(command: str) -> list[str]:
    """The command's arguments after its prefix; optional parts written [like this] are dropped."""
    command = re.sub(r"\[[^\[\]]*(\[[^\[\]]*\])?[^\[\]]*\]", "", command)
    return shlex.split(command)


PHOTOZ = _commands("photoz ")
PYTHON_M = _commands("python -m ")
MAKE = _commands("make ")


def test_the_docs_show_commands():
    """The extraction finds what the pages hold (a regex gone wrong would make the checks below vacuous)."""
    assert len(PHOTOZ) >= 25 and len(PYTHON_M) >= 15 and len(MAKE) >= 3
    shown = {c.split()[1] for _, c, whole in PHOTOZ if whole}
    assert shown >= {"serve", "predict", "cutouts", "train", "export", "simulate", "evaluate", "sdss-dataset", "ship",
                     "calibrate-pit"}


@pytest.mark.parametrize("page, command, whole", PHOTOZ, ids=[f"{p}: {c[:60]}" for p, c, _ in PHOTOZ])
def test_photoz_commands_parse(page, command, whole):
    """A command in a code block parses whole; one quoted in prose names a subcommand and options it has."""
    from photoz.cli import build_parser

    parser = build_parser()
    argv = _argv(command)[1:]
    if whole:
        parser.error = _raise_usage  # type: ignore[method-assign]
        assert callable(_parse(parser, argv).func), f"{page}: {command}"
        return
    [subparsers] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert argv[0] in subparsers.choices, f"{page}: {command}: no subcommand {argv[0]!r}"
    known = subparsers.choices[argv[0]]._option_string_actions
    unknown = [word.split("=")[0] for word in argv[1:] if word.startswith("--") and word.split("=")[0] not in known]
    assert not unknown, f"{page}: {command}: photoz {argv[0]} has no {unknown}"


class _Parsed(Exception):
    """Raised once a module's parser has parsed its arguments: nothing runs after it."""


class _Usage(Exception):
    pass


def _raise_usage(*args, **kwargs):
    raise _Usage(f"{args} {kwargs}")


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed strictly: the docs write options in full (an abbreviation breaks when a flag is added)."""
    parser.allow_abbrev = False
    for action in parser._actions:  # subparsers report errors through their own error()
        for choice in getattr(action, "choices", None) or {}:
            sub = action.choices[choice] if isinstance(action.choices, dict) else None
            if isinstance(sub, argparse.ArgumentParser):
                sub.error = _raise_usage  # type: ignore[method-assign]
                sub.allow_abbrev = False
    try:
        return parser.parse_args(argv)
    except _Usage as exc:
        raise AssertionError(f"photoz {' '.join(argv)}: {exc}") from None


@pytest.mark.parametrize("page, command, whole", PYTHON_M, ids=[f"{p}: {c[:60]}" for p, c, _ in PYTHON_M])
def test_python_module_commands_parse(page, command, whole, monkeypatch):
    argv = _argv(command)[2:]
    module, args = argv[0], argv[1:]
    original = argparse.ArgumentParser.parse_args
    seen = []

    def parse_then_stop(self, args=None, namespace=None):
        self.allow_abbrev = False
        try:
            seen.append(original(self, args, namespace) if whole else self.parse_known_args(args, namespace)[0])
        except SystemExit as exc:
            if not whole:  # prose quotes a module with some of its options: they must exist
                unknown = [w.split("=")[0] for w in (sys.argv[1:] if args is None else args) if w.startswith("--")
                           and w.split("=")[0] not in self._option_string_actions]
                assert not unknown, f"{page}: python -m {module}: no option {unknown}"
                seen.append(None)
                raise _Parsed from None
            raise AssertionError(f"{page}: {command}: rejected ({exc})") from None
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr("sys.argv", [module, *args])
    with contextlib.suppress(_Parsed):
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    assert seen, f"{page}: python -m {module} parsed no arguments (not an argparse command?)"


@pytest.mark.parametrize("page, command, whole", MAKE, ids=[f"{p}: {c[:60]}" for p, c, _ in MAKE])
def test_make_commands_name_makefile_targets(page, command, whole):
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    target = next(word for word in _argv(command)[1:] if "=" not in word)
    assert target in targets, f"{page}: {command}: no Makefile target {target!r}"
