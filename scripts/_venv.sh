# Sourced by the scripts: create .venv from a bare Python and install the project with all extras.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
# Debian packages the kernel's sandbox (and the TPM level) need, and Chromium for the browser test (Playwright drives
# /usr/bin/chromium; it never downloads a browser). As root they are installed here;
# otherwise the missing ones are named, and the kernel refuses to serve cells until they are there.
DEB_PKGS=(bubblewrap python3-seccomp util-linux passwd swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config chromium)
missing=()
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
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[all]"
# The notebooks run on a kernelspec that points at this venv's Python.
python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (mesatee_notebook)" >/dev/null
