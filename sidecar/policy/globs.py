"""Glob patterns of policy rules (``*``, ``?``, and ``**`` across ``/``) compiled to regexes.

- key patterns (``keys``): ``*`` is any run of characters and ``?`` one character; key names have
  no separators, so ``payments*`` also matches ``payments-admin``. There are no character classes.
  Matching is case-sensitive.
- ``unix_exe`` and ``spiffe_id`` (``segmented``): ``*`` and ``?`` stay within one ``/``-separated
  segment; ``**`` spans segments.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def glob_to_regex(pattern: str, *, segmented: bool) -> str:
    """Regex source for a glob: ``*`` and ``?``; with ``segmented``, they stop at ``/`` and ``**``
    crosses it. Everything else is literal."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            run = 1
            while i + run < len(pattern) and pattern[i + run] == "*":
                run += 1
            out.append(".*" if not segmented or run >= 2 else "[^/]*")
            i += run
            continue
        if char == "?":
            out.append("[^/]" if segmented else ".")
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def compile_globs(patterns: Iterable[str], *, segmented: bool) -> re.Pattern[str]:
    """One regex matching any of ``patterns`` (use ``fullmatch``)."""
    # No DOTALL: a newline in a caller-supplied name never matches a wildcard.
    return re.compile("|".join(f"(?:{glob_to_regex(p, segmented=segmented)})" for p in patterns))
