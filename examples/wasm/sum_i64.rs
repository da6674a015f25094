// sum_i64 in Rust: a WASI command that sums the little-endian int64 values on stdin and writes the sum (8 bytes,
// LE) to stdout, the calling convention of docs/faas.md. The prebuilt examples/wasm/sum_i64_rs.wasm is this file.
//
// Built with Debian's packaged toolchain (no rustup, no download):
//   apt-get install rustc libstd-rust-dev-wasm32 wasi-libc lld
//   sh examples/wasm/build.sh
// (rustc 1.63 names the target wasm32-wasi; newer toolchains call the same target wasm32-wasip1:
//   rustup target add wasm32-wasip1 && rustc --edition 2021 -O --target wasm32-wasip1 sum_i64.rs)
// Register it with raw_inputs=["data"] so the one int64 column arrives as raw values, not Arrow IPC.
use std::io::{Read, Write};

fn main() {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).expect("stdin");
    let sum: i64 = input
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .fold(0i64, |a, b| a.wrapping_add(b));
    std::io::stdout().write_all(&sum.to_le_bytes()).expect("stdout");
}
