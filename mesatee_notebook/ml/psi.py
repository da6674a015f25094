"""Vectorised private set intersection (PSI) engine, run inside the enclave.

Every party's items are canonicalised, mapped to 128-bit keys with a keyed function, and intersected with one
``np.sort`` of packed (prefix, party, row) words plus linear numpy passes.
The key secret never leaves the enclave, so keys reveal nothing outside it. See ``docs/psi.md``.

Canonicalisation (the same value always gives the same key; different types never match):

- ``int`` (Python ints in [-2**127, 2**127), numpy signed/unsigned integers): the two's-complement 128-bit value,
  so ``np.uint8(7)``, ``np.int64(7)`` and ``7`` match. ``bool`` and floats are refused (cast them first).
- ``str``: Unicode NFC-normalised, then UTF-8. No case folding, no whitespace trimming, no NFKC: "é" written
  precomposed or decomposed matches, "Alice" and "alice" do not.
- ``bytes`` (also ``bytearray``/``memoryview``, numpy ``S``, Arrow binary): the bytes as given.
- Nulls (``None``, NaN, masked values) are refused: drop them first.

Type tagging is by key separation: ints, strings and bytes are keyed under three different AES keys, so ``1``,
``"1"`` and ``b"1"`` never match.

Keyed hashing (128 bits):

- ints: ``AES-256(k_int, int128 little-endian)``: a keyed permutation, so no two ints ever collide.
- str/bytes: CBC-MAC with AES-256 over ``len u64 LE || data``, zero-padded to 16-byte blocks. Prefixing the length
  makes the message set prefix-free, which makes CBC-MAC a PRF. It runs column-wise over whole Arrow buffers: one
  AES-ECB call per block position for the whole batch.

Both are pseudo-random under a secret key. Across 2**25 items the chance of any 128-bit collision is below 2**-78.
Even so, the intersection matches on a prefix of the high half, checks all 128 bits of every matched row, and
resolves any mismatch exactly.

Why this module is over ~500 lines: the PSI engine: item canonicalisation, keyed hashing and the exact intersection,
kept together so that the exactness argument reads in one place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mesatee_notebook.errors import EncodingError, PolicyViolation

__all__ = ["PsiInput", "PsiKey", "PsiMode", "PsiResult", "hash_items", "psi", "run_psi"]

PsiMode = Literal["intersection", "cardinality", "join"]
U64 = npt.NDArray[np.uint64]
_MODES: Final = frozenset(get_args(PsiMode))
_BATCH: Final = 1 << 16
_MASK64: Final = (1 << 64) - 1
_INT128_MIN: Final = -(1 << 127)
_INT128_MAX: Final = (1 << 127) - 1
_INT64_MAX: Final = (1 << 63) - 1
_BYTE_MASKS: Final = np.array([(1 << (8 * i)) - 1 for i in range(9)], dtype=np.uint64)
_KIND_INT: Final = b"int"
_KIND_STR: Final = b"str"
_KIND_BYTES: Final = b"bytes"


class PsiKey:
    """The enclave-held secret behind the keyed hash: one AES-256 key per item type."""

    __slots__ = ("_keys",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            msg = f"a PSI key secret must be at least 32 bytes, got {len(secret)}"
            raise ValueError(msg)
        self._keys = {
            kind: HKDF(
                algorithm=hashes.SHA256(), length=32, salt=b"mesatee-notebook/psi", info=b"psi v1 key\x00" + kind
            ).derive(bytes(secret))
            for kind in (_KIND_INT, _KIND_STR, _KIND_BYTES)
        }

    @classmethod
    def generate(cls) -> PsiKey:
        """Return a fresh random key (use one per PSI job)."""
        return cls(os.urandom(32))

    def __repr__(self) -> str:
        return "PsiKey(<secret>)"

    def _ecb(self, kind: bytes) -> CipherContext:
        # ECB is used as the raw AES block permutation (a PRP/PRF building block), never to encrypt data.
        return Cipher(algorithms.AES(self._keys[kind]), modes.ECB()).encryptor()  # noqa: S305


# -- canonicalisation ------------------------------------------------------------------------------------------


@dataclass
class _Part:
    """Items of one type: ``index`` maps them back to positions in the chunk (``None``: all of them, in order)."""

    kind: bytes
    index: npt.NDArray[np.intp] | None
    lo: U64 | None = None  # ints: low and high 64-bit words of the int128 value
    hi: U64 | None = None  # None: the sign extension of lo read as int64 (no n-word array)
    binary: pa.Array | None = None  # str (NFC, as large_binary) or bytes


@dataclass
class _Canonical:
    n: int
    parts: list[_Part]
    display: np.ndarray[Any, Any] | pa.Array  # canonical items, as returned in results


def _refuse(what: str, way_out: str) -> EncodingError:
    return EncodingError(f"PSI items must be int, str or bytes; got {what}. {way_out}")


def _ints_from_numpy(arr: np.ndarray[Any, Any]) -> tuple[U64, U64 | None, np.ndarray[Any, Any]]:
    """(low word, high word, display) of each int as int128; high None: the sign of the low word (read as int64).

    The high words of int64 items are made block by block while hashing, not as an n-word array up front: in a
    fresh service worker every new page of a 10^7-item upload costs a fault.
    """
    if arr.dtype == np.uint64:
        lo = np.ascontiguousarray(arr, dtype=np.uint64)
        fits = len(lo) == 0 or int(lo.max()) <= _INT64_MAX
        return lo, None if fits else np.zeros(len(lo), dtype=np.uint64), lo.view(np.int64) if fits else lo
    a64 = np.ascontiguousarray(arr, dtype=np.int64)
    return a64.view(np.uint64), None, a64


def _ints_from_python(values: Sequence[int]) -> tuple[U64, U64 | None, np.ndarray[Any, Any]]:
    try:
        return _ints_from_numpy(np.array(values, dtype=np.int64))
    except OverflowError:
        pass
    lo = np.empty(len(values), dtype=np.uint64)
    hi = np.empty(len(values), dtype=np.uint64)
    for i, v in enumerate(values):
        if not _INT128_MIN <= v <= _INT128_MAX:
            msg = f"int item {v} is outside the 128-bit range PSI supports; convert it to str or bytes"
            raise EncodingError(msg)
        lo[i] = v & _MASK64
        hi[i] = (v >> 64) & _MASK64
    return lo, hi, np.array(values, dtype=object)


def _strings(arr: pa.Array) -> pa.Array:
    """NFC-normalise a string array and return its UTF-8 bytes as ``large_binary``."""
    normalised = pc.utf8_normalize(arr.cast(pa.large_string()), form="NFC")
    return normalised.cast(pa.large_binary())


def _from_arrow(arr: pa.Array) -> _Canonical:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if arr.null_count:
        what = f"{arr.null_count} null value(s)"
        raise _refuse(what, "Drop nulls before the PSI (e.g. series.dropna()).")
    t = arr.type
    if pa.types.is_integer(t):
        lo, hi, display = _ints_from_numpy(arr.to_numpy(zero_copy_only=False))
        return _Canonical(len(arr), [_Part(_KIND_INT, None, lo=lo, hi=hi)], display)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        binary = _strings(arr)
        return _Canonical(len(arr), [_Part(_KIND_STR, None, binary=binary)], binary.cast(pa.large_string()))
    if (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_fixed_size_binary(t)
    ):
        binary = arr.cast(pa.large_binary())
        return _Canonical(len(arr), [_Part(_KIND_BYTES, None, binary=binary)], binary)
    if pa.types.is_null(t) and len(arr) == 0:
        return _Canonical(0, [], np.empty(0, dtype=np.int64))
    what = f"an Arrow array of type {t}"
    raise _refuse(what, "Cast it to an integer, string or binary type.")


def _from_objects(values: Sequence[Any] | np.ndarray[Any, Any]) -> _Canonical:
    if len(values) == 0:
        return _Canonical(0, [], np.empty(0, dtype=np.int64))
    fast = _homogeneous(values)
    if fast is not None:
        return fast
    groups: dict[bytes, tuple[list[int], list[Any]]] = {_KIND_INT: ([], []), _KIND_STR: ([], []), _KIND_BYTES: ([], [])}
    for i, item in enumerate(values):
        kind, v = _classify_item(i, item)
        groups[kind][0].append(i)
        groups[kind][1].append(v)
    present = {kind: g for kind, g in groups.items() if g[0]}
    if len(present) == 1:
        ((kind, (_, vals)),) = present.items()
        if kind == _KIND_INT:
            lo, hi, display = _ints_from_python(vals)
            return _Canonical(len(values), [_Part(kind, None, lo=lo, hi=hi)], display)
        return _from_arrow(pa.array(vals, type=pa.large_string() if kind == _KIND_STR else pa.large_binary()))
    return _mixed(len(values), present)


def _homogeneous(values: Sequence[Any] | np.ndarray[Any, Any]) -> _Canonical | None:
    """The fast paths for all-int, all-str and all-bytes lists; None when the items are mixed (or need checks)."""
    kinds = set(map(type, values))  # C-speed scan; pa.array alone would quietly mix str into binary
    if kinds == {int}:
        with contextlib.suppress(OverflowError):
            lo, hi, display = _ints_from_numpy(np.array(values, dtype=np.int64))
            return _Canonical(len(values), [_Part(_KIND_INT, None, lo=lo, hi=hi)], display)
    elif kinds == {str}:
        with contextlib.suppress(pa.ArrowException, UnicodeEncodeError):
            return _from_arrow(pa.array(values, type=pa.large_string()))
    elif kinds == {bytes}:
        return _from_arrow(pa.array(values, type=pa.large_binary()))
    return None


def _classify_item(i: int, v: Any) -> tuple[bytes, Any]:
    """(kind, canonical value) of item ``i``, or a typed refusal naming its position."""
    if isinstance(v, str):
        try:
            v.encode()
        except UnicodeEncodeError:
            msg = f"str item at position {i} is not valid Unicode (lone surrogate); encode it to bytes first"
            raise EncodingError(msg) from None
        return _KIND_STR, v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return _KIND_BYTES, bytes(v)
    if isinstance(v, (bool, np.bool_)):
        what = f"a bool at position {i}"
        raise _refuse(what, "Use ints 0/1 or strings if you mean them as items.")
    if isinstance(v, (int, np.integer)):
        return _KIND_INT, int(v)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        what = f"a null at position {i}"
        raise _refuse(what, "Drop nulls before the PSI.")
    what = f"{type(v).__name__} at position {i}"
    raise _refuse(what, "Convert floats/dates/objects to int, str or bytes explicitly.")


def _mixed(n: int, present: dict[bytes, tuple[list[int], list[Any]]]) -> _Canonical:
    """Items of several kinds: one part per kind, each with the positions it came from."""
    parts: list[_Part] = []
    mixed = np.empty(n, dtype=object)
    for kind, (idx, vals) in present.items():
        index = np.asarray(idx, dtype=np.intp)
        if kind == _KIND_INT:
            lo, hi, _ = _ints_from_python(vals)
            parts.append(_Part(kind, index, lo=lo, hi=hi))
            mixed[index] = vals
        elif kind == _KIND_STR:
            binary = _strings(pa.array(vals, type=pa.large_string()))
            parts.append(_Part(kind, index, binary=binary))
            mixed[index] = binary.cast(pa.large_string()).to_pylist()
        else:
            parts.append(_Part(kind, index, binary=pa.array(vals, type=pa.large_binary())))
            mixed[index] = vals
    return _Canonical(n, parts, mixed)


def _canonicalise(items: Any) -> _Canonical:
    """Map one chunk of items (list, numpy, pandas, Arrow) to typed canonical parts."""
    if isinstance(items, (str, bytes, bytearray, memoryview)):
        what = f"a single {type(items).__name__}"
        raise _refuse(what, "Pass a list (or array) of items, e.g. [value].")
    if isinstance(items, (pa.Array, pa.ChunkedArray)):
        return _from_arrow(items)
    if isinstance(items, (pd.Series, pd.Index)):
        return _from_pandas(items)
    if isinstance(items, np.ndarray):
        return _from_numpy(items)
    if isinstance(items, Iterable) and not isinstance(items, Mapping):
        return _from_objects(list(items))
    what = f"{type(items).__name__}"
    raise _refuse(what, "Pass a list, numpy array, pandas Series or Arrow array.")


def _from_pandas(items: pd.Series[Any] | pd.Index[Any]) -> _Canonical:
    dtype = items.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in "iu":
        return _from_numpy(items.to_numpy())
    if isinstance(dtype, np.dtype) and dtype.kind == "O":
        return _from_objects(items.to_numpy(dtype=object))
    if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_float_dtype(dtype):
        what = f"a Series of dtype {dtype}"
        raise _refuse(what, "Cast it to int or str first.")
    return _from_arrow(pa.array(items))


def _from_numpy(items: np.ndarray[Any, Any]) -> _Canonical:
    if items.ndim != 1:
        what = f"a {items.ndim}-d array"
        raise _refuse(what, "Pass a 1-d array (one item per element).")
    kind = items.dtype.kind
    if kind in "iu":
        lo, hi, display = _ints_from_numpy(items)
        return _Canonical(len(items), [_Part(_KIND_INT, None, lo=lo, hi=hi)], display)
    if kind in "US":
        return _from_arrow(pa.array(items))
    if kind == "O":
        return _from_objects(items)
    what = f"a numpy array of dtype {items.dtype}"
    raise _refuse(what, "Cast it to int or str first.")


# -- keyed hashing ---------------------------------------------------------------------------------------------


def _aes_blocks(enc: CipherContext, blocks: U64, out: U64) -> None:
    """Encrypt ``blocks`` (m x 2 uint64) into ``out`` (at least m + 1 rows: the API wants a block of slack)."""
    enc.update_into(blocks.data.cast("B"), out.data.cast("B"))


def _hash_ints(key: PsiKey, lo: U64, hi: U64 | None) -> U64:
    """AES of each int128 (``hi`` None: the sign extension of ``lo`` as int64)."""
    n = len(lo)
    out = np.empty((n + 1, 2), dtype="<u8")
    enc = key._ecb(_KIND_INT)
    block = np.empty((min(n, _BATCH), 2), dtype="<u8")
    signs = block[:, 1].view(np.int64)
    for b0 in range(0, n, _BATCH):
        m = min(_BATCH, n - b0)
        block[:m, 0] = lo[b0 : b0 + m]
        if hi is None:
            np.right_shift(lo[b0 : b0 + m].view(np.int64), 63, out=signs[:m])
        else:
            block[:m, 1] = hi[b0 : b0 + m]
        _aes_blocks(enc, block[:m], out[b0:])
    return out[:n]


def _hash_binary(key: PsiKey, kind: bytes, arr: pa.Array) -> U64:
    """Length-prefixed AES-CBC-MAC of every element of a ``large_binary`` array, vectorised per block position."""
    n = len(arr)
    out = np.empty((n + 1, 2), dtype="<u8")
    if n == 0:
        return out[:0]
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype="<i8")[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.empty(0, dtype=np.uint8)
    end = int(offsets[-1])
    padded = np.zeros(end + 16, dtype=np.uint8)
    padded[:end] = data[:end]
    # Unaligned 8-byte little-endian words starting at every byte offset (a view, no copy).
    words = np.ndarray(shape=(end + 8,), dtype="<u8", buffer=padded, strides=(1,))
    enc = key._ecb(kind)
    state = np.empty((min(n, _BATCH), 2), dtype="<u8")
    tmp = np.empty((min(n, _BATCH) + 1, 2), dtype="<u8")
    for b0 in range(0, n, _BATCH):
        starts = offsets[b0 : b0 + _BATCH + 1]
        lens = np.diff(starts)
        starts = starts[:-1]
        m = len(lens)
        st = state[:m]
        # Block 0: the length (makes the message set prefix-free) and the first 8 bytes.
        st[:, 0] = lens.view(np.uint64)
        st[:, 1] = words[starts] & _BYTE_MASKS[np.minimum(lens, 8)]
        _aes_blocks(enc, st, tmp)
        st[:] = tmp[:m]
        rem = lens - 8  # bytes left per element
        pos = starts + 8
        active: npt.NDArray[np.intp] | None = None  # None: every element of the batch is still going
        while True:
            live = rem > 0
            if not live.any():
                break
            if not live.all():
                sel = np.flatnonzero(live)
                active = sel if active is None else active[sel]
                rem, pos = rem[sel], pos[sel]
            cur = st if active is None else st[active]
            cur[:, 0] ^= words[pos] & _BYTE_MASKS[np.clip(rem, 0, 8)]
            cur[:, 1] ^= words[pos + 8] & _BYTE_MASKS[np.clip(rem - 8, 0, 8)]
            _aes_blocks(enc, cur, tmp)
            if active is None:
                st[:] = tmp[:m]
            else:
                st[active] = tmp[: len(active)]
            rem = rem - 16
            pos = pos + 16
        out[b0 : b0 + m] = st
    return out[:n]


def hash_items(items: Any, key: PsiKey) -> tuple[U64, U64]:
    """Canonicalise and hash one chunk; return the (high, low) 64-bit halves of each item's 128-bit key."""
    keys = _hash_canonical(_canonicalise(items), key)
    return np.ascontiguousarray(keys[:, 0]), np.ascontiguousarray(keys[:, 1])


