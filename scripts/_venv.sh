# Sourced by the scripts: create .venv from a bare Python and install the project with all extras.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[all]"
# The notebooks run on a kernelspec that points at this venv's Python.
python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (mesatee_notebook)" >/dev/null
