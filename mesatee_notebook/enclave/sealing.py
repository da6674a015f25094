r"""Sealed storage: blobs encrypted under a key bound to the platform secret and the code measurement.

Only code with the same measurement, on a platform holding the same sealing secret, can read what was sealed.
The host keeps the files but learns only their number, sizes and write times.

Keys (HKDF-SHA256 over the platform sealing secret, salt ``mesatee-notebook/sealing``)::

    data key  = HKDF(info = "mesatee-notebook sealed-store v1\x00data\x00"  + measurement)   AES-256-GCM
    name key  = HKDF(info = "mesatee-notebook sealed-store v1\x00names\x00" + measurement)   HMAC-SHA256

File name on disk: ``HMAC(name key, logical name)[:16].hex() + ".seal"``, so the host does not see logical names.

File format v1 (all integers big-endian)::

    header   magic "MTNBSEAL" | version u16 = 1 | reserved u16 = 0 | chunk_size u32 | file_id 16 random bytes
    name     length u16 | nonce 12 | AES-GCM(logical name)             AAD = DOMAIN | header | "name"
    chunk i  flags u8 (bit 0: final) | length u32 | nonce 12 | AES-GCM(plaintext[length])
             AAD = DOMAIN | header | u16 len(name) | name | index u64 | flags u8 | length u32

Every non-final chunk holds exactly ``chunk_size`` bytes; the final chunk holds 0..chunk_size bytes (0 only for an
empty blob). Nonces are random 96-bit values. The AAD binds each chunk to the file (``file_id``), the logical name,
its position and its final flag, so a flipped byte, a reordered, dropped or spliced chunk, a truncated file, trailing
bytes and a file swapped for another name's all raise :class:`~mesatee_notebook.errors.TamperedData`.

Not detected: the host replacing a file by an *older* sealed version of the same name (rollback), or deleting a
file outright (which reads as ``NotFound``). Detecting those needs a monotonic counter the host cannot reset.

Which measurement a store directory is sealed for, what a kernel with other code does with it, and how the owners
move it to a new measurement: :mod:`mesatee_notebook.enclave.migration` and ``docs/sealing.md``.

Writes are atomic: a temp file in the same directory, written, ``fsync``-ed, renamed over the target, then the
directory is ``fsync``-ed. A crash leaves the old version or the new one, never a mix. Files are 0600, the directory
0700. One process owns a store root at a time.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import hmac
import io
import os
import re
import secrets
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mesatee_notebook.errors import NotFound, SealingError, TamperedData

__all__ = ["DEFAULT_CHUNK_SIZE", "FORMAT_VERSION", "SealedStore", "SealedWriter", "validate_name"]

FORMAT_VERSION: Final = 1
DEFAULT_CHUNK_SIZE: Final = 4 << 20
MIN_CHUNK_SIZE: Final = 1 << 10
MAX_CHUNK_SIZE: Final = 64 << 20
MIN_SECRET_BYTES: Final = 32

_MAGIC: Final = b"MTNBSEAL"
_HEADER = struct.Struct(">8sHHI16s")
_NAME_LEN = struct.Struct(">H")
_CHUNK_HDR = struct.Struct(">BI12s")
_CHUNK_AAD = struct.Struct(">QBI")
_FINAL: Final = 0x01
_NONCE: Final = 12
_TAG: Final = 16
_DOMAIN: Final = b"mesatee-notebook sealed-store v1\x00"
_SALT: Final = b"mesatee-notebook/sealing"
_SUFFIX: Final = ".seal"
_TEMP_PREFIX: Final = ".tmp-"
_TEMP_SUFFIX: Final = ".part"
_FILE_RE: Final = re.compile(r"^[0-9a-f]{32}\.seal$")
_TEMP_RE: Final = re.compile(r"^\.tmp-(\d+)-[0-9a-f]{16}\.part$")
_SEGMENT_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+=-]{0,127}$")
MAX_NAME_LEN: Final = 512


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid logical name, else raise ``SealingError``.

    A name is 1..16 segments joined by ``/``; each segment is ``[A-Za-z0-9_][A-Za-z0-9_.@+=-]*`` (no ``.``/``..``,
    no leading dot or dash, no backslash, NUL or empty segment), at most 512 characters in all.
    """
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
        msg = f"invalid sealed-storage name {name!r}: must be a non-empty string of at most {MAX_NAME_LEN} characters"
        raise SealingError(msg, name=str(name))
    segments = name.split("/")
    if len(segments) > 16 or not all(_SEGMENT_RE.match(s) for s in segments):
        msg = (
            f"invalid sealed-storage name {name!r}: use segments of letters, digits and _.@+=- separated by '/', "
            "no '..', no leading dot"
        )
        raise SealingError(msg, name=name)
    return name


