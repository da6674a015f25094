#!/usr/bin/env bash
# Set up (from a bare Python) and start JupyterLab on the tutorials, with the embedded enclave kernel.
#   bash scripts/lab.sh            JupyterLab on notebooks/ (open 01-quickstart.ipynb)
#   bash scripts/lab.sh --demo     headless: connect, attest, run a cell, verify its receipt
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
if [ "${1:-}" = "--demo" ]; then
  exec python examples/demo.py
fi
extra=()
if [ "$(id -u)" = "0" ]; then extra+=(--allow-root); fi  # Jupyter refuses root without it
exec jupyter lab --notebook-dir=notebooks --no-browser "${extra[@]}" "$@"