def _hash_canonical(canon: _Canonical, key: PsiKey) -> U64:
    if len(canon.parts) == 1 and canon.parts[0].index is None and canon.parts[0].kind == _KIND_INT:
        part = canon.parts[0]
        assert part.lo is not None
        return _hash_ints(key, part.lo, part.hi)  # the common case: no copy
    keys = np.empty((canon.n, 2), dtype="<u8")
    for part in canon.parts:
        if part.kind == _KIND_INT:
            assert part.lo is not None
            h = _hash_ints(key, part.lo, part.hi)
        else:
            assert part.binary is not None
            h = _hash_binary(key, part.kind, part.binary)
        if part.index is None:
            keys[:] = h
        else:
            keys[part.index] = h
    return keys


# -- inputs ------------------------------------------------------------------------------------------------------


class PsiInput:
    """One party's set, fed in chunks (streamed uploads); each chunk is canonicalised and hashed on arrival.

    For ``join`` mode every chunk carries ``values``: a DataFrame (or mapping of columns) row-aligned with the items.
    """

    def __init__(self, label: str, key: PsiKey, *, max_items: int | None = None) -> None:
        if not label or not isinstance(label, str):
            msg = "a PSI input needs a non-empty label (the party's input name)"
            raise ValueError(msg)
        self.label = label
        self.key = key
        self.max_items = max_items
        self._keys: list[U64] = []  # per chunk, n x 2: (high, low) 64-bit halves of each 128-bit key
        self._display: list[np.ndarray[Any, Any] | pa.Array] = []
        self._values: list[pd.DataFrame] = []
        self._columns: list[str] | None = None
        self._has_items = False  # a chunk without values was added
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"PsiInput({self.label!r}, items={self._n})"

    def add_chunk(self, items: Any, values: pd.DataFrame | Mapping[str, Any] | None = None) -> int:
        """Add a chunk of items (and, for joins, its value columns); return the total item count so far."""
        canon = _canonicalise(items)
        if self.max_items is not None and self._n + canon.n > self.max_items:
            msg = f"PSI input {self.label!r} would exceed its limit of {self.max_items} items"
            raise PolicyViolation(msg, label=self.label)
        frame = self._check_values(canon.n, values)
        self._keys.append(_hash_canonical(canon, self.key))
        self._display.append(canon.display)
        if frame is not None:
            self._values.append(frame)
        self._n += canon.n
        return self._n

    def _check_values(self, n: int, values: pd.DataFrame | Mapping[str, Any] | None) -> pd.DataFrame | None:
        """Check a chunk's value columns: the first chunk decides whether there are any, later ones must agree."""
        if values is None:
            if self._columns is not None:
                msg = f"PSI input {self.label!r}: every chunk must carry the value columns {self._columns}"
                raise EncodingError(msg)
            self._has_items = True
            return None
        frame = values.reset_index(drop=True) if isinstance(values, pd.DataFrame) else pd.DataFrame(dict(values))
        if len(frame) != n:
            msg = f"PSI input {self.label!r}: {len(frame)} value rows for {n} items"
            raise EncodingError(msg)
        columns = [str(c) for c in frame.columns]
        if self._columns is None:
            if self._has_items:
                msg = f"PSI input {self.label!r}: earlier chunks carried no value columns"
                raise EncodingError(msg)
            self._columns = columns
        elif columns != self._columns:
            msg = f"PSI input {self.label!r}: chunk has columns {columns}, expected {self._columns}"
            raise EncodingError(msg)
        frame.columns = pd.Index(columns)
        return frame

    @property
    def value_columns(self) -> list[str]:
        """Names of the join value columns (empty if the input carries none)."""
        return list(self._columns or [])

    def keys(self) -> tuple[U64, U64]:
        """All 128-bit keys so far, as (high, low) 64-bit arrays."""
        if not self._keys:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64)
        if len(self._keys) > 1:
            self._keys = [np.concatenate(self._keys)]
        keys = self._keys[0]
        return keys[:, 0], keys[:, 1]  # views: no copy

    def items_at(self, index: npt.NDArray[np.intp]) -> pd.Series:
        """Canonical items at the given positions, as a Series."""
        chunks = self._display
        arrays = [c for c in chunks if isinstance(c, np.ndarray)]
        tables = [c for c in chunks if isinstance(c, pa.Array)]
        if not chunks:
            return pd.Series([], dtype=object)
        if len(arrays) == len(chunks) and len({c.dtype for c in arrays}) == 1:
            return pd.Series(np.concatenate(arrays)[index])
        if len(tables) == len(chunks) and len({c.type for c in tables}) == 1:
            taken = pa.chunked_array(tables).take(pa.array(index, type=pa.int64()))
            series: pd.Series = taken.to_pandas()
            return series
        objs = np.concatenate(
            [c.to_numpy(zero_copy_only=False) if isinstance(c, pa.Array) else c.astype(object) for c in chunks]
        )
        return pd.Series(objs[index], dtype=object)

    def values_frame(self) -> pd.DataFrame:
        """All value rows (join mode), row-aligned with the items."""
        if not self._values:
            return pd.DataFrame(index=pd.RangeIndex(self._n))
        if len(self._values) > 1:
            self._values = [pd.concat(self._values, ignore_index=True)]
        return self._values[0]


