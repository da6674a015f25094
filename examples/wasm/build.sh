#!/bin/sh
# Rebuild the example modules from their sources (run from anywhere; writes next to this script).
#   sum_i64.wasm     from sum_i64.wat with wasmtime's WAT compiler (the Python package; nothing else needed)
#   sum_i64_rs.wasm  from sum_i64.rs with Debian's rustc and its wasm32-wasi standard library:
#                    apt-get install rustc libstd-rust-dev-wasm32 wasi-libc lld
#   sum_i64_c.wasm   from sum_i64.c with Debian's clang and wasi-libc (the pieces wasi-sdk bundles):
#                    apt-get install clang-14 lld libclang-rt-14-dev-wasm32 wasi-libc
# The builds are reproducible: the same toolchain gives the same bytes (tests/faas/test_wasm.py rebuilds and
# compares where the toolchains are installed). The prebuilt files were made with Debian 12's rustc 1.63.0 and
# clang 14. A toolchain that is missing is skipped, and the script says so.
set -eu
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -c "import sys, wasmtime; sys.stdout.buffer.write(wasmtime.wat2wasm(open('sum_i64.wat').read()))" > sum_i64.wasm
RUSTC=${RUSTC:-/usr/bin/rustc}
if [ -x "$RUSTC" ]; then
    "$RUSTC" --edition 2021 -O -C strip=symbols -C lto -C panic=abort -C codegen-units=1 \
        --target wasm32-wasi sum_i64.rs -o sum_i64_rs.wasm
else
    echo "skipped sum_i64_rs.wasm: no $RUSTC" >&2
fi
CLANG=${CLANG:-clang-14}
if command -v "$CLANG" > /dev/null; then
    "$CLANG" --target=wasm32-wasi -O2 -Wl,--strip-all -o sum_i64_c.wasm sum_i64.c
else
    echo "skipped sum_i64_c.wasm: no $CLANG" >&2
fi
sha256sum sum_i64*.wasm
