"""PSI engine: results checked against Python sets, canonicalisation rules, modes, the exact hash."""

from __future__ import annotations

import unicodedata
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from mesatee_notebook.errors import EncodingError, PolicyViolation
from mesatee_notebook.ml import psi as psi_mod
from mesatee_notebook.ml.psi import PsiInput, PsiKey, hash_items, psi, run_psi

KEY = PsiKey(bytes(range(32)))


def canon(x: Any) -> tuple[str, Any]:
    """The reference canonical form: a type tag plus the value (NFC for text)."""
    if isinstance(x, str):
        return ("s", unicodedata.normalize("NFC", x))
    if isinstance(x, (bytes, bytearray)):
        return ("b", bytes(x))
    return ("i", int(x))


def expected(sets: list[list[Any]]) -> tuple[set[tuple[str, Any]], list[tuple[str, Any]]]:
    common = set.intersection(*[{canon(x) for x in s} for s in sets])
    order = list(dict.fromkeys(canon(x) for x in sets[0] if canon(x) in common))
    return common, order


items = st.one_of(
    st.integers(-(2**127), 2**127 - 1),
    st.integers(-5, 5),
    st.text(alphabet=st.sampled_from("ab1é\u0301eÅ\u212b✓"), max_size=30),
    st.binary(max_size=40),
)
party_sets = st.lists(st.lists(items, max_size=30), min_size=2, max_size=4)


def shared(sets: list[list[Any]], extra: list[Any]) -> list[list[Any]]:
    return [s + extra for s in sets]


@settings(max_examples=150, deadline=None)
@given(party_sets, st.lists(items, max_size=8))
def test_matches_python_sets(sets: list[list[Any]], common_items: list[Any]) -> None:
    sets = shared(sets, common_items)
    common, order = expected(sets)
    labels = [f"p{i}" for i in range(len(sets))]
    r = psi(dict(zip(labels, sets, strict=True)), "intersection", key=KEY)
    assert r.cardinality == len(common)
    assert r.items is not None
    assert [canon(x) for x in r.items] == order
    for label, s in zip(labels, sets, strict=True):
        assert r.masks[label].tolist() == [canon(x) in common for x in s]
    card = psi(dict(zip(labels, sets, strict=True)), "cardinality", key=KEY)
    assert card.cardinality == len(common)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), max_size=60), min_size=2, max_size=3), st.integers(1, 7))
def test_chunked_equals_whole_and_numpy_equals_list(sets: list[list[int]], chunk: int) -> None:
    whole = psi({f"p{i}": s for i, s in enumerate(sets)}, key=KEY)
    inputs = []
    for i, s in enumerate(sets):
        inp = PsiInput(f"p{i}", KEY)
        for j in range(0, len(s), chunk):
            inp.add_chunk(np.asarray(s[j : j + chunk], dtype=np.int32))
        inputs.append(inp)
    chunked = run_psi(inputs)
    assert chunked.cardinality == whole.cardinality == len(expected(sets)[0])
    assert whole.items is not None and chunked.items is not None
    assert [int(x) for x in chunked.items] == [int(x) for x in whole.items]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=25), min_size=2, max_size=4),
    st.integers(1, 9),
)
def test_64bit_collisions_resolved_exactly(sets: list[list[tuple[int, int]]], block: int) -> None:
    # Tiny key space: high halves collide all the time, so the exact 128-bit path is exercised; tiny scan blocks
    # (cut at run boundaries, runs longer than a block taken whole) give the same result as one block.
    keys = [(np.array([a for a, _ in s], dtype=np.uint64), np.array([b for _, b in s], dtype=np.uint64)) for s in sets]
    match = psi_mod._intersect_keys(keys, block=block)
    whole = psi_mod._intersect_keys(keys, block=1 << 30)
    common = set.intersection(*[set(s) for s in sets])
    assert match.count == psi_mod._intersect_keys(keys, rows=False, block=block).count == len(common)
    assert match.first_rows.tolist() == whole.first_rows.tolist()
    for got, want in zip(match.groups, whole.groups, strict=True):
        assert got.tolist() == want.tolist()  # the same group ids, numbered across blocks
    by_pair: dict[tuple[int, int], int] = {}
    for s, mask, groups in zip(sets, match.masks, match.groups, strict=True):
        assert mask.tolist() == [p in common for p in s]
        for pair, g in zip([p for p in s if p in common], groups.tolist(), strict=True):
            assert by_pair.setdefault(pair, g) == g  # one group id per distinct key, the same in every party
    assert len(set(by_pair.values())) == len(common)
    first0 = list(sets[0])
    want_first = [i for i, p in enumerate(first0) if p in common and first0.index(p) == i]
    assert match.first_rows.tolist() == want_first