# -- intersection ------------------------------------------------------------------------------------------------


@dataclass
class _Match:
    """``count`` distinct common keys; with rows: per party a row mask and each matched row's group id."""

    count: int
    masks: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    groups: list[npt.NDArray[np.intp]] = field(default_factory=list)
    first_rows: npt.NDArray[np.intp] = field(default_factory=lambda: np.empty(0, dtype=np.intp))


_SCAN_BLOCK: Final = 1 << 18  # sorted words per block of the scan: whole prefix runs, temporaries reused
_PACK_BLOCK: Final = 1 << 18  # rows per block when packing the words


def _intersect_keys(keys: Sequence[tuple[U64, U64]], *, rows: bool = True, block: int = _SCAN_BLOCK) -> _Match:
    """Intersect n >= 2 sets of 128-bit keys given as (high, low) halves, exactly.

    Every row of every party becomes one packed 64-bit word: the top bits of its high half (the prefix), then the
    party number, then the row number (as many bits as the largest input needs). One ``np.sort`` of all the words
    puts equal prefixes next to each other, party 0 first, rows ascending. A prefix run is common when every party
    is in it. The full 128-bit key of every row in a common run is then compared with the run's first row (party
    0's first occurrence); a run where they differ (two different keys sharing a prefix, a few hundred runs at
    2^24 items per party) is resolved exactly on the full keys. No hash table, no ``argsort``: bench/p6_psi.py
    measured it 2-3x faster than the ``pandas.factorize`` pass it replaced (whose table did not fit in cache).

    After the sort, everything runs block by block (``block`` words, cut at run boundaries so that no run is
    split): a fresh service worker faults in every new page it touches, and whole-array temporaries made its
    first job 2x slower than the next. Per block the temporaries are a few MB, reused by the allocator.
    """
    k = len(keys)
    sizes = [len(h1) for h1, _ in keys]
    row_bits = max(1, (max(sizes) - 1).bit_length())
    low_bits = row_bits + max(1, (k - 1).bit_length())
    low_mask = np.uint64((1 << low_bits) - 1)
    words = _packed_words(keys, row_bits, np.uint64(_MASK64 ^ ((1 << low_bits) - 1)))
    words.sort()
    scan = _Scan(keys, row_bits, low_bits, rows=rows)
    for lo, hi in _run_blocks(words, low_mask, max(1, block)):
        scan.block(words[lo:hi])
    del words
    return scan.finish()


