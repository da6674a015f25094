# Sourced by the scripts: create .venv from a bare Python and install the project with all extras.
# A later launch skips what is installed. Two keys in .venv say what was done: a hash of the Debian package list
# (written once none is missing) and a hash of pyproject.toml and the Python version (written after pip installed
# it). Each step runs again when its key changes, when .venv is new, or when the package no longer resolves to
# this checkout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
# Debian packages the kernel's sandbox (and the TPM level) need, Chromium for the browser test (Playwright drives
# /usr/bin/chromium; it never downloads a browser) and iproute2 for `cluster up --netns`. As root they are installed
# here; otherwise the missing ones are named, and the kernel refuses to serve cells until they are there.
DEB_PKGS=(bubblewrap python3-seccomp util-linux passwd swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config chromium iproute2)
APT_KEY="$(printf '%s\n' "${DEB_PKGS[@]}" | sha256sum | cut -d' ' -f1)"
PIP_KEY="$({ cat pyproject.toml; "$PY" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"

_mesatee_apt() {
  local missing=() p
  for p in "${DEB_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
      echo "== apt-get install ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "WARNING: missing Debian packages: ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
      return 1  # not recorded: the next launch checks again
    fi
  fi
}

_mesatee_installed_here() {  # the venv's mesatee_notebook is this checkout's (editable), without importing it
  .venv/bin/python -c 'import importlib.util as u, os, sys
s = u.find_spec("mesatee_notebook")
sys.exit(0 if s and s.origin and os.path.realpath(s.origin).startswith(os.path.realpath(sys.argv[1]) + os.sep) else 1)' \
    "$PWD" 2>/dev/null
}

if [ "$(cat .venv/.mesatee-apt-key 2>/dev/null)" != "$APT_KEY" ]; then
  apt_ok=0
  _mesatee_apt || apt_ok=1
else
  apt_ok=2  # checked already for this package list
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if [ "$(cat .venv/.mesatee-pip-key 2>/dev/null)" != "$PIP_KEY" ] || ! _mesatee_installed_here; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e ".[all]"
  # xgboost: the full wheel (federated communicator for cluster GBDT) without its NCCL dependency (GPU only; xgboost
  # dlopens it). Never next to xgboost-cpu, which ships the same module: an older set-up's is removed first.
  XGB_PIN="$(python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["tool"]["mesatee"]["xgboost"])')"
  if python -m pip show -q xgboost-cpu >/dev/null 2>&1; then
    python -m pip uninstall --quiet -y xgboost-cpu xgboost
  fi
  python -m pip install --quiet --no-deps "$XGB_PIN"
  python -c 'import sys, xgboost; sys.exit(0 if xgboost.build_info().get("USE_FEDERATED") else "xgboost has no federated communicator")'
  # The notebooks run on a kernelspec that points at this venv's Python. Its display name is the one the tutorials
  # are stored with, so JupyterLab has nothing to rename when it saves them.
  python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ipykernel)" >/dev/null
  # Executors import the package inside a read-only sandbox, where Python cannot cache bytecode: compile it here
  # once, so a fresh executor does not recompile every module it imports (bytecode is not in the measurement).
  python -m compileall -q mesatee_notebook >/dev/null || true
  echo "$PIP_KEY" >.venv/.mesatee-pip-key
fi
# git stores the tutorials stripped (.gitattributes): a run or an autosave in JupyterLab leaves them unmodified
if command -v git >/dev/null && git rev-parse --is-inside-work-tree >/dev/null 2>&1 \
  && [ "$(git config --get filter.mesatee-notebook.clean || true)" != "python3 scripts/strip_notebook.py" ]; then
  git config filter.mesatee-notebook.clean "python3 scripts/strip_notebook.py"
fi
if [ "$apt_ok" = 0 ]; then
  echo "$APT_KEY" >.venv/.mesatee-apt-key
fi