@pytest.mark.parametrize("block", [1000, 1 << 18])
def test_many_blocks_match_numpy(block: int) -> None:
    # Over 2^18 rows per party: the words are packed in several blocks and scanned in several (or many) blocks.
    rng = np.random.default_rng(7)
    a = rng.integers(0, 1 << 20, 600_000, dtype=np.int64)  # duplicates within each party too
    b = rng.integers(0, 1 << 20, 500_000, dtype=np.int64)
    inputs = []
    for label, items in (("a", a), ("b", b)):
        inp = PsiInput(label, KEY)
        inp.add_chunk(items)
        inputs.append(inp)
    match = psi_mod._intersect_keys([i.keys() for i in inputs], block=block)
    common = np.intersect1d(a, b)
    assert match.count == len(common)
    assert np.array_equal(match.masks[0], np.isin(a, common))
    assert np.array_equal(match.masks[1], np.isin(b, common))
    _, first = np.unique(a, return_index=True)
    assert np.array_equal(match.first_rows, np.sort(first[np.isin(a[first], common)]))
    groups_a = dict(zip(a[match.masks[0]].tolist(), match.groups[0].tolist(), strict=True))
    assert dict(zip(b[match.masks[1]].tolist(), match.groups[1].tolist(), strict=True)) == {
        v: groups_a[v] for v in b[match.masks[1]].tolist()
    }


def test_type_tagging_and_int_widths() -> None:
    r = psi({"a": [1, "1", b"1", 7, 2**70], "b": ["1", np.uint8(7), 2**70, "x"]}, key=KEY)
    assert r.items is not None
    assert list(r.items) == ["1", 7, 2**70]
    assert psi({"a": np.array([7], dtype=np.uint64), "b": np.array([7], dtype=np.int8)}, key=KEY).cardinality == 1
    big = np.array([2**64 - 1, 5], dtype=np.uint64)
    assert psi({"a": big, "b": [2**64 - 1]}, key=KEY).cardinality == 1
    assert psi({"a": np.array([-1], dtype=np.int64), "b": np.array([2**64 - 1], dtype=np.uint64)}).cardinality == 0


def test_text_is_nfc_but_not_case_folded() -> None:
    r = psi({"a": ["caf\u00e9", "Alice", "\u212b"], "b": ["cafe\u0301", "alice", "\u00c5"]}, key=KEY)
    assert r.items is not None
    assert list(r.items) == ["caf\u00e9", "\u00c5"]  # returned in canonical (NFC) form


def test_input_kinds() -> None:
    ref = ["x", "y", "z"]
    kinds: list[Any] = [
        np.array(["y", "z", "w"]),
        pd.Series(["y", "z", "w"]),
        pd.Series(["y", "z", "w"], dtype=object),
        pd.Series(["y", "z", "w"], dtype="category"),
        pa.array(["y", "z", "w"]),
        pa.chunked_array([["y"], ["z", "w"]]),
        pa.array(["y", "z", "w"], type=pa.large_string()),
        ("y", "z", "w"),
        iter(["y", "z", "w"]),
    ]
    for other in kinds:
        r = psi({"a": ref, "b": other}, key=KEY)
        assert r.items is not None
        assert list(r.items) == ["y", "z"], type(other)
    assert psi({"a": [b"y"], "b": np.array([b"y"])}, key=KEY).cardinality == 1
    assert psi({"a": [b"y"], "b": pa.array([b"y"], type=pa.binary(1))}, key=KEY).cardinality == 1
    assert psi({"a": [1, 2], "b": pd.Series([2, 3], dtype="Int64")}, key=KEY).cardinality == 1
    assert psi({"a": [1, 2], "b": pa.array([2, 3], type=pa.uint16())}, key=KEY).cardinality == 1


def test_empty_duplicates_disjoint() -> None:
    assert psi({"a": [], "b": [1, 2]}, key=KEY).cardinality == 0
    assert psi({"a": [], "b": []}, "intersection", key=KEY).items is not None
    r = psi({"a": [3, 3, 1, 3], "b": [3, 3]}, key=KEY)
    assert r.cardinality == 1
    assert r.masks["a"].tolist() == [True, True, False, True]
    assert psi({"a": list(range(100)), "b": list(range(100, 200))}, key=KEY).cardinality == 0


@pytest.mark.parametrize(
    ("items", "match"),
    [
        ([1.5], "float"),
        ([True], "bool"),
        ([None], "null"),
        ([1, None], "null"),
        (np.array([1.0, 2.0]), "float64"),
        (np.zeros((2, 2), dtype=np.int64), "2-d"),
        (pd.Series([1, None], dtype="Int64"), "null"),
        (pd.Series([0.5]), "float"),
        ("abc", "single str"),
        ([2**130], "128-bit"),
        (["ok", "\udc80"], "surrogate"),
        ([object()], "object"),
    ],
)
def test_refused_items(items: Any, match: str) -> None:
    with pytest.raises(EncodingError, match=match):
        psi({"a": items, "b": [1]}, key=KEY)


