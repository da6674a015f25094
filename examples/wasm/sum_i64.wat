;; sum_i64: a WASI command that sums the little-endian int64 values on stdin and writes the sum (8 bytes, LE)
;; to stdout. The example module of docs/faas.md (calling convention: bytes in on stdin, bytes out on stdout).
;;
;; Build (no toolchain download: wasmtime ships a WAT compiler):
;;   python -c "import wasmtime,sys; sys.stdout.buffer.write(wasmtime.wat2wasm(open('examples/wasm/sum_i64.wat').read()))" > examples/wasm/sum_i64.wasm
;; Register it with raw_inputs=["data"] so the one int64 column arrives as raw values, not Arrow IPC.
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 17)
  (func (export "_start")
    (local $n i32) (local $i i32) (local $acc i64)
    (block $done
      (loop $more
        (i32.store (i32.const 0) (i32.const 65536))
        (i32.store (i32.const 4) (i32.const 1048576))
        (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
        (local.set $n (i32.load (i32.const 16)))
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $i (i32.const 0))
        (block $end
          (loop $sum
            (br_if $end (i32.ge_u (local.get $i) (local.get $n)))
            (local.set $acc (i64.add (local.get $acc) (i64.load (i32.add (i32.const 65536) (local.get $i)))))
            (local.set $i (i32.add (local.get $i) (i32.const 8)))
            (br $sum)))
        (br $more)))
    (i64.store (i32.const 32) (local.get $acc))
    (i32.store (i32.const 0) (i32.const 32))
    (i32.store (i32.const 4) (i32.const 8))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 20))))
)