def _packed_words(keys: Sequence[tuple[U64, U64]], row_bits: int, prefix_mask: np.uint64) -> U64:
    """One (prefix, party, row) word per row of every party, unsorted (row numbers made block by block)."""
    words = np.empty(sum(len(h1) for h1, _ in keys), dtype=np.uint64)
    step = max(1, min(_PACK_BLOCK, max(len(h1) for h1, _ in keys)))
    numbers = np.arange(step, dtype=np.uint64)
    tmp = np.empty(step, dtype=np.uint64)
    pos = 0
    for i, (h1, _) in enumerate(keys):
        for b0 in range(0, len(h1), step):
            b1 = min(len(h1), b0 + step)
            part = words[pos + b0 : pos + b1]
            np.bitwise_and(h1[b0:b1], prefix_mask, out=part)
            t = tmp[: b1 - b0]
            np.add(numbers[: b1 - b0], np.uint64(b0 | (i << row_bits)), out=t)  # b0 + j < 2^row_bits: an OR
            part |= t
        pos += len(h1)
    return words


def _run_blocks(words: U64, low_mask: np.uint64, block: int) -> Iterator[tuple[int, int]]:
    """Consecutive ``[lo, hi)`` ranges of about ``block`` sorted words, each made of whole prefix runs."""
    total = len(words)
    prefix_mask = np.invert(low_mask)
    lo = 0
    while lo < total:
        hi = lo + block
        if hi >= total:
            hi = total
        else:
            cut = int(np.searchsorted(words, words[hi] & prefix_mask, side="left"))  # where words[hi]'s run starts
            # A run longer than the block (many duplicates) is taken whole.
            hi = cut if cut > lo else int(np.searchsorted(words, words[hi] | low_mask, side="right"))
        yield lo, hi
        lo = hi