def _derive(secret: bytes, measurement: str, purpose: bytes) -> bytes:
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=_SALT, info=_DOMAIN + purpose + b"\x00" + measurement.encode()
    )
    return hkdf.derive(secret)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SealedStore:
    """Encrypted, measurement-bound key/blob store in one directory (see the module docstring for the format)."""

    def __init__(
        self, root: Path, sealing_secret: bytes, measurement: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        if len(sealing_secret) < MIN_SECRET_BYTES:
            msg = f"the sealing secret must be at least {MIN_SECRET_BYTES} bytes, got {len(sealing_secret)}"
            raise SealingError(msg)
        if not measurement:
            msg = "a sealed store needs the enclave measurement to bind its key to"
            raise SealingError(msg)
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            msg = f"chunk_size must be within [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], got {chunk_size}"
            raise SealingError(msg)
        self.root = Path(root)
        self.measurement = measurement
        self.chunk_size = chunk_size
        self._aead = AESGCM(_derive(bytes(sealing_secret), measurement, b"data"))
        self._name_key = _derive(bytes(sealing_secret), measurement, b"names")
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(self.root.stat().st_mode) != 0o700:
            self.root.chmod(0o700)
        self._remove_stale_temp_files()

    def __repr__(self) -> str:
        return f"SealedStore(root={str(self.root)!r}, measurement={self.measurement[:16]!r}...)"

    # -- paths -------------------------------------------------------------------------------------------------
    def path_for(self, name: str) -> Path:
        """Return the on-disk path of ``name`` (its file name is a keyed hash of the logical name)."""
        validate_name(name)
        digest = hmac.new(self._name_key, name.encode(), hashlib.sha256).digest()[:16]
        return self.root / (digest.hex() + _SUFFIX)

    def _remove_stale_temp_files(self) -> None:
        for entry in self.root.iterdir():
            m = _TEMP_RE.match(entry.name)
            if m and not _pid_alive(int(m.group(1))):
                entry.unlink(missing_ok=True)

    # -- writing -----------------------------------------------------------------------------------------------
    def open_writer(self, name: str) -> SealedWriter:
        """Return a writer that streams a blob into ``name``; it replaces ``name`` atomically on ``commit``."""
        return SealedWriter(self, name)

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Seal ``data`` under ``name``, replacing any previous blob atomically."""
        with self.open_writer(name) as writer:
            writer.write(data)

    def delete(self, name: str) -> None:
        """Remove ``name``; ``NotFound`` if it does not exist."""
        path = self.path_for(name)
        try:
            path.unlink()
        except FileNotFoundError:
            msg = f"no sealed blob named {name!r}"
            raise NotFound(msg, name=name) from None
        _fsync_dir(self.root)

    # -- reading -----------------------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        """Return whether a sealed file for ``name`` exists (without decrypting it)."""
        return self.path_for(name).is_file()

    def list(self, prefix: str = "") -> list[str]:
        """Sorted logical names starting with ``prefix``; a file that fails to authenticate raises ``TamperedData``."""
        names: list[str] = []
        for entry in self.root.iterdir():
            if not _FILE_RE.match(entry.name):
                continue
            try:
                with entry.open("rb") as fh:
                    _, name = self._read_prefix(fh, entry, None)
            except FileNotFoundError:
                continue  # deleted while listing
            if self.path_for(name).name != entry.name:
                msg = f"sealed file {entry.name} holds {name!r}, which belongs in another file (swapped)"
                raise TamperedData(msg, file=entry.name, name=name)
            if name.startswith(prefix):
                names.append(name)
        return sorted(names)

    def scan(self) -> tuple[builtins.list[str], int]:
        """(sorted names whose name record authenticates under this store's key, count of files that do not).

        Unlike :meth:`list` it does not stop at the first file it cannot read: it tells a store sealed under another
        key (nothing authenticates) from this key's store with a damaged file (most do).
        """
        names: builtins.list[str] = []
        unreadable = 0
        for entry in self.root.iterdir():
            if not _FILE_RE.match(entry.name):
                continue
            try:
                with entry.open("rb") as fh:
                    _, name = self._read_prefix(fh, entry, None)
            except FileNotFoundError:
                continue
            except TamperedData:
                unreadable += 1
                continue
            if self.path_for(name).name == entry.name:
                names.append(name)
            else:
                unreadable += 1
        return sorted(names), unreadable

    def get(self, name: str) -> bytes:
        """Return the blob sealed under ``name`` (``NotFound`` if absent, ``TamperedData`` if modified)."""
        return bytes(self.get_buffer(name))

    def get_buffer(self, name: str) -> bytearray:
        """Like :meth:`get`, but decrypts straight into one buffer (no second copy for large blobs)."""
        path = self.path_for(name)
        with self._open_for_read(path, name) as fh:
            out = bytearray(os.fstat(fh.fileno()).st_size)
            view = memoryview(out)
            filled = 0

            def dest_for(length: int) -> memoryview:
                return view[filled : filled + length]

            for length in self._iter_records(fh, path, name, dest_for):
                filled += length
            view.release()
        del out[filled:]
        return out

    def iter_chunks(self, name: str) -> Iterator[bytes]:
        """Yield the blob chunk by chunk; each chunk is authentic, and truncation raises when the end is reached.

        A consumer must not act on the data as a whole until the iterator has finished without an error.
        """
        path = self.path_for(name)
        buf = bytearray()

        def dest_for(length: int) -> memoryview:
            nonlocal buf
            if len(buf) < length:
                buf = bytearray(length)
            return memoryview(buf)[:length]

        with self._open_for_read(path, name) as fh:
            for length in self._iter_records(fh, path, name, dest_for):
                yield bytes(buf[:length])

    @contextlib.contextmanager
    def _open_for_read(self, path: Path, name: str) -> Iterator[io.BufferedReader]:
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            msg = f"no sealed blob named {name!r}"
            raise NotFound(msg, name=name) from None
        with fh:
            yield fh

    def _tampered(self, path: Path, name: str | None, why: str) -> TamperedData:
        label = f" ({name!r})" if name else ""
        return TamperedData(f"sealed file {path.name}{label} {why}", file=path.name, name=name or "")

    def _read_exact(self, fh: io.BufferedReader, n: int, path: Path, name: str | None, what: str) -> bytes:
        data = fh.read(n)
        if len(data) != n:
            raise self._tampered(path, name, f"is truncated (inside the {what})")
        return data

    def _read_prefix(self, fh: io.BufferedReader, path: Path, expected: str | None) -> tuple[bytes, str]:
        header = self._read_exact(fh, _HEADER.size, path, expected, "header")
        magic, version, _reserved, chunk_size, _file_id = _HEADER.unpack(header)
        if magic != _MAGIC:
            raise self._tampered(path, expected, "is not a sealed file (bad magic)")
        if version != FORMAT_VERSION:
            raise self._tampered(path, expected, f"has unsupported format version {version}")
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise self._tampered(path, expected, "has an invalid chunk size")
        (name_len,) = _NAME_LEN.unpack(self._read_exact(fh, _NAME_LEN.size, path, expected, "name record"))
        if name_len < _NONCE + _TAG or name_len > _NONCE + _TAG + MAX_NAME_LEN * 4:
            raise self._tampered(path, expected, "has an invalid name record")
        record = self._read_exact(fh, name_len, path, expected, "name record")
        try:
            raw = self._aead.decrypt(record[:_NONCE], record[_NONCE:], _DOMAIN + header + b"name")
        except InvalidTag:
            raise self._tampered(path, expected, "failed authentication (name record)") from None
        name = raw.decode("utf-8", errors="replace")
        if expected is not None and name != expected:
            raise self._tampered(path, expected, f"holds {name!r} instead (swapped)")
        return header, name

    def _iter_records(
        self, fh: io.BufferedReader, path: Path, name: str, dest_for: Callable[[int], memoryview]
    ) -> Iterator[int]:
        """Authenticate and decrypt chunks in order into ``dest_for(length)``; yield each chunk's length."""
        header, _ = self._read_prefix(fh, path, name)
        chunk_size = int(_HEADER.unpack(header)[3])
        aad_prefix = _DOMAIN + header + _NAME_LEN.pack(len(name.encode())) + name.encode()
        ct = bytearray(chunk_size + _TAG)
        index = 0
        while True:
            raw_hdr = fh.read(_CHUNK_HDR.size)
            if not raw_hdr:
                raise self._tampered(path, name, f"is truncated: chunk {index} missing and no final chunk seen")
            if len(raw_hdr) != _CHUNK_HDR.size:
                raise self._tampered(path, name, f"is truncated (inside chunk {index} header)")
            flags, length, nonce = _CHUNK_HDR.unpack(raw_hdr)
            if flags & ~_FINAL or length > chunk_size:
                raise self._tampered(path, name, f"has a malformed chunk {index} header")
            final = bool(flags & _FINAL)
            if not final and length != chunk_size:
                raise self._tampered(path, name, f"has a short non-final chunk {index}")
            ct_view = memoryview(ct)[: length + _TAG]
            if fh.readinto(ct_view) != length + _TAG:
                raise self._tampered(path, name, f"is truncated (inside chunk {index})")
            aad = aad_prefix + _CHUNK_AAD.pack(index, flags, length)
            target = dest_for(length)
            try:
                self._aead.decrypt_into(nonce, ct_view, aad, target)
            except InvalidTag:
                raise self._tampered(path, name, f"failed authentication at chunk {index}") from None
            finally:
                ct_view.release()
                target.release()
            yield length
            index += 1
            if final:
                if fh.read(1):
                    raise self._tampered(path, name, "has trailing bytes after its final chunk")
                return


class SealedWriter:
    """Streams one blob into a sealed temp file; :meth:`commit` renames it into place atomically.

    Use as a context manager: a clean exit commits, an exception discards the temp file.
    """

    def __init__(self, store: SealedStore, name: str) -> None:
        self._store = store
        self._name = validate_name(name)
        self._final_path = store.path_for(name)
        self._tmp_path = store.root / f"{_TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}{_TEMP_SUFFIX}"
        fd = os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        os.fchmod(fd, 0o600)
        self._fh: io.BufferedWriter = os.fdopen(fd, "wb")
        self._chunk_size = store.chunk_size
        header = _HEADER.pack(_MAGIC, FORMAT_VERSION, 0, self._chunk_size, secrets.token_bytes(16))
        name_bytes = name.encode()
        nonce = secrets.token_bytes(_NONCE)
        sealed_name = store._aead.encrypt(nonce, name_bytes, _DOMAIN + header + b"name")
        self._fh.write(header + _NAME_LEN.pack(_NONCE + len(sealed_name)) + nonce + sealed_name)
        self._aad_prefix = _DOMAIN + header + _NAME_LEN.pack(len(name_bytes)) + name_bytes
        self._pending = bytearray()
        self._out = bytearray(self._chunk_size + _TAG)
        self._index = 0
        self._closed = False
        self.bytes_written = 0

    def __enter__(self) -> SealedWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _emit(self, chunk: memoryview | bytes | bytearray, final: bool) -> None:
        length = len(chunk)
        flags = _FINAL if final else 0
        nonce = secrets.token_bytes(_NONCE)
        aad = self._aad_prefix + _CHUNK_AAD.pack(self._index, flags, length)
        out = memoryview(self._out)[: length + _TAG]
        self._store._aead.encrypt_into(nonce, chunk, aad, out)
        self._fh.write(_CHUNK_HDR.pack(flags, length, nonce))
        self._fh.write(out)
        out.release()
        self._index += 1

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` to the blob; full chunks are encrypted and written as they fill."""
        if self._closed:
            msg = f"sealed writer for {self._name!r} is already closed"
            raise SealingError(msg)
        view = memoryview(data).cast("B")
        cs = self._chunk_size
        self.bytes_written += len(view)
        if self._pending:
            take = min(len(view), cs - len(self._pending))
            self._pending += view[:take]
            view = view[take:]
            if not view:
                return  # the pending chunk may still be the final one
            self._emit(self._pending, final=False)
            self._pending.clear()
        # Keep at least one byte (up to a full chunk) back: the last chunk must carry the final flag.
        while len(view) > cs:
            self._emit(view[:cs], final=False)
            view = view[cs:]
        self._pending += view

    def commit(self) -> None:
        """Write the final chunk, fsync, rename over the target and fsync the directory."""
        if self._closed:
            return
        try:
            self._emit(self._pending, final=True)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._tmp_path.replace(self._final_path)
            _fsync_dir(self._store.root)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Discard the temp file; the previous blob under the name (if any) is untouched."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._fh.close()
        self._tmp_path.unlink(missing_ok=True)
