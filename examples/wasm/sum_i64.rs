// The same function in Rust, for modules built with a real toolchain (wasm32-wasip1):
//   rustup target add wasm32-wasip1 && rustc -O --target wasm32-wasip1 sum_i64.rs -o sum_i64_rs.wasm
// (Not built here: this machine has no wasm32-wasip1 target installed; the shipped .wasm is built from the .wat.)
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