class _Scan:
    """The pass after the sort, over blocks of whole prefix runs: candidates, the 128-bit check, matched rows.

    Group ids are global: common prefixes are numbered in sorted order across blocks (``m`` so far), and the
    rows of conflicted prefixes are kept aside and resolved exactly at the end (ids from ``m`` on).
    """

    def __init__(self, keys: Sequence[tuple[U64, U64]], row_bits: int, low_bits: int, *, rows: bool) -> None:
        self.keys = keys
        self.k = len(keys)
        self.row_bits = np.uint64(row_bits)
        self.row_mask = np.uint64((1 << row_bits) - 1)
        self.low_mask = np.uint64((1 << low_bits) - 1)
        self.party_mask = (1 << (low_bits - row_bits)) - 1
        self.count_type = np.uint8 if self.k < 256 else np.intp
        # complex128 is only a 16-byte container: numpy gathers 16-byte scalars fast, n x 2 rows slowly.
        pairs = [_pairs(h1, h2) for h1, h2 in keys]
        self.flat = [None if p is None else p.view(np.complex128)[:, 0] for p in pairs]
        self.m = 0  # common prefixes so far
        self.conflicted = 0  # of which conflicted (two different keys under one prefix)
        self.aside: list[tuple[U64, U64, npt.NDArray[np.intp], npt.NDArray[np.intp]]] = []
        self.ids = [np.full(len(h1), -1, dtype=np.intp) for h1, _ in keys] if rows else None
        self.first_rows: list[npt.NDArray[np.intp]] = []

    def block(self, w: U64) -> None:
        """Scan one block of sorted words that starts and ends at run boundaries."""
        cand, m = self._candidates(w)
        if m == 0:
            return
        new_group = np.empty(len(cand), dtype=bool)
        new_group[0] = True
        np.greater(cand[1:] ^ cand[:-1], self.low_mask, out=new_group[1:])
        local = np.cumsum(new_group, dtype=np.intp)
        local -= 1
        # Party and row numbers fit in 63 bits, so the uint64 results are reinterpreted as intp, not converted.
        party = (cand >> self.row_bits).view(np.intp)
        party &= self.party_mask
        cand &= self.row_mask
        row = cand.view(np.intp)
        full_c = self._full_keys(party, row)
        full = full_c.view(np.uint64).reshape(-1, 2)
        heads = np.flatnonzero(new_group)  # party 0's first occurrence of each common prefix
        ref = full_c[heads][local].view(np.uint64).reshape(-1, 2)  # gathered as 16-byte scalars, not n x 2 rows
        bad = full[:, 0] != ref[:, 0]
        bad |= full[:, 1] != ref[:, 1]
        del ref
        conflicted = np.zeros(m, dtype=bool)
        conflicted[local[bad]] = True
        n_conflicted = int(np.count_nonzero(conflicted))
        ok: npt.NDArray[np.bool_] | None = None
        if n_conflicted:
            bad_rows = conflicted[local]
            self.aside.append((full[bad_rows, 0], full[bad_rows, 1], party[bad_rows], row[bad_rows]))
            self.conflicted += n_conflicted
            ok = ~bad_rows
            heads = heads[~conflicted]
        if self.ids is not None:
            local += self.m
            for i, ids in enumerate(self.ids):
                s = party == i
                if ok is not None:
                    s &= ok
                ids[row[s]] = local[s]
            self.first_rows.append(row[heads])
        self.m += m

    def _candidates(self, w: U64) -> tuple[U64, int]:
        """The words of ``w`` under a prefix every party has (a new array), and how many such prefixes."""
        n = len(w)
        run_start = np.empty(n, dtype=bool)
        party_start = np.empty(n, dtype=bool)
        run_start[0] = party_start[0] = True
        d = w[1:] ^ w[:-1]
        np.greater(d, self.low_mask, out=run_start[1:])
        np.greater(d, self.row_mask, out=party_start[1:])
        del d
        starts = np.flatnonzero(run_start)
        first = np.flatnonzero(np.add.reduceat(party_start, starts, dtype=self.count_type) == self.k)
        m = len(first)
        if m == 0:
            return w[:0], 0
        # Mark the rows of the common runs: +1 at each such run's start, -1 at its end, then a running sum.
        mark = np.zeros(n + 1, dtype=np.int8)
        mark[starts[first]] = 1
        mark[np.append(starts, n)[first + 1]] -= 1
        inside = np.cumsum(mark[:n], dtype=np.int8).view(bool)
        return w[inside], m

    def _full_keys(self, party: npt.NDArray[np.intp], row: npt.NDArray[np.intp]) -> npt.NDArray[np.complex128]:
        """Each candidate row's full key as one 16-byte element (compared as uint64 halves by the caller)."""
        full_c = np.empty(len(row), dtype=np.complex128)
        full = full_c.view(np.uint64).reshape(-1, 2)
        for i, (h1, h2) in enumerate(self.keys):
            s = np.flatnonzero(party == i)
            r = row[s]
            flat = self.flat[i]
            if flat is not None:
                full_c[s] = flat[r]  # one random access per row, not two
            else:
                full[s, 0] = h1[r]
                full[s, 1] = h2[r]
        return full_c

    def finish(self) -> _Match:
        """Resolve the conflicted prefixes exactly; the count, and with rows each party's mask and group ids."""
        count = self.m - self.conflicted
        fixed: _Resolved | None = None
        if self.aside:
            f1, f2, party, row = (np.concatenate(c) for c in zip(*self.aside, strict=True))
            fixed = _resolve_conflicts(f1, f2, party, row, self.k, base=self.m)
            count += fixed.common
        if self.ids is None:
            return _Match(count)
        if fixed is not None:
            for i, ids in enumerate(self.ids):
                s = party == i
                ids[row[s]] = fixed.ids[s]
            self.first_rows.append(fixed.first_rows)
        first_rows = np.sort(np.concatenate(self.first_rows)) if self.first_rows else np.empty(0, dtype=np.intp)
        match = _Match(count, first_rows=first_rows)
        for ids in self.ids:
            mask = ids >= 0
            match.masks.append(mask)
            match.groups.append(ids[mask])
        return match


