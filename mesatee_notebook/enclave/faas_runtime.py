"""What runs inside a task's fresh sandboxed executor: one registered function, Python or WebAssembly (issue 17).

The supervisor starts a new executor in its own sandbox for every task run (never the service worker, never the
supervisor) and sends it one cell that calls :func:`run_blob` on a packed blob (the function, its arguments and its
bound inputs); the cell's only output is the packed result. The supervisor answers none of the executor's requests
during the run, so nothing but the bound inputs is reachable.

WebAssembly calling convention (``docs/faas.md``): a WASI command (``_start``), or an exported function ``entry``
taking no arguments. Input ``x`` is the virtual file ``/in/x`` (bytes as they are; a DataFrame as an Arrow IPC
stream); the first input is also stdin. ``args`` become ``argv[1:]`` as ``key=value`` and the environment
``MESATEE_ARG_<KEY>``. The result is stdout, plus any declared output ``y`` the module wrote to ``/out/y``. No host
directory is visible: ``/in`` and ``/out`` are private temporary directories of this sandbox.
"""

from __future__ import annotations

import io
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from mesatee_notebook.errors import EncodingError, PolicyViolation, ResourceExhausted, WasmError

__all__ = ["DEFAULT_LIMITS", "CellKeys", "FunctionAPI", "run_blob"]

#: Defaults for a WebAssembly run; a task can lower them (never raise them past MAX_LIMITS).
DEFAULT_LIMITS: Final = {"fuel": 2_000_000_000, "memory": 256 << 20, "table_elements": 100_000, "seconds": 30.0}
MAX_LIMITS: Final = {"fuel": 50_000_000_000, "memory": 1 << 30, "table_elements": 1_000_000, "seconds": 300.0}
_EPOCH_TICK: Final = 0.05
_MAX_STDOUT: Final = 256 << 20


def run_blob(blob: bytes, keys: CellKeys | None = None) -> bytes:
    """Run the function described by ``blob`` (see ``services/faas.py``) and return its packed result.

    ``keys`` is the executor's ``mesatee.keys``: a Python function sees it as ``mesatee.keys`` when its task names
    keys (the supervisor serves only those, as the task's creator); otherwise ``mesatee.keys`` explains why not.
    """
    from mesatee_notebook.enclave.services.jobstore import pack_values, unpack_values

    values, extra = unpack_values(blob)
    code = values.pop("__code__")
    fn = dict(extra["function"])
    args = dict(extra.get("args") or {})
    named = [str(k) for k in extra.get("keys") or []]
    if fn["lang"] == "python":
        api = FunctionAPI(keys if named and keys is not None else _NoKeys(named))
        out, info = _run_python(str(code), fn, args, values, api)
    else:
        out, info = _run_wasm(bytes(code), fn, args, values, dict(extra.get("limits") or {}))
    return pack_values(out, **info)


