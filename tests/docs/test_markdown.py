"""The docs harness itself: what it extracts from a page and how it compares outputs."""

from __future__ import annotations

from pathlib import Path

from tests.docs.markdown import commands, output_mismatch

PAGE = """\
Not run:

```sh
rm -rf /
```

<!-- doctest -->
```sh
# a comment
export A=1
curl -s --unix-socket $SOCK \\
     http://localhost/v1/sys/health
cat > f.toml <<'END'
# not a comment line
END
```

<!-- doctest: exit=1 subset -->
```console
$ kms-sidecar policy check --key k \\
    --op datakey
Denied: …
$ echo '{"a": 1}'
{"a": 1}
```
"""


def test_only_marked_blocks_are_extracted(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    found = commands(page)
    assert [c.text for c in found] == [
        "export A=1",
        "curl -s --unix-socket $SOCK \\\n     http://localhost/v1/sys/health",
        "cat > f.toml <<'END'\n# not a comment line\nEND",
        "kms-sidecar policy check --key k \\\n    --op datakey",
        "echo '{\"a\": 1}'",
    ]
    assert [c.line for c in found] == [10, 11, 13, 20, 23]
    assert [c.exit for c in found] == [0, 0, 0, 1, 1]
    assert found[0].output is None and found[3].output == "Denied: …"
    assert found[4].output == '{"a": 1}' and found[4].subset


def test_a_pipe_at_the_end_of_a_line_continues_the_command(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- doctest -->\n```sh\necho '{}' |\n  jq .\ntrue &&\n  true\n```\n")
    assert [c.text for c in commands(page)] == ["echo '{}' |\n  jq .", "true &&\n  true"]


def test_json_is_compared_by_fields_and_values() -> None:
    shown = '{"data": {"ciphertext": "sidecar:v1:…", "key_version": 1, "x": "…"}}'
    assert (
        output_mismatch(
            shown, '{"data": {"ciphertext": "sidecar:v1:AQ", "key_version": 1, "x": [1]}}'
        )
        is None
    )
    assert "key_version" in (
        output_mismatch(shown, '{"data": {"ciphertext": "sidecar:v1:A", "key_version": 2, "x": 1}}')
        or ""
    )
    extra = '{"data": {"ciphertext": "sidecar:v1:A", "key_version": 1, "x": 1, "new": 0}}'
    assert "does not show ['new']" in (output_mismatch(shown, extra) or "")
    assert output_mismatch(shown, extra, subset=True) is None
    assert "has no ['x']" in (
        output_mismatch(shown, '{"data": {"ciphertext": "sidecar:v1:", "key_version": 1}}') or ""
    )
    assert output_mismatch('["a", "…"]', '["a", "b", "c"]') is None
    assert output_mismatch('["a"]', '["a", "b"]') is not None


def test_text_is_compared_line_by_line_with_ellipses() -> None:
    shown = "OK: … records\n…\n  last hash …"
    assert output_mismatch(shown, "OK: 3 records\n  last hash ab12\n") is None
    assert output_mismatch(shown, "OK: 3 records\nmore\nlines\n  last hash ab12") is None
    assert output_mismatch(shown, "BROKEN: 3 records\n  last hash ab12") is not None
    assert output_mismatch("a …", "a b\nc") is not None, "an inline … stays on its line"
