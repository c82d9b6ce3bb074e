"""Reference pages that must list everything the code has: commands, options, operations."""

from __future__ import annotations

import re
from pathlib import Path

from sidecar.policy.vocabulary import OPERATIONS, WHEN_KEYS
from tests.docs.cli_reference import reference

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = re.search(r"^##+ ", text[start + len(heading) :], re.MULTILINE)
    return text[start : start + len(heading) + (following.start() if following else len(text))]


def test_commands_page_shows_every_commands_help() -> None:
    page = (DOCS / "commands.md").read_text()
    for command, (summary, rows) in reference().items():
        heading = f"### `{command}`"
        assert heading in page, f"docs/commands.md has no section {heading}"
        section = _section(page, heading)
        assert summary[0].upper() + summary[1:] in section, (command, summary)
        shown = [line for line in section.splitlines() if line.startswith("| `")]
        assert shown[: len(rows)] == rows, (
            f"{command}: the table differs from --help; regenerate it with "
            "`python -m tests.docs.cli_reference`"
        )


def test_policies_page_names_every_operation_and_condition() -> None:
    page = (DOCS / "policies.md").read_text()
    table = _section(page, "## Operations")
    for operation in OPERATIONS:
        assert f"| `{operation}` |" in table, f"docs/policies.md: operation {operation!r}"
    for key in WHEN_KEYS:
        assert f"`when.{key}" in page, f"docs/policies.md: when.{key}"


_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_pages_cite_only_files_the_project_has() -> None:
    root = DOCS.parent
    for page in [root / "README.md", *DOCS.glob("*.md"), root / "bench" / "README.md"]:
        text = page.read_text()
        assert "DESIGN" not in text, f"{page.name} cites a design document the project lacks"
        for target in _LINK.findall(text):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.exists(), f"{page.relative_to(root)} links to missing {target}"
