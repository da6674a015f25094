#!/usr/bin/env bash
# Set up (from a bare Python) and run every check: ruff, mypy --strict, the whole pytest suite.
# pytest runs on two pytest-xdist workers, each test module (tests/cluster and tests/tpm: each directory) on one
# worker, tests marked `serial` alone (tests/conftest.py). Serially, for debugging: bash scripts/test.sh -n 0
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
echo "== ruff"; ruff check mesatee_notebook tests bench
echo "== ruff format"; ruff format --check mesatee_notebook tests bench
echo "== mypy (strict on the package)"; mypy
echo "== pytest"; python -m pytest -n 2 --dist loadgroup "$@"