def _pairs(h1: U64, h2: U64) -> U64 | None:
    """The n x 2 array whose columns are ``h1`` and ``h2``, when they are its views (as from PsiInput.keys)."""
    base = h1.base
    if (
        isinstance(base, np.ndarray)
        and h2.base is base
        and base.dtype == np.uint64
        and base.ndim == 2
        and base.shape[1] == 2
        and base.shape[0] >= len(h1)
        and base.flags.c_contiguous
        and h1.__array_interface__["data"][0] == base.__array_interface__["data"][0]
        and h2.__array_interface__["data"][0] == base.__array_interface__["data"][0] + 8
    ):
        return base
    return None


@dataclass
class _Resolved:
    common: int  # distinct full keys present in every party, among the rows resolved
    ids: npt.NDArray[np.intp]  # the rows' new group ids (-1: not common), in the order given
    first_rows: npt.NDArray[np.intp]  # party 0's first row of each new common group


def _resolve_conflicts(
    f1: U64, f2: U64, party: npt.NDArray[np.intp], row: npt.NDArray[np.intp], k: int, *, base: int
) -> _Resolved:
    """Exact path for prefixes shared by different keys: group these rows by their full 128-bit key."""
    order = np.lexsort((row, party, f2, f1))  # by key, then party, then row
    f1, f2, party, row = f1[order], f2[order], party[order], row[order]
    key_start = np.empty(len(order), dtype=bool)
    key_start[:1] = True
    key_start[1:] = (f1[1:] != f1[:-1]) | (f2[1:] != f2[:-1])
    party_start = key_start.copy()
    party_start[1:] |= party[1:] != party[:-1]
    run = np.cumsum(key_start, dtype=np.intp) - 1
    parties_in_run = np.bincount(run[party_start], minlength=int(run[-1]) + 1 if len(run) else 0)
    is_common = parties_in_run == k
    new_id = np.full(len(is_common), -1, dtype=np.intp)
    n_common = int(np.count_nonzero(is_common))
    new_id[is_common] = base + np.arange(n_common, dtype=np.intp)
    ids_sorted = new_id[run]
    ids = np.empty(len(order), dtype=np.intp)
    ids[order] = ids_sorted
    # A common key's run starts with party 0's smallest row (sorted by party, then row, within the key).
    return _Resolved(n_common, ids, row[key_start & (ids_sorted >= 0)])


