#!/bin/sh
# Rebuild the example modules from their sources (run from the repository root).
#   sum_i64.wasm     from sum_i64.wat with wasmtime's WAT compiler (the Python package; nothing else needed)
#   sum_i64_rs.wasm  from sum_i64.rs with Debian's rustc and its wasm32-wasi standard library:
#                    apt-get install rustc libstd-rust-dev-wasm32 wasi-libc lld
# The Rust build is reproducible: the same rustc gives the same bytes (tests/faas/test_wasm.py checks it where
# /usr/bin/rustc has the wasm32-wasi target). The prebuilt file was made with Debian's rustc 1.63.0.
set -eu
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -c "import sys, wasmtime; sys.stdout.buffer.write(wasmtime.wat2wasm(open('sum_i64.wat').read()))" > sum_i64.wasm
RUSTC=${RUSTC:-/usr/bin/rustc}
"$RUSTC" --edition 2021 -O -C strip=symbols -C lto -C panic=abort -C codegen-units=1 \
    --target wasm32-wasi sum_i64.rs -o sum_i64_rs.wasm
sha256sum sum_i64.wasm sum_i64_rs.wasm
