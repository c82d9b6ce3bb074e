"""The policy loader under hypothesis: any document loads into rules or stops with PATH:LINE.

Documents are written from generated rules whose keys mix the real ones (``when.unix_uid``,
``context.tenant``, ``max_ttl``, ``rate``…) with junk, and whose values are of every TOML type;
raw text is tried too. A loaded set then decides generated requests without raising.
"""

from __future__ import annotations

import datetime
import math
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sidecar.errors import ConfigError
from sidecar.identity import Identity, JwtClaims, PeerCredentials
from sidecar.policy import PolicySet
from sidecar.policy.loader import parse_policy_text
from sidecar.policy.vocabulary import OPERATIONS, WHEN_KEYS

PATH = "fuzz.toml"
_LOCATED = re.compile(rf"^{re.escape(PATH)}:(\d+): \S")

words = st.one_of(
    st.sampled_from(["payments", "payments-*", "*", "?", "[a]", "", "acme", "{jwt.claims.tenant}"]),
    st.sampled_from(["10m", "0s", "-1s", "inf", "2000/s", "1/h", "0/s", "²/s", "1e400/s"]),
    st.sampled_from(["{", "}", "{jwt.claims.}", "{peer.uid}", "spiffe://x/*", "/usr/bin/*"]),
    st.text(max_size=20),
)
scalars = st.one_of(
    words,
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.datetimes(min_value=datetime.datetime(1970, 1, 1)),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.lists(words, max_size=3))
rule_keys = st.one_of(
    st.sampled_from(
        ["name", "description", "keys", "operations", "max_ttl", "rate", "effect", "name "]
    ),
    st.builds(lambda k: f"when.{k}", st.sampled_from([*WHEN_KEYS, "jwt_claims.tenant", "x"])),
    st.builds(lambda k: f"context.{k}", st.sampled_from(["tenant", "app", "", "a.b"])),
)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    escaped = "".join(
        c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in value
    )
    return f'"{escaped}"'


def quoted_key(key: str) -> str:
    return ".".join(
        p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else toml_value(p) for p in key.split(".")
    )


#: Values of the type each real key takes, often enough that rules load and get decided.
typed = {
    "when.unix_uid": st.lists(st.integers(-5, 70000), max_size=3),
    "when.unix_gid": st.lists(st.integers(-5, 70000), max_size=3),
    "when.unix_exe": st.sampled_from(["/usr/bin/*", "**", "", "/a/[b]"]),
    "when.jwt_sub": words,
    "when.jwt_claims.tenant": st.one_of(words, st.lists(words, max_size=2)),
    "when.spiffe_id": st.sampled_from(["spiffe://example.org/*", "spiffe://", "*"]),
    "context.tenant": words,
    "max_ttl": st.one_of(st.sampled_from(["10m", "1s", "0s", "1e3s"]), scalars),
    "rate": st.one_of(st.sampled_from(["2000/s", "1/h", "0/s", "1.5/m"]), scalars),
}


@st.composite
def documents(draw: st.DrawFn) -> str:
    lines = []
    for index in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["allow"] * 6 + ["deny"] * 3 + ["other"]))
        lines.append(f"[[{kind}]]")
        fields: dict[str, Any] = {}
        if draw(st.integers(0, 9)) < 8:  # mostly a valid skeleton, so the rest gets checked
            fields["name"] = f"rule-{index}"
            fields["when.unix_uid"] = [draw(st.integers(0, 2000))]
            fields["keys"] = draw(st.lists(words, min_size=1, max_size=2))
            fields["operations"] = draw(
                st.lists(
                    st.sampled_from([*sorted(OPERATIONS), "*", "bogus"]), min_size=1, max_size=3
                )
            )
        for key in draw(st.lists(st.sampled_from(sorted(typed)), max_size=3, unique=True)):
            fields[key] = draw(typed[key])
        if draw(st.integers(0, 3)) == 0:
            fields.update(draw(st.dictionaries(rule_keys, values, max_size=2)))
        lines += [f"{quoted_key(key)} = {toml_value(value)}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


identities = st.builds(
    Identity,
    peer=st.one_of(
        st.none(),
        st.builds(
            PeerCredentials,
            st.integers(0, 70000),
            st.integers(0, 70000),
            st.integers(0, 9),
            st.one_of(st.none(), st.text(max_size=10)),
        ),
    ),
    jwt=st.one_of(
        st.none(),
        st.builds(
            JwtClaims,
            st.text(max_size=10),
            st.text(max_size=10),
            st.dictionaries(
                st.sampled_from(["tenant", "a.b"]),
                st.one_of(st.text(max_size=5), st.integers()),
                max_size=2,
            ),
        ),
    ),
)


def check(text: str) -> PolicySet | None:
    try:
        rules = parse_policy_text(text, path=PATH)
    except ConfigError as exc:
        match = _LOCATED.match(str(exc))
        assert match, str(exc)
        assert 1 <= int(match.group(1)) <= text.count("\n") + 1, str(exc)
        return None
    return PolicySet(rules)


@given(documents(), identities, st.sampled_from(sorted(OPERATIONS)), st.data())
def test_any_policy_document_loads_or_names_its_line(
    text: str, identity: Identity, operation: str, data: st.DataObject
) -> None:
    policies = check(text)
    if policies is None:
        return
    context = data.draw(
        st.one_of(
            st.none(), st.dictionaries(st.sampled_from(["tenant", "app"]), st.text(max_size=5))
        )
    )
    ttl = data.draw(st.one_of(st.none(), st.floats(min_value=0.001, max_value=1e9)))
    key = (
        None
        if operation == "status"
        else data.draw(st.sampled_from(["payments", "payments-x", "other"]))
    )
    decision = policies.decide(identity, key=key, operation=operation, context=context, ttl=ttl)
    assert isinstance(decision.allowed, bool)


@given(st.text(max_size=300))
def test_any_text_loads_or_names_its_line(text: str) -> None:
    check(text)