class CellKeys:
    """``mesatee.keys`` in a cell: each call goes to the KeyStore service as the session's party."""

    def __init__(self, request: Callable[..., bytes]) -> None:
        self._request = request

    def _call(self, op: str, args: dict[str, Any], **values: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
        from mesatee_notebook.enclave.services.jobstore import pack_values, unpack_values

        blob = self._request({"t": "key.call", "op": op}, [pack_values(values, args=args)])
        values_out, extra = unpack_values(blob)
        return values_out, dict(extra.get("info") or {})

    def sign(self, name: str, data: bytes | str) -> bytes:
        """A signature by key ``name`` (its current version)."""
        return bytes(self._call("sign", {"name": name}, data=_as_bytes(data))[0]["signature"])

    def verify(self, name: str, data: bytes | str, signature: bytes, version: int | None = None) -> bool:
        """Whether ``signature`` is key ``name``'s over ``data``."""
        info = self._call(
            "verify", {"name": name, "version": version}, data=_as_bytes(data), signature=bytes(signature)
        )[1]
        return bool(info.get("valid"))

    def encrypt(self, name: str, data: bytes | str, aad: bytes | None = None) -> bytes:
        """AEAD / RSA-OAEP ciphertext under key ``name``."""
        extra = {} if aad is None else {"aad": bytes(aad)}
        return bytes(self._call("encrypt", {"name": name}, data=_as_bytes(data), **extra)[0]["ciphertext"])

    def decrypt(self, name: str, ciphertext: bytes, aad: bytes | None = None) -> bytes:
        """The plaintext of ``ciphertext`` (refused if it does not authenticate)."""
        extra = {} if aad is None else {"aad": bytes(aad)}
        return bytes(self._call("decrypt", {"name": name}, ciphertext=bytes(ciphertext), **extra)[0]["plaintext"])

    def wrap(self, name: str, key_material: bytes) -> bytes:
        """``key_material`` wrapped under ``aes-256-gcm`` key ``name`` (RFC 5649)."""
        return bytes(self._call("wrap", {"name": name}, key=bytes(key_material))[0]["wrapped"])

    def unwrap(self, name: str, wrapped: bytes) -> bytes:
        """The key material ``wrap`` wrapped (refused if it does not authenticate)."""
        return bytes(self._call("unwrap", {"name": name}, wrapped=bytes(wrapped))[0]["key"])

    def public_key(self, name: str) -> str | None:
        """Key ``name``'s PEM public key (None for a symmetric key)."""
        return self._call("info", {"name": name})[1].get("public_key")

    def __repr__(self) -> str:
        return "<mesatee.keys: sign, verify, en/decrypt, wrap/unwrap, public_key by name; keys stay in the enclave>"


class _NoKeys:
    """``mesatee.keys`` in a function whose task names no keys: every use says how to get one."""

    def __init__(self, named: list[str]) -> None:
        self._named = named

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        msg = (
            "this task names no keys, so mesatee.keys is not available to its function: create the task with "
            "keys=[names] (every data owner then approves that list, and the function uses them as the task's "
            "creator, who must own or be a user of each key)"
        )
        raise PolicyViolation(msg)


class FunctionAPI:
    """The ``mesatee`` object inside a registered function: no storage, no datasets; only the task's named keys."""

    def __init__(self, keys: CellKeys | _NoKeys | None = None) -> None:
        self.keys = keys if keys is not None else _NoKeys([])

    def __repr__(self) -> str:
        return "<mesatee function API: only the bound inputs, and the keys the task names, are reachable>"


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


def _run_python(
    source: str, fn: dict[str, Any], args: dict[str, Any], inputs: dict[str, Any], api: FunctionAPI | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    namespace: dict[str, Any] = {"__name__": f"faas.{fn['name']}", "mesatee": api or FunctionAPI()}
    exec(compile(source, f"<function {fn['name']}>", "exec"), namespace)
    entry = namespace.get(str(fn["entry"]))
    if not callable(entry):
        msg = f"function {fn['name']!r} defines no callable {fn['entry']!r}"
        raise EncodingError(msg)
    result = entry(**inputs, **args)
    outputs = list(fn.get("outputs") or [])
    if len(outputs) > 1:
        if not isinstance(result, dict) or sorted(result) != sorted(outputs):
            msg = f"function {fn['name']!r} must return a dict with exactly the outputs {outputs}"
            raise EncodingError(msg)
        return dict(result), {}
    return {outputs[0] if outputs else "result": result}, {}


def _wasm_input_bytes(value: Any, raw: bool = False) -> bytes:
    import pandas as pd
    import pyarrow as pa

    if raw:
        if not isinstance(value, pd.DataFrame) or value.shape[1] != 1 or value.dtypes.iloc[0].kind not in "iufb":
            msg = "a raw input must be a table with exactly one numeric column"
            raise EncodingError(msg)
        import numpy as np

        column = value.iloc[:, 0].to_numpy()
        return np.ascontiguousarray(column.astype(column.dtype.newbyteorder("<"))).tobytes()

    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, pd.DataFrame):
        table = pa.Table.from_pandas(value, preserve_index=False)
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue()
    import numpy as np

    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value).tobytes()
    msg = f"a WebAssembly input must be bytes, str, a numpy array or a DataFrame, not {type(value).__name__}"
    raise EncodingError(msg)