def test_needs_two_parties_and_one_key() -> None:
    with pytest.raises(PolicyViolation, match="at least two"):
        psi({"a": [1]})
    a, b = PsiInput("a", KEY), PsiInput("b", PsiKey.generate())
    with pytest.raises(ValueError, match="same PsiKey"):
        run_psi([a, b])
    with pytest.raises(PolicyViolation, match="limit"):
        PsiInput("c", KEY, max_items=2).add_chunk([1, 2, 3])


def test_join_mode_matches_pandas_merge() -> None:
    a_items = [1, 2, 2, 3, 9]
    b_items = [2, 3, 3, 4]
    a_vals = pd.DataFrame({"x": [10, 20, 21, 30, 90]})
    b_vals = {"y": [200, 300, 301, 400]}
    r = psi({"a": a_items, "b": b_items}, "join", values={"a": a_vals, "b": b_vals}, key=KEY)
    assert r.frame is not None
    want = pd.DataFrame({"item": a_items, "a.x": a_vals["x"]}).merge(
        pd.DataFrame({"item": b_items, "b.y": b_vals["y"]}), on="item"
    )
    got = r.frame.sort_values(["item", "a.x", "b.y"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want.sort_values(["item", "a.x", "b.y"]).reset_index(drop=True))
    assert r.cardinality == 2


def test_join_chunk_columns_must_agree() -> None:
    inp = PsiInput("a", KEY)
    inp.add_chunk([1, 2], pd.DataFrame({"v": [1, 2]}))
    with pytest.raises(EncodingError, match="value columns"):
        inp.add_chunk([3])
    with pytest.raises(EncodingError, match="expected"):
        inp.add_chunk([3], {"w": [1]})
    with pytest.raises(EncodingError, match="value rows"):
        inp.add_chunk([3, 4], {"v": [1]})


def _reference_cbc_mac(key: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    state = enc.update(len(data).to_bytes(8, "little") + data[:8].ljust(8, b"\0"))
    rest = data[8:]
    for i in range(0, len(rest), 16):
        block = rest[i : i + 16].ljust(16, b"\0")
        state = enc.update(bytes(a ^ b for a, b in zip(state, block, strict=True)))
    return state


def test_vectorised_hash_equals_reference_construction() -> None:
    rng = np.random.default_rng(7)
    lengths = [0, 1, 7, 8, 9, 15, 16, 23, 24, 25, 40, 41, 100, 257]
    data = [rng.bytes(n) for n in lengths] + [rng.bytes(int(n)) for n in rng.integers(0, 60, 70_000)]
    h1, h2 = hash_items(data, KEY)
    bkey = KEY._keys[psi_mod._KIND_BYTES]
    for i in [*range(len(lengths)), 65_535, 65_536, 65_537, len(data) - 1]:
        ref = _reference_cbc_mac(bkey, data[i])
        assert h1[i].astype("<u8").tobytes() + h2[i].astype("<u8").tobytes() == ref, i
    ikey = KEY._keys[psi_mod._KIND_INT]
    g1, g2 = hash_items([-1, 5, 2**100], KEY)
    for i, v in enumerate([-1, 5, 2**100]):
        enc = Cipher(algorithms.AES(ikey), modes.ECB()).encryptor()
        ref = enc.update((v % 2**128).to_bytes(16, "little"))
        assert g1[i].astype("<u8").tobytes() + g2[i].astype("<u8").tobytes() == ref


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint64, np.uint8])
def test_int_arrays_hash_as_int128_across_batches(dtype: type) -> None:
    # The high word of int64 items is their sign, made block by block while hashing: check it over several
    # 2^16-item batches, negatives and uint64 values above 2^63 (high word 0, not the sign) included.
    info = np.iinfo(dtype)
    rng = np.random.default_rng(11)
    arr = rng.integers(info.min, info.max, 140_000, dtype=dtype, endpoint=True)
    arr[:4] = [info.min, info.max, 0, 1]
    h1, h2 = hash_items(arr, KEY)
    ikey = KEY._keys[psi_mod._KIND_INT]
    for i in [0, 1, 2, 3, 65_535, 65_536, 131_072, len(arr) - 1]:
        enc = Cipher(algorithms.AES(ikey), modes.ECB()).encryptor()
        ref = enc.update((int(arr[i]) % 2**128).to_bytes(16, "little"))
        assert h1[i].astype("<u8").tobytes() + h2[i].astype("<u8").tobytes() == ref, i
    as_python = hash_items([int(v) for v in arr[:1000]] + [2**100], KEY)  # the explicit high-word path
    assert np.array_equal(as_python[0][:1000], h1[:1000]) and np.array_equal(as_python[1][:1000], h2[:1000])


def test_keys_depend_on_the_secret() -> None:
    a = hash_items(["x", 1], KEY)
    b = hash_items(["x", 1], PsiKey(bytes(32)))
    assert not np.array_equal(a[0], b[0])
    assert repr(KEY) == "PsiKey(<secret>)"
