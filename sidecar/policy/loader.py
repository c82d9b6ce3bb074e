"""Policy files (``policies/*.toml``) → a :class:`~sidecar.policy.policy_set.PolicySet`.

Every ``*.toml`` file directly in the directory is read, in name order; each holds ``[[allow]]``
and ``[[deny]]`` rules (see :mod:`sidecar.policy.rules`). Any problem raises
:class:`~sidecar.errors.ConfigError` as ``FILE:LINE: reason`` so start-up stops (or a SIGHUP
reload keeps the old set) with a message an operator can act on. An empty directory gives an
empty set, which denies everything; ``len(policy_set) == 0`` tells.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from sidecar.errors import ConfigError
from sidecar.policy.policy_set import PolicySet
from sidecar.policy.rules import Rule, compile_rule
from sidecar.policy.vocabulary import RuleError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*$")
_HEADER = re.compile(r"^\s*\[\[\s*(allow|deny)\s*\]\]\s*(#.*)?$")
_ANY_HEADER = re.compile(r"^\s*\[")
_ASSIGNMENT = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")
_RULE_KINDS = ("allow", "deny")


def load_policies(directory: str | os.PathLike[str]) -> PolicySet:
    """Read every ``*.toml`` in ``directory`` (sorted by name) into one set.

    Raises ``ConfigError`` naming the file, line and reason for the first problem, including a
    rule name used twice across files.
    """
    path = Path(directory)
    if not path.is_dir():
        raise ConfigError(f"policies.dir: {os.fspath(directory)!r} is not a directory")
    files = sorted(p for p in path.glob("*.toml") if p.is_file())
    rules: list[Rule] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: cannot read the policy file: {exc}") from None
        rules.extend(parse_policy_text(text, path=str(file)))
    return PolicySet(rules, files=[str(f) for f in files])


def parse_policy_text(text: str, *, path: str = "<policy>") -> list[Rule]:
    """The rules in one policy document. Raises ``ConfigError`` as ``PATH:LINE: reason``."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        line = _toml_error_line(message, text)
        reason = _TOML_END.sub("", _TOML_POSITION.sub("", message))
        raise ConfigError(f"{path}:{line}: not valid TOML: {reason}") from None
    lines = text.splitlines()
    for name, value in document.items():
        if name not in _RULE_KINDS:
            raise ConfigError(
                f"{path}:{_find_top_level(lines, name)}: unknown table {name!r}; a policy file "
                "holds only [[allow]] and [[deny]] rules"
            )
        if not isinstance(value, list):
            raise ConfigError(
                f"{path}:{_find_top_level(lines, name)}: {name!r} must be an array of tables; "
                f"write [[{name}]] (two brackets) for each rule"
            )
    headers = _rule_headers(lines)
    placed: list[tuple[int, Rule]] = []
    for kind in _RULE_KINDS:
        for index, raw in enumerate(document.get(kind, [])):
            start, end = _rule_block(headers, kind, index, len(lines))
            source_line = _find_key(lines, start, end, "name") or start + 1
            try:
                if not isinstance(raw, Mapping):
                    raise RuleError(f"each {kind!r} entry must be a table; write [[{kind}]]")
                rule = compile_rule(kind, raw, source=f"{path}:{source_line}")
            except RuleError as exc:
                line = source_line
                if exc.key:
                    line = _find_key_or_parent(lines, start, end, exc.key) or source_line
                label = f"rule {raw.get('name')!r}: " if isinstance(raw, Mapping) and isinstance(
                    raw.get("name"), str) else ""  # fmt: skip
                raise ConfigError(f"{path}:{line}: {label}{exc}") from None
            placed.append((start, rule))
    # Rules keep the order they are written in, allow and deny interleaved.
    placed.sort(key=lambda item: item[0])
    return [rule for _, rule in placed]


def _toml_error_line(message: str, text: str) -> int:
    match = _TOML_POSITION.search(message)
    if match:
        return int(match.group(1))
    return max(1, text.count("\n") + (0 if text.endswith("\n") else 1))


def _rule_headers(lines: list[str]) -> dict[str, list[int]]:
    """0-based line numbers of each ``[[allow]]`` / ``[[deny]]`` header, by kind."""
    found: dict[str, list[int]] = {kind: [] for kind in _RULE_KINDS}
    in_multiline = False
    for number, line in enumerate(lines):
        # Skip the inside of multi-line strings so a header-looking line there is not counted.
        if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
            in_multiline = not in_multiline
            continue
        if in_multiline:
            continue
        match = _HEADER.match(line)
        if match:
            found[match.group(1)].append(number)
    return found


def _rule_block(
    headers: dict[str, list[int]], kind: str, index: int, total: int
) -> tuple[int, int]:
    """The 0-based [start, end) lines of the ``index``-th rule of ``kind``."""
    starts = headers[kind]
    if index >= len(starts):  # e.g. an inline array of tables; search the whole file
        return 0, total
    start = starts[index]
    later = [n for k in _RULE_KINDS for n in headers[k] if n > start]
    return start, min(later, default=total)


def _normalise_key(text: str) -> str:
    return re.sub(r"\s*\.\s*", ".", text.replace('"', "").replace("'", "").strip())


def _find_key(lines: list[str], start: int, end: int, dotted: str) -> int | None:
    """1-based line of the assignment to ``dotted`` (or a header for it) within the block."""
    table = ""
    for number in range(start, end):
        line = lines[number]
        if _ANY_HEADER.match(line):
            header = _normalise_key(line.strip().strip("[]").split("#", 1)[0].strip().strip("[]"))
            table = header.split(".", 1)[1] if "." in header else ""
            if table and (table == dotted or table.startswith(dotted + ".")):
                return number + 1
            continue
        match = _ASSIGNMENT.match(line)
        if not match:
            continue
        key = _normalise_key(match.group(1))
        full = f"{table}.{key}" if table else key
        if full == dotted or full.startswith(dotted + "."):
            return number + 1
    return None


def _find_key_or_parent(lines: list[str], start: int, end: int, dotted: str) -> int | None:
    parts = dotted.split(".")
    while parts:
        found = _find_key(lines, start, end, ".".join(parts))
        if found:
            return found
        parts.pop()
    return None


def _find_top_level(lines: list[str], name: str) -> int:
    pattern = re.compile(
        rf"^\s*(\[\[?\s*[\"']?{re.escape(name)}[\"']?\s*[\].]|[\"']?{re.escape(name)}[\"']?\s*[.=])"
    )
    for number, line in enumerate(lines):
        if pattern.match(line):
            return number + 1
    return 1
