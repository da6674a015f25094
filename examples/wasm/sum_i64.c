/* sum_i64 in C: a WASI command that sums the little-endian int64 values on stdin and writes the sum (8 bytes, LE)
 * to stdout, the calling convention of docs/faas.md. The prebuilt examples/wasm/sum_i64_c.wasm is this file.
 * Built with Debian's clang and wasi-libc (see examples/wasm/build.sh). wasm32 is little-endian, so the bytes of an
 * int64_t are its little-endian encoding. */
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

int main(void) {
    static unsigned char buf[1 << 16];
    int64_t sum = 0;
    size_t have = 0;
    for (;;) {
        ssize_t n = read(0, buf + have, sizeof buf - have);
        if (n < 0) return 1;
        if (n == 0) break;
        have += (size_t)n;
        size_t whole = have - have % 8;
        for (size_t i = 0; i < whole; i += 8) {
            int64_t v;
            __builtin_memcpy(&v, buf + i, 8);
            sum = (int64_t)((uint64_t)sum + (uint64_t)v);
        }
        __builtin_memmove(buf, buf + whole, have - whole);
        have -= whole;
    }
    return write(1, &sum, 8) == 8 ? 0 : 1;
}