# -- results -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PsiResult:
    """Outcome of a PSI: what the enclave may release to the receivers, per the job's policy.

    - ``cardinality``: the number of distinct items in every input (all modes).
    - ``items``: the distinct common items in canonical form, in order of first appearance in the first input
      (``intersection`` mode).
    - ``masks``: per input label, which of that input's rows are in the intersection (``intersection``, ``join``).
    - ``frame``: the joined rows (``join`` mode): column ``item`` plus ``"<label>.<column>"`` per input's values.
    """

    mode: PsiMode
    cardinality: int
    items: pd.Series | None = None
    masks: Mapping[str, npt.NDArray[np.bool_]] = field(default_factory=dict)
    frame: pd.DataFrame | None = None


def run_psi(inputs: Sequence[PsiInput], mode: PsiMode = "intersection") -> PsiResult:
    """Intersect n >= 2 inputs in one of three modes (see :class:`PsiResult`)."""
    if mode not in _MODES:
        msg = f"unknown PSI mode {mode!r}; expected one of {sorted(_MODES)}"
        raise ValueError(msg)
    if len(inputs) < 2:
        msg = f"a PSI needs at least two parties' inputs, got {len(inputs)}"
        raise PolicyViolation(msg)
    labels = [i.label for i in inputs]
    if len(set(labels)) != len(labels):
        msg = f"PSI input labels must be distinct, got {labels}"
        raise ValueError(msg)
    if any(i.key is not inputs[0].key for i in inputs):
        msg = "all PSI inputs must be hashed under the same PsiKey"
        raise ValueError(msg)
    match = _intersect_keys([i.keys() for i in inputs], rows=mode != "cardinality")
    if mode == "cardinality":
        return PsiResult(mode, match.count)
    masks = dict(zip(labels, match.masks, strict=True))
    if mode == "intersection":
        items = inputs[0].items_at(match.first_rows).rename("item")
        return PsiResult(mode, match.count, items=items, masks=masks)
    return PsiResult(mode, match.count, masks=masks, frame=_join(inputs, match))


