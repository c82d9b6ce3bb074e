"""``context.<name>`` values of a rule: literal text mixed with facts of the caller.

Placeholders are ``{jwt.sub}``, ``{jwt.iss}``, ``{jwt.claims.<path>}``, ``{spiffe_id}``,
``{unix_uid}`` and ``{unix_gid}``; a value rendered for a caller who lacks one of its facts is
``None`` (the rule does not match).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from sidecar.identity import Identity
from sidecar.policy.facts import FactGetter, fact_getter
from sidecar.policy.vocabulary import MAX_CLAIM_PARTS, RuleError

_PLACEHOLDER: Final = re.compile(r"\{([^{}]*)\}")
_SIMPLE_FACTS: Final = frozenset({"jwt.sub", "jwt.iss", "spiffe_id", "unix_uid", "unix_gid"})

_Piece = str | FactGetter  # literal text, or a fact of the caller


@dataclass(frozen=True, slots=True)
class Template:
    """A ``context.<name>`` value: literal text and facts of the caller."""

    source: str
    pieces: tuple[_Piece, ...]

    def render(self, identity: Identity) -> str | None:
        """The value for this caller, or ``None`` if a fact it needs is missing."""
        pieces = self.pieces
        if len(pieces) == 1:
            only = pieces[0]
            return only if isinstance(only, str) else only(identity)
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(piece)
                continue
            value = piece(identity)
            if value is None:
                return None
            out.append(value)
        return "".join(out)


def compile_template(source: str, key: str) -> Template:
    """Parse a ``context.<name>`` value. Raises :class:`RuleError` for unknown placeholders."""
    if not isinstance(source, str):
        raise RuleError(f"'{key}' must be a string (a literal or a template such as "
                        "'{jwt.claims.tenant}')", key)  # fmt: skip
    pieces: list[_Piece] = []
    texts: list[str] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(source):
        text = source[pos : match.start()]
        if text:
            pieces.append(text)
            texts.append(text)
        fact = match.group(1).strip()
        if fact in _SIMPLE_FACTS:
            pieces.append(fact_getter(fact))
        elif fact.startswith("jwt.claims.") and len(fact) > len("jwt.claims."):
            parts = tuple(fact.removeprefix("jwt.claims.").split("."))
            if len(parts) > MAX_CLAIM_PARTS or any(not p for p in parts):
                raise RuleError(f"'{key}': {{{fact}}} is not a usable claim path", key)
            pieces.append(fact_getter("claim", parts))
        else:
            raise RuleError(
                f"'{key}': unknown placeholder {{{fact}}} (expected {{jwt.sub}}, {{jwt.iss}}, "
                "{jwt.claims.<claim>}, {spiffe_id}, {unix_uid} or {unix_gid})",
                key,
            )
        pos = match.end()
    rest = source[pos:]
    if rest or not pieces:
        pieces.append(rest)
        texts.append(rest)
    if any("{" in text or "}" in text for text in texts):
        raise RuleError(f"'{key}': unbalanced '{{' or '}}' in {source!r}", key)
    return Template(source=source, pieces=tuple(pieces))
