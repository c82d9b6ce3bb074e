"""The ``kms-sidecar`` parser as the rows docs/commands.md shows: one table per command."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from sidecar.cli import build_parser


def _subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, helps.get(name, "")
                yield from _subcommands(sub, (*path, name))


def _is_leaf(parser: argparse.ArgumentParser) -> bool:
    return not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def _spelling(action: argparse.Action) -> str:
    if not action.option_strings:
        return str(action.metavar or action.dest).upper()
    flags = ", ".join(action.option_strings)
    if action.nargs == 0:
        return flags
    metavar = action.metavar or action.dest.upper()
    return f"{flags} {metavar}"


def rows(parser: argparse.ArgumentParser) -> list[str]:
    """``| `--flag VALUE` | help |`` for every argument but ``-h``, in the parser's order."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        text = (action.help or "") % {"default": action.default, "prog": parser.prog}
        if action.required and action.option_strings:
            text += " (required)"
        if action.choices and not isinstance(action.choices, dict):
            text += f"; one of {', '.join(map(str, action.choices))}"
        found.append(f"| `{_spelling(action)}` | {text} |")
    return found


def reference() -> dict[str, tuple[str, list[str]]]:
    """``"kms-sidecar policy check"`` → (its one-line help, its table rows), for every command
    that runs something."""
    return {
        "kms-sidecar " + " ".join(path): (help_text, rows(sub))
        for path, sub, help_text in _subcommands(build_parser())
        if _is_leaf(sub)
    }


if __name__ == "__main__":  # prints the tables, to paste when a command changes
    for command, (help_text, table) in reference().items():
        print(f"### `{command}`\n\n{help_text[0].upper() + help_text[1:]}.\n")
        print("| argument | meaning |\n|---|---|")
        print("\n".join(table) + "\n")
