"""Test WebAssembly modules, written as WAT text and compiled with ``wasmtime.wat2wasm`` (no downloads)."""

from __future__ import annotations

import wasmtime

# A WASI command: reads stdin (up to 64 KiB), writes it back upper-cased ASCII... kept simple: echoes stdin.
ECHO = r"""
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    (local $n i32)
    (block $done
      (loop $more
        ;; iovec at 0: buf=1024, len=60000; nread at 16
        (i32.store (i32.const 0) (i32.const 1024))
        (i32.store (i32.const 4) (i32.const 60000))
        (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
        (local.set $n (i32.load (i32.const 16)))
        (br_if $done (i32.eqz (local.get $n)))
        (i32.store (i32.const 4) (local.get $n))
        (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 20)))
        (br $more))))
)
"""

# Sums the little-endian int64 values on stdin and prints the sum as 8 bytes.
SUM_I64 = r"""
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
"""

LOOP = r"""
(module
  (func (export "_start") (loop $l (br $l))))
"""

# Grows its memory by 1 page (64 KiB) at a time until memory.grow fails, then traps if it got past 64 MiB.
GROW = r"""
(module
  (memory 1)
  (func (export "_start")
    (block $fail
      (loop $l
        (br_if $fail (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
        (br_if $l (i32.lt_u (memory.size) (i32.const 16384)))))
    (if (i32.gt_u (memory.size) (i32.const 1024)) (then unreachable)))
)
"""

# Tries to open /etc/passwd by climbing out of the /in preopen: WASI must refuse (exit status = the errno).
OPEN_HOST = r"""
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "../../../../etc/passwd")
  (func (export "_start")
    ;; fd 3 is the first preopen (/in); dirflags=0, path at 100 (22 bytes), oflags=0, rights fd_read, fdflags=0
    ;; exits with the errno path_open returns (0 only if the host file opened)
    (call $exit (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 22) (i32.const 0)
                     (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 200))))
)
"""

BAD_IMPORT = r"""
(module
  (import "env" "host_secret" (func $s (result i32)))
  (func (export "_start") (drop (call $s))))
"""


def wasm(wat: str) -> bytes:
    """Compile WAT text to module bytes."""
    return bytes(wasmtime.wat2wasm(wat))


BIG_TABLE = r"""(module (table 200000 funcref) (func (export "_start")))"""
BIG_MEMORY = r"""(module (memory 2000) (func (export "_start")))"""