def _join(inputs: Sequence[PsiInput], match: _Match) -> pd.DataFrame:
    joined: pd.DataFrame | None = None
    for k, inp in enumerate(inputs):
        rows = np.flatnonzero(match.masks[k])
        part = inp.values_frame().iloc[rows].reset_index(drop=True)
        part.columns = pd.Index([f"{inp.label}.{c}" for c in part.columns])
        part.insert(0, "__group", match.groups[k])
        if k == 0:
            part.insert(1, "item", inp.items_at(rows).to_numpy())
            joined = part
        else:
            assert joined is not None
            joined = joined.merge(part, on="__group", how="inner", sort=False)
    assert joined is not None
    return joined.drop(columns="__group").reset_index(drop=True)


def psi(
    sets: Mapping[str, Any],
    mode: PsiMode = "intersection",
    *,
    values: Mapping[str, pd.DataFrame | Mapping[str, Any]] | None = None,
    key: PsiKey | None = None,
) -> PsiResult:
    """One-shot PSI over whole sets: ``psi({"alice": a, "bob": b}, "cardinality")``."""
    key = key or PsiKey.generate()
    inputs = []
    for label, items in sets.items():
        inp = PsiInput(label, key)
        inp.add_chunk(items, None if values is None else values.get(label))
        inputs.append(inp)
    return run_psi(inputs, mode)