def _limits(asked: dict[str, Any]) -> dict[str, Any]:
    out = dict(DEFAULT_LIMITS)
    for key, value in asked.items():
        if key not in MAX_LIMITS or isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            msg = f"limit {key!r} must be a positive number (limits: {', '.join(MAX_LIMITS)})"
            raise EncodingError(msg)
        out[key] = min(value, MAX_LIMITS[key])
    return out


def _run_wasm(
    wasm: bytes, fn: dict[str, Any], args: dict[str, Any], inputs: dict[str, Any], asked: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    lim = _limits(asked)
    engine = _engine(lim)
    module = _compile(engine, wasm, fn)
    work = _workdir(fn, inputs)
    store = _wasi_store(engine, fn, args, work, lim)
    t0 = time.perf_counter()
    exit_code = _call(engine, store, _instantiate(engine, store, module, fn, lim), fn, lim)
    seconds = time.perf_counter() - t0
    fuel = int(lim["fuel"]) - store.get_fuel()
    if exit_code != 0:
        # stderr stays in the sandbox: it could quote the inputs
        msg = f"function {fn['name']!r} exited with status {exit_code}"
        raise WasmError(msg, exit_code=exit_code, fuel=fuel)
    return _outputs(fn, work), {"fuel": fuel, "seconds": round(seconds, 4)}


def _engine(lim: dict[str, Any]) -> Any:
    import wasmtime

    config = wasmtime.Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    # Small reservations: the sandbox caps the address space, and wasmtime's default reserves 4 GiB per memory.
    config.memory_reservation = int(lim["memory"])
    config.memory_guard_size = 64 << 10
    config.memory_reservation_for_growth = 0
    config.memory_init_cow = False  # copy-on-write images need memfds, which the sandbox refuses
    config.parallel_compilation = False  # the sandbox allows few threads
    return wasmtime.Engine(config)


def _compile(engine: Any, wasm: bytes, fn: dict[str, Any]) -> Any:
    import wasmtime

    try:
        return wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as exc:
        msg = f"function {fn['name']!r}: the WebAssembly module is not valid: {_first_line(exc)}"
        raise WasmError(msg) from None


def _workdir(fn: dict[str, Any], inputs: dict[str, Any]) -> Path:
    """``in/<input>`` files (the first is also ``stdin``), an empty ``out/``; in the sandbox's private /tmp."""
    work = Path(tempfile.mkdtemp(prefix="faas-"))
    (work / "in").mkdir()
    (work / "out").mkdir()
    first: Path | None = None
    for name, value in inputs.items():
        path = work / "in" / name
        path.write_bytes(_wasm_input_bytes(value, name in (fn.get("raw_inputs") or [])))
        first = first or path
    (work / "stdin").symlink_to(first or (work / "empty"))
    if first is None:
        (work / "empty").write_bytes(b"")
    return work


def _wasi_store(engine: Any, fn: dict[str, Any], args: dict[str, Any], work: Path, lim: dict[str, Any]) -> Any:
    import wasmtime

    wasi = wasmtime.WasiConfig()
    wasi.argv = [str(fn["name"]), *(f"{k}={v}" for k, v in sorted(args.items()))]
    wasi.env = [(f"MESATEE_ARG_{k.upper()}", str(v)) for k, v in sorted(args.items())]
    wasi.stdin_file = str((work / "stdin").resolve())
    wasi.stdout_file = str(work / "stdout")
    wasi.stderr_file = str(work / "stderr")
    wasi.preopen_dir(str(work / "in"), "/in", fs_mutable=False)
    wasi.preopen_dir(str(work / "out"), "/out")
    store = wasmtime.Store(engine)
    store.set_wasi(wasi)
    store.set_limits(memory_size=int(lim["memory"]), table_elements=int(lim["table_elements"]))
    store.set_fuel(int(lim["fuel"]))
    store.set_epoch_deadline(max(1, int(float(lim["seconds"]) / _EPOCH_TICK)))
    return store


def _instantiate(engine: Any, store: Any, module: Any, fn: dict[str, Any], lim: dict[str, Any]) -> Any:
    import wasmtime

    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    try:
        return linker.instantiate(store, module)
    except wasmtime.WasmtimeError as exc:
        text = _first_line(exc)
    low = text.lower()
    if "unknown import" in text or "import" in low:
        msg = f"function {fn['name']!r} imports something this kernel does not provide: {text}"
        raise WasmError(msg) from None
    if "table" in low and "limit" in low:
        allowed = int(lim["table_elements"])
        msg = f"function {fn['name']!r} needs a larger table than its limit of {allowed} elements: {text}"
        raise ResourceExhausted(msg, limit="table_elements", allowed=allowed) from None
    if "memory" in low or "limit" in low:
        allowed = int(lim["memory"])
        msg = f"function {fn['name']!r} needs more memory than its limit of {allowed} bytes: {text}"
        raise ResourceExhausted(msg, limit="memory", allowed=allowed) from None
    msg = f"function {fn['name']!r} could not be instantiated: {text}"
    raise WasmError(msg) from None


def _call(engine: Any, store: Any, instance: Any, fn: dict[str, Any], lim: dict[str, Any]) -> int:
    """Run the entry under the epoch ticker; return the WASI exit status (0 when the entry just returns)."""
    import wasmtime

    entry_name = str(fn.get("entry") or "_start")
    entry = instance.exports(store).get(entry_name)
    if not isinstance(entry, wasmtime.Func):
        msg = f"function {fn['name']!r}: the module exports no function {entry_name!r}"
        raise WasmError(msg)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(_EPOCH_TICK):
            engine.increment_epoch()

    threading.Thread(target=tick, daemon=True).start()
    try:
        entry(store)
    except wasmtime.ExitTrap as exc:
        return int(exc.code)
    except wasmtime.Trap as exc:
        _raise_trap(fn, exc, store, lim)
    except wasmtime.WasmtimeError as exc:
        msg = f"function {fn['name']!r} failed: {_first_line(exc)}"
        raise WasmError(msg) from None
    finally:
        stop.set()
    return 0


def _outputs(fn: dict[str, Any], work: Path) -> dict[str, Any]:
    stdout = work / "stdout"
    if stdout.stat().st_size > _MAX_STDOUT:
        msg = f"function {fn['name']!r} wrote more than {_MAX_STDOUT} bytes to stdout"
        raise ResourceExhausted(msg, limit="stdout")
    out: dict[str, Any] = {"stdout": stdout.read_bytes()}
    for name in fn.get("outputs") or []:
        path = work / "out" / str(name)
        if str(name) != "stdout":
            if not path.is_file():
                msg = f"function {fn['name']!r} did not write its declared output /out/{name}"
                raise WasmError(msg)
            out[str(name)] = path.read_bytes()
    return out


def _raise_trap(fn: dict[str, Any], exc: Any, store: Any, lim: dict[str, Any]) -> None:
    import wasmtime

    code = getattr(exc, "trap_code", None)
    if code == wasmtime.TrapCode.OUT_OF_FUEL:
        msg = (
            f"function {fn['name']!r} ran out of fuel: it used all {int(lim['fuel'])} units "
            "(an infinite loop, or too much work for the task's fuel limit)"
        )
        raise ResourceExhausted(msg, limit="fuel", allowed=int(lim["fuel"])) from None
    if code == wasmtime.TrapCode.INTERRUPT:
        msg = f"function {fn['name']!r} ran past its wall-time limit of {lim['seconds']:g} s and was stopped"
        raise ResourceExhausted(msg, limit="seconds", allowed=lim["seconds"]) from None
    msg = f"function {fn['name']!r} trapped: {_first_line(exc)}"
    raise WasmError(msg, trap=str(code.name) if code is not None else None) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if "Caused by:" in text:  # wasmtime puts the reason after the backtrace
        cause = text.split("Caused by:", 1)[1].strip().splitlines()
        return cause[0].split(": ", 1)[-1].strip() if cause else text
    return text.splitlines()[0] if text else type(exc).__name__
