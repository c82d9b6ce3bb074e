"""The blob parser under hypothesis and atheris: the committed corpus, generated inputs, and a
few seconds of coverage-guided fuzzing (the long campaign is in the README's Development section).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.errors import DecryptionFailed
from sidecar.keys import envelope
from tests.fuzz.envelope_target import FUZZ_KEK, blob_text, fuzz_one

CORPUS = Path(__file__).parent / "corpus" / "envelope"
SEEDS = sorted(CORPUS.iterdir())


@pytest.mark.parametrize("seed", SEEDS, ids=lambda p: p.name)
def test_every_corpus_seed_runs_clean(seed: Path) -> None:
    fuzz_one(seed.read_bytes())


def test_the_corpus_holds_blobs_that_open() -> None:
    """Seeds that parse and open give the fuzzer the deep paths, not only early refusals."""
    opened = 0
    for seed in SEEDS:
        try:
            sealed = envelope.parse(blob_text(seed.read_bytes()))
        except DecryptionFailed:
            continue
        for context in (b"{}", b'{"tenant":"acme"}', b'{"app":"billing","tenant":"acme"}'):
            try:
                envelope.KekCipher(FUZZ_KEK).open(sealed, context=context, associated_data=b"")
            except DecryptionFailed:
                continue
            opened += 1
    assert opened >= 4


@given(st.binary(max_size=400))
def test_any_bytes_parse_or_fail_uniformly(data: bytes) -> None:
    fuzz_one(data)


@given(st.sampled_from(SEEDS), st.data())
def test_any_mutated_seed_parses_or_fails_uniformly(seed: Path, data: st.DataObject) -> None:
    raw = bytearray(seed.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["set", "cut", "insert"]))
        at = data.draw(st.integers(1, max(1, len(raw) - 1)))
        if how == "set" and at < len(raw):
            raw[at] = data.draw(st.integers(0, 255))
        elif how == "cut":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    fuzz_one(bytes(raw))


@given(
    st.text(min_size=1, max_size=60).filter(lambda n: 0 < len(n.encode("utf-8", "replace")) < 256),
    st.integers(1, envelope.MAX_ROOT_VERSION),
    st.binary(min_size=1, max_size=300),
    st.one_of(st.none(), st.integers(0, (1 << 64) - 1)),
)
def test_any_header_round_trips(
    name: str, version: int, wrapped: bytes, expires: int | None
) -> None:
    if not _utf8(name):  # a lone surrogate: config refuses such key names
        return
    header = envelope.Header(name, version, envelope.kek_id_for(name, wrapped), wrapped, expires)
    blob = envelope.KekCipher(FUZZ_KEK).seal_encoded(
        header.encode(), version, b"dek", context=b"{}", associated_data=b"", nonce=bytes(12)
    )
    sealed = envelope.parse(blob)
    assert sealed.header == header
    assert envelope.KekCipher(FUZZ_KEK).open(sealed, context=b"{}", associated_data=b"") == b"dek"


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_atheris_finds_nothing_in_a_few_seconds(tmp_path: Path) -> None:
    """libFuzzer over the real parser, briefly; new inputs go to a scratch directory."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.fuzz_envelope",
            str(tmp_path),
            str(CORPUS),
            "-max_total_time=4",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent.parent)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr
