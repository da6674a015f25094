"""Run one fuzz target under atheris (coverage-guided, libFuzzer): ``python -m tests.fuzz.run TARGET [libFuzzer args]``.

The package's wire and enclave-facing decoders are instrumented for coverage. Seeds are written to a fresh corpus
directory first. A typed error from the one error tree is the expected outcome for bad input; any other exception
is reported by atheris as a crash (non-zero exit, the input saved under ``-artifact_prefix``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["mesatee_notebook"]):
    from tests.fuzz import targets


def main(argv: list[str]) -> None:
    """Set up atheris for ``argv[1]`` and fuzz until libFuzzer's limits (``-runs``, ``-max_total_time``) stop it."""
    if len(argv) < 2 or argv[1] not in targets.TARGETS:
        print(f"usage: python -m tests.fuzz.run {{{','.join(targets.TARGETS)}}} [libFuzzer args]", file=sys.stderr)
        raise SystemExit(2)
    name = argv[1]
    target = targets.TARGETS[name]
    corpus = Path(tempfile.mkdtemp(prefix=f"mesatee-fuzz-{name}-"))
    for i, seed in enumerate(targets.seeds(name)):
        (corpus / f"seed{i}").write_bytes(seed)
    atheris.Setup([argv[0], *argv[2:], str(corpus)], lambda data: targets.run_one(target, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
