"""Loading policy files: the shipped examples load, and every bad file is refused with its file,
line and a reason an operator can act on."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.errors import ConfigError
from sidecar.identity import Identity, PeerCredentials
from sidecar.policy import load_policies

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"
EXAMPLES = ["dev.toml", "kubernetes.toml", "spiffe.toml"]

GOOD = """\
[[allow]]
name = "app"
when.unix_uid = [1000]
keys = ["payments"]
operations = ["datakey"]
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_shipped_example_loads(tmp_path: Path, name: str) -> None:
    write(tmp_path, name, (REPO_POLICIES / name).read_text(encoding="utf-8"))
    policy = load_policies(tmp_path)
    assert len(policy) > 0
    assert all(rule.source.startswith(str(tmp_path / name) + ":") for rule in policy.rules)


def test_the_shipped_examples_load_together() -> None:
    policy = load_policies(REPO_POLICIES)
    assert [Path(f).name for f in policy.files] == sorted(EXAMPLES)
    caller = Identity(peer=PeerCredentials(uid=1000, gid=1000, pid=1))
    assert policy.decide(caller, key="anything", operation="datakey").rule == "dev-user"


def test_an_empty_directory_is_an_empty_set_that_denies(tmp_path: Path) -> None:
    write(tmp_path, "README.md", "not a policy")
    policy = load_policies(tmp_path)
    assert len(policy) == 0
    caller = Identity(peer=PeerCredentials(uid=1000, gid=1000, pid=1))
    assert not policy.decide(caller, key="payments", operation="datakey").allowed


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policies\.dir: .* is not a directory"):
        load_policies(tmp_path / "absent")


def test_files_load_in_name_order_and_rules_in_file_order(tmp_path: Path) -> None:
    write(tmp_path, "b.toml", GOOD.replace('"app"', '"b-first"') + "\n" + GOOD.replace(
        '"app"', '"b-second"'))  # fmt: skip
    write(tmp_path, "a.toml", GOOD.replace('"app"', '"a-only"'))
    policy = load_policies(tmp_path)
    assert [r.name for r in policy.rules] == ["a-only", "b-first", "b-second"]
    caller = Identity(peer=PeerCredentials(uid=1000, gid=1000, pid=1))
    assert policy.decide(caller, key="payments", operation="datakey").rule == "a-only"
    assert policy.rules[2].source == f"{tmp_path / 'b.toml'}:8"


