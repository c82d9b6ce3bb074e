"""Coverage-guided fuzzing of the blob parser with atheris (libFuzzer).

    .venv/bin/python -m tests.fuzz.fuzz_envelope "$(mktemp -d)" tests/fuzz/corpus/envelope \
        -max_total_time=600

New inputs go to the first directory (a scratch one), so the committed seeds stay as they are.

Any libFuzzer flag works (``-runs=N``, ``-jobs=2``). Crashing inputs are written to the current
directory as ``crash-*``; a new input worth keeping can be added to the corpus.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["sidecar"]):
    from tests.fuzz.envelope_target import fuzz_one


def main() -> None:
    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
