"""The runnable examples of a Markdown page, and how an output shown there is compared.

A fenced block is run when the line before its opening fence is a marker comment:

    <!-- doctest -->            every command must exit 0
    <!-- doctest: exit=1 -->    every command must exit 1 (e.g. a denied `policy check`)
    <!-- doctest: subset -->    a JSON output shown may leave fields out

- In a ```` ```sh ```` block every command is run (a line ending in ``\\``, ``|``, ``&&`` or
  ``||`` continues it, a here-document runs to its end marker; ``#`` lines are comments);
  outputs are not compared.
- In a ```` ```console ```` block, ``$ `` starts a command (continued like above); the lines up
  to the next ``$ `` are its output, compared by :func:`output_mismatch`.

Commands of one page share one shell, in page order, so a variable one block exports is there in
the next. ``$SOCK``, ``$KMS_SIDECAR_CONFIG``, ``$UPSTREAM`` and ``$UPSTREAM_TOKEN`` come from the
``export`` line ``kms-sidecar dev`` prints.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MARKER = re.compile(r"^<!--\s*doctest(?::\s*(?P<options>[^>]*?))?\s*-->\s*$")
_FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<info>[\w-]*)")
ELLIPSIS = "…"


@dataclass(frozen=True)
class Command:
    """One command of a page: where it is, what to run, and what it must print and exit with."""

    path: Path
    line: int
    text: str
    exit: int = 0
    #: ``None``: not compared.
    output: str | None = None
    subset: bool = False

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


@dataclass
class _Block:
    line: int
    info: str
    options: dict[str, str]
    lines: list[str] = field(default_factory=list)


def _options(text: str | None) -> dict[str, str]:
    found: dict[str, str] = {}
    for word in (text or "").split():
        name, _, value = word.partition("=")
        found[name] = value
    return found


def _blocks(path: Path) -> list[_Block]:
    blocks: list[_Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        marker = _MARKER.match(lines[i].strip())
        if marker and i + 1 < len(lines) and (fence := _FENCE.match(lines[i + 1].strip())):
            block = _Block(i + 3, fence.group("info"), _options(marker.group("options")))
            close = fence.group("fence")
            indent = len(lines[i + 1]) - len(lines[i + 1].lstrip())  # a block in a list item
            i += 2
            while i < len(lines) and not lines[i].strip().startswith(close):
                line = lines[i]
                block.lines.append(line[indent:] if not line[:indent].strip() else line.lstrip())
                i += 1
            if i == len(lines):
                raise ValueError(f"{path}:{block.line - 2}: the doctest block is never closed")
            if block.info not in ("sh", "console"):
                raise ValueError(f"{path}:{block.line - 2}: doctest blocks are sh or console")
            blocks.append(block)
        i += 1
    return blocks


#: A line ending so goes on on the next line, as in a shell.
_CONTINUED = ("\\", "|", "&&", "||")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


def _joined(lines: list[str], start: int) -> tuple[str, int]:
    """The command starting at ``lines[start]`` with its ``\\`` continuations and here-document
    (``<<'EOF'`` … ``EOF``); the index after it."""
    parts = [lines[start]]
    i = start
    while parts[-1].rstrip().endswith(_CONTINUED) and i + 1 < len(lines):
        i += 1
        parts.append(lines[i])
    heredoc = _HEREDOC.search("\n".join(parts))
    if heredoc:
        end = heredoc.group(2)
        while i + 1 < len(lines):
            i += 1
            parts.append(lines[i])
            if lines[i].strip() == end:
                break
    return "\n".join(parts), i + 1


def commands(path: Path) -> list[Command]:
    """Every command of the marked blocks of ``path``, in page order."""
    found: list[Command] = []
    for block in _blocks(path):
        expected_exit = int(block.options.get("exit", "0"))
        subset = "subset" in block.options
        lines = block.lines
        i = 0
        if block.info == "sh":
            while i < len(lines):
                stripped = lines[i].strip()
                if not stripped or stripped.startswith("#"):
                    i += 1
                    continue
                line = block.line + i
                text, i = _joined(lines, i)
                found.append(Command(path, line, text, expected_exit))
            continue
        while i < len(lines):
            if not lines[i].startswith("$ "):
                raise ValueError(f"{path}:{block.line + i}: console output before any `$ `")
            line = block.line + i
            text, used = _joined([lines[i][2:], *lines[i + 1 :]], 0)
            i += used
            output: list[str] = []
            while i < len(lines) and not lines[i].startswith("$ "):
                output.append(lines[i])
                i += 1
            found.append(Command(path, line, text, expected_exit, "\n".join(output), subset))
    return found


def _text_matches(expected: str, actual: str) -> bool:
    pattern = ".*".join(re.escape(piece) for piece in expected.split(ELLIPSIS))
    return re.fullmatch(pattern, actual, re.DOTALL) is not None


def _json_mismatch(expected: Any, actual: Any, where: str, subset: bool) -> str | None:
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{where}: expected an object, got {actual!r}"
        missing = [k for k in expected if k not in actual]
        if missing:
            return f"{where}: the output has no {missing}"
        extra = [k for k in actual if k not in expected]
        if extra and not subset:
            return f"{where}: the page does not show {extra}"
        for key, value in expected.items():
            found = _json_mismatch(value, actual[key], f"{where}.{key}", subset)
            if found:
                return found
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return f"{where}: expected a list, got {actual!r}"
        open_ended = bool(expected) and expected[-1] == ELLIPSIS
        items = expected[:-1] if open_ended else expected
        if len(actual) < len(items) or (not open_ended and len(actual) != len(items)):
            return f"{where}: expected {len(items)} items, got {len(actual)}"
        for i, value in enumerate(items):
            found = _json_mismatch(value, actual[i], f"{where}[{i}]", subset)
            if found:
                return found
        return None
    if isinstance(expected, str) and ELLIPSIS in expected:
        if expected == ELLIPSIS:
            return None  # any value, of any type
        if isinstance(actual, str) and _text_matches(expected, actual):
            return None
        return f"{where}: {actual!r} does not match {expected!r}"
    if expected != actual or type(expected) is not type(actual):
        return f"{where}: expected {expected!r}, got {actual!r}"
    return None


def output_mismatch(expected: str, actual: str, *, subset: bool = False) -> str | None:
    """Why ``actual`` is not the output a page shows; ``None`` when it is.

    JSON shown is compared as JSON: the same fields (``subset``: at least those shown), the
    same values, where a string holding ``…`` matches any text in its place and ``"…"`` any
    value; a list ending in ``"…"`` may go on. Other text is compared line by line, trailing
    spaces ignored; ``…`` within a line matches any text, and a line of only ``…`` any lines.
    """
    shown = expected.strip()
    if shown.startswith(("{", "[")):
        try:
            wanted = json.loads(shown)
        except ValueError:
            pass
        else:
            try:
                got = json.loads(actual)
            except ValueError:
                return f"expected JSON, got {actual[:300]!r}"
            return _json_mismatch(wanted, got, "$", subset)
    pattern = ""
    for line in shown.splitlines():
        if line.strip() == ELLIPSIS:
            pattern += r"(?:[^\n]*\n)*?"  # any number of whole lines
        else:
            pattern += "[^\n]*".join(map(re.escape, line.rstrip().split(ELLIPSIS))) + r"\n"
    got = "".join(line.rstrip() + "\n" for line in actual.strip().splitlines())
    if re.fullmatch(pattern, got):
        return None
    return "the output differs:\n--- shown\n" + shown + "\n--- got\n" + actual.strip()