# fmt: off
BAD = [
    (
        "toml syntax",
        '[[allow]]\nname = "x"\nkeys = ["a"] ["b"]\noperations = ["datakey"]\n',
        3,
        "not valid TOML",
    ),
    (
        "unknown operation",
        '[[allow]]\nname = "x"\nwhen = {}\nkeys = ["a"]\noperations = ["datakey", "decryp"]\n',
        5,
        "rule 'x': unknown operation 'decryp'",
    ),
    (
        "unknown when key",
        '[[allow]]\nname = "x"\nwhen.unix_uid = [1]\nwhen.uid = [1]\nkeys = ["a"]\n'
        'operations = ["datakey"]\n',
        4,
        "unknown condition 'when.uid'",
    ),
    (
        "unknown rule key",
        '[[allow]]\nname = "x"\nwhen = {}\nkeys = ["a"]\noperation = ["datakey"]\n',
        5,
        "unknown key 'operation'",
    ),
    (
        "missing name points at the rule header",
        '# comment\n\n[[allow]]\nwhen = {}\nkeys = ["a"]\noperations = ["datakey"]\n',
        3,
        "needs a non-empty 'name'",
    ),
    (
        "allow without when",
        '[[allow]]\nname = "x"\nkeys = ["a"]\noperations = ["datakey"]\n',
        2,
        "write 'when = {}' to allow every caller",
    ),
    (
        "second rule's error line",
        GOOD + '\n[[deny]]\nname = "d"\nkeys = ["*"]\noperations = ["*"]\nrate = "1/s"\n',
        11,
        "'rate' only applies to allow rules",
    ),
    (
        "subtable form",
        '[[allow]]\nname = "x"\nkeys = ["a"]\noperations = ["datakey"]\n[allow.when]\n'
        'unix_uid = [1]\nunix_gid = ["wheel"]\n',
        7,
        "'when.unix_gid' must be an integer",
    ),
    (
        "key glob with a character class",
        '[[allow]]\nname = "x"\nwhen = {}\nkeys = ["pay[abc]"]\noperations = ["datakey"]\n',
        4,
        "may use only letters",
    ),
    (
        "bad rate",
        '[[allow]]\nname = "x"\nwhen = {}\nkeys = ["a"]\noperations = ["datakey"]\n'
        'rate = "fast"\n',
        6,
        "expected a rate like '2000/s'",
    ),
    (
        "bad max_ttl",
        '[[allow]]\nname = "x"\nwhen = {}\nkeys = ["a"]\noperations = ["datakey"]\n'
        'max_ttl = "soon"\n',
        6,
        "'max_ttl': expected a duration",
    ),
    (
        "max_ttl on a rule without datakey",
        '[[allow]]\nname = "x"\nwhen = {}\nkeys = ["a"]\noperations = ["decrypt"]\n'
        'max_ttl = "5m"\n',
        6,
        "bounds datakey and datakey-wrapped",
    ),
    (
        "unknown template placeholder",
        '[[allow]]\nname = "x"\nwhen = {}\nkeys = ["a"]\noperations = ["datakey"]\n'
        'context.tenant = "{jwt.claim.tenant}"\n',
        6,
        "unknown placeholder {jwt.claim.tenant}",
    ),
    (
        "unbalanced brace",
        '[[allow]]\nname = "x"\nwhen = {}\nkeys = ["a"]\noperations = ["datakey"]\n'
        'context.tenant = "{jwt.sub"\n',
        6,
        "unbalanced",
    ),
    (
        "nested claim path in a when",
        '[[allow]]\nname = "x"\nwhen.jwt_claims."kubernetes.io".namespace = 3\nkeys = ["a"]\n'
        'operations = ["datakey"]\n',
        3,
        "must be a string",
    ),
    (
        "relative exe glob",
        '[[allow]]\nname = "x"\nwhen.unix_exe = "bin/*"\nkeys = ["a"]\noperations = ["sign"]\n',
        3,
        "absolute paths",
    ),
    (
        "spiffe id without scheme",
        '[[allow]]\nname = "x"\nwhen.spiffe_id = "example.org/*"\nkeys = ["a"]\n'
        'operations = ["sign"]\n',
        3,
        "must start with 'spiffe://'",
    ),
    (
        "status needs every key",
        '[[allow]]\nname = "x"\nwhen = {}\nkeys = ["a"]\noperations = ["status"]\n',
        4,
        'needs keys = ["*"]',
    ),
    (
        "single brackets",
        '[allow]\nname = "x"\n',
        1,
        "write [[allow]] (two brackets)",
    ),
    (
        "unknown table",
        GOOD + '\n[[alow]]\nname = "y"\n',
        7,
        "unknown table 'alow'",
    ),
    (
        "duplicate name in one file",
        GOOD + "\n" + GOOD,
        8,
        "rule name 'app' is already used at",
    ),
]
# fmt: on


@pytest.mark.parametrize(("text", "line", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_file_names_file_line_and_reason(
    tmp_path: Path, text: str, line: int, reason: str
) -> None:
    write(tmp_path, "a-good.toml", GOOD.replace('"app"', '"other"'))
    path = write(tmp_path, "bad.toml", text)
    with pytest.raises(ConfigError) as raised:
        load_policies(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert reason in message


def test_a_duplicate_name_across_files_names_both(tmp_path: Path) -> None:
    first = write(tmp_path, "a.toml", GOOD)
    second = write(tmp_path, "b.toml", "# another team\n" + GOOD)
    with pytest.raises(ConfigError) as raised:
        load_policies(tmp_path)
    assert str(raised.value) == (
        f"{second}:3: rule name 'app' is already used at {first}:2; rule names must be unique"
    )


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[allow]]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=f"^{path}: cannot read the policy file"):
        load_policies(tmp_path)
