"""Seal a model into a ``.mseal`` container, and open, inspect, verify or rewrap one.

These are the recipes: every algorithm and parameter is chosen here, and the
format plumbing lives in ``modelseal._private``. See docs/spec/container-v1.md.
"""

from __future__ import annotations

import hmac
import io
import os
import shutil
import struct
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag

from ._private import crypto
from ._private import format as fmt
from ._private.encoding import b64decode, b64encode, dumps_canonical
from ._private.io import AtomicOutput, Source
from ._private.paths import check_entry_path, check_entry_set
from ._private.pipeline import Stage
from ._private.sink import FileSink
from .errors import IntegrityError, ModelSealError, SignatureError, WrongKeyError
from .keys import (
    PassphraseRecipient,
    Recipient,
    SigningKey,
    Unwrapper,
    VerifyKey,
    as_recipient,
    as_unwrappers,
)

__all__ = [
    "ContainerInfo",
    "EntryInfo",
    "SealedModel",
    "inspect",
    "open_sealed",
    "rewrap",
    "seal",
    "verify",
]

PathLike = str | os.PathLike[str]
Progress = Callable[[int], None]
_U32 = struct.Struct(">I")
_RING = 3  # chunk buffers in flight between the AES thread and the hash/write thread

# (AESGCM.encrypt_into or decrypt_into, nonce, input, output): one chunk for the AES thread
_AesJob = tuple[Callable[..., Any], bytes, memoryview, memoryview]


def _aes_call(job: _AesJob) -> None:
    method, nonce, data, dest = job
    method(nonce, data, None, dest)


# --- public result types -------------------------------------------------------------------


@dataclass(frozen=True)
class EntryInfo:
    """One file inside a container."""

    path: str
    size: int


@dataclass(frozen=True)
class ContainerInfo:
    """What anyone can read from a container without a key.

    ``metadata``, entries and signer keys are *claims* until the container is
    opened (authenticated by its content key) or verified (by a signer's key).
    """

    paths: tuple[Path, ...]
    size: int
    version: int
    model_format: str
    chunk_size: int
    created: datetime
    entries: tuple[EntryInfo, ...]
    metadata: Mapping[str, str]
    recipients: tuple[Mapping[str, str], ...]
    signers: tuple[str, ...]
    verified_signer: str | None = None

    @property
    def plaintext_size(self) -> int:
        return sum(e.size for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "paths": [str(p) for p in self.paths],
            "size": self.size,
            "version": self.version,
            "model_format": self.model_format,
            "chunk_size": self.chunk_size,
            "created": self.created.isoformat(),
            "entries": [{"path": e.path, "size": e.size} for e in self.entries],
            "metadata": dict(self.metadata),
            "recipients": [dict(r) for r in self.recipients],
            "signers": list(self.signers),
            "verified_signer": self.verified_signer,
        }


def _info(source: Source, header: fmt.Header, verified: VerifyKey | None = None) -> ContainerInfo:
    m = header.manifest
    recipients = []
    for s in header.stanzas:
        r = {"type": s["type"]}
        if s["type"] == "x25519":
            r["kid"] = b64decode(s["kid"]).hex()
        elif s["type"] == "scrypt":
            r["work_factor"] = f"2^{s['log_n']}"
        elif s["type"] == "keyserver":  # keyserver spec §4
            r.update({k: str(s.get(k)) for k in ("url", "model_id", "key_commitment", "server_key_id")})
        recipients.append(r)
    return ContainerInfo(
        paths=tuple(source.paths),
        size=source.size,
        version=header.version,
        model_format=m["model_format"],
        chunk_size=header.chunk_size,
        created=datetime.fromtimestamp(m["created"], tz=timezone.utc),
        entries=tuple(EntryInfo(e.path, e.size) for e in header.entries),
        metadata=dict(m["metadata"]),
        recipients=tuple(recipients),
        signers=tuple(str(VerifyKey(b64decode(s["public_key"]))) for s in header.signatures),
        verified_signer=str(verified) if verified else None,
    )


# --- sealing -----------------------------------------------------------------------------


def _collect(src: Path) -> list[tuple[str, Path, int]]:
    """(entry path, file, size) for a file or every regular file under a directory."""
    if src.is_file():
        name = check_entry_path(src.name)
        return [(name, src, src.stat().st_size)]
    if not src.is_dir():
        raise FileNotFoundError(f"no such file or directory: {src}")
    found = []
    for root, dirs, files in os.walk(src):
        for d in dirs:
            if (Path(root) / d).is_symlink():
                raise ValueError(f"{Path(root) / d} is a symlinked directory; seal its target instead")
        for name in files:
            p = Path(root) / name
            if not p.is_file():
                raise ValueError(f"{p} is not a regular file (or a link to one)")
            rel = p.relative_to(src).as_posix()
            found.append((check_entry_path(rel), p, p.stat().st_size))
    if not found:
        raise ValueError(f"{src} holds no files to seal")
    found.sort(key=lambda t: t[0])
    check_entry_set(t[0] for t in found)
    return found


def detect_format(paths: Sequence[str]) -> str:
    """Best guess at the model format of a set of entry paths (recorded in the manifest)."""
    names = [p.rsplit("/", 1)[-1].lower() for p in paths]
    suffixes = {n.rsplit(".", 1)[-1] for n in names if "." in n}
    if "config.json" in names and ("safetensors" in suffixes or "pytorch_model.bin" in names):
        return "huggingface"
    if "model.json" in names and any(n.startswith("group") and "shard" in n for n in names):
        return "tfjs"
    if "onnx" in suffixes:
        return "onnx"
    if "safetensors" in suffixes:
        return "safetensors"
    if suffixes & {"pt", "pth", "bin", "ckpt"}:
        return "pytorch"
    return "unknown"


def _read_exact(fh: io.RawIOBase | io.BufferedReader, view: memoryview, path: Path) -> None:
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise ModelSealError(f"{path} shrank while it was being sealed")
        done += n


def seal(
    src: PathLike,
    dst: PathLike,
    *,
    recipients: Sequence[Recipient | str] = (),
    passphrase: str | bytes | None = None,
    signer: SigningKey | None = None,
    metadata: Mapping[str, str] | None = None,
    model_format: str | None = None,
    chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
    shard_size: int | None = None,
    scrypt_log_n: int = 18,
    progress: Progress | None = None,
) -> ContainerInfo:
    """Encrypt a model file or directory into a container at ``dst``.

    Streams in constant memory. The output appears only once complete (written
    under a temporary name, then renamed); on any error nothing is left behind.

    Args:
        src: A model file, or a directory (every regular file under it is sealed).
        dst: Output path. With ``shard_size``, shards ``dst-shard1ofN``... are written.
        recipients: Device recipients (``Identity.recipient`` or ``mseal-x25519:`` strings),
            or any :class:`~modelseal.keys.Recipient`.
        passphrase: Also let this passphrase open the container (scrypt, 2**scrypt_log_n).
        signer: Publisher key that signs the container.
        metadata: Public ownership fields (``owner``, ``copyright``, ``license``, ``name``,
            ``version``, or any ``[a-z0-9_.-]`` key), readable without a key, authenticated.
        model_format: Override the detected format (one of ``onnx``, ``safetensors``,
            ``pytorch``, ``tfjs``, ``huggingface``, ``unknown``).
        chunk_size: Plaintext bytes per AEAD chunk, a power of two in [4 KiB, 64 MiB].
        shard_size: Split the container into files of at most this many bytes.
        progress: Called with the number of plaintext bytes processed, chunk by chunk.

    Returns:
        What :func:`inspect` reports for the new container.

    Raises:
        ValueError: No recipient, bad options, or unsafe file names in ``src``.
        FormatError: An entry path or metadata breaks the format rules.
    """
    return _seal(
        src,
        dst,
        recipients=recipients,
        passphrase=passphrase,
        signer=signer,
        metadata=metadata,
        model_format=model_format,
        chunk_size=chunk_size,
        shard_size=shard_size,
        scrypt_log_n=scrypt_log_n,
        progress=progress,
    )


def _seal(
    src: PathLike,
    dst: PathLike,
    *,
    recipients: Sequence[Recipient | str],
    passphrase: str | bytes | None,
    signer: SigningKey | None,
    metadata: Mapping[str, str] | None,
    model_format: str | None,
    chunk_size: int,
    shard_size: int | None,
    scrypt_log_n: int,
    progress: Progress | None,
    random_bytes: Callable[[int], bytes] = os.urandom,
    now: float | None = None,
) -> ContainerInfo:
    """Deterministic seam: tests inject ``random_bytes`` and ``now`` to produce exact vectors."""
    if not isinstance(chunk_size, int) or not (
        fmt.MIN_CHUNK_SIZE <= chunk_size <= fmt.MAX_CHUNK_SIZE and chunk_size & (chunk_size - 1) == 0
    ):
        raise ValueError(f"chunk_size must be a power of two in [{fmt.MIN_CHUNK_SIZE}, {fmt.MAX_CHUNK_SIZE}]")
    wrappers = [as_recipient(r) for r in recipients]
    if passphrase is not None:
        wrappers.append(PassphraseRecipient(passphrase, scrypt_log_n))
    if not wrappers:
        raise ValueError("seal needs at least one recipient or a passphrase, or nobody could open it")
    files = _collect(Path(src))

    content_key = random_bytes(fmt.KEY_LEN)
    salt = random_bytes(fmt.SALT_LEN)
    keys = crypto.KeySchedule(content_key, salt)
    entry_paths = [f[0] for f in files]
    manifest = {
        "version": fmt.VERSION,
        "aead": fmt.AEAD_NAME,
        "chunk_hash": fmt.HASH_NAME,
        "chunk_size": chunk_size,
        "salt": b64encode(salt),
        "key_commitment": b64encode(keys.commitment),
        "created": int(time.time() if now is None else now),
        "model_format": model_format or detect_format(entry_paths),
        "entries": [{"path": p, "size": size} for p, _, size in files],
        "metadata": dict(metadata or {}),
    }
    fmt.validate_manifest(manifest)
    manifest_bytes = dumps_canonical(manifest)
    stanzas = [
        r.wrap_for(content_key, salt=salt, key_commitment=keys.commitment, random_bytes=random_bytes) for r in wrappers
    ]
    fmt.validate_stanzas(stanzas)
    stanzas_bytes = dumps_canonical(stanzas)
    if len(manifest_bytes) > fmt.MAX_MANIFEST_LEN or len(stanzas_bytes) > fmt.MAX_STANZAS_LEN:
        raise ValueError("too many entries, recipients or metadata for one container")
    preamble = fmt.build_preamble(manifest_bytes, stanzas_bytes)
    header_mac = keys.header_mac(preamble)

    def signatures(sig: bytes) -> bytes:
        if signer is None:
            return b"[]"
        return dumps_canonical(
            [
                {
                    "alg": "ed25519",
                    "public_key": b64encode(signer.verify_key.public_bytes),
                    "signature": b64encode(sig),
                }
            ]
        )

    header_end = len(preamble) + fmt.MAC_LEN
    total = fmt.container_size(header_end, [f[2] for f in files], chunk_size, len(signatures(bytes(64))))
    with AtomicOutput(dst, total, shard_size) as out:
        out.write(preamble)
        out.write(header_mac)
        table = bytearray()
        plains = [memoryview(bytearray(chunk_size)) for _ in range(_RING)]
        sealeds = [memoryview(bytearray(chunk_size + fmt.TAG_LEN)) for _ in range(_RING)]
        in_flight: deque[memoryview] = deque()

        def finish_oldest() -> None:  # hash and write the oldest chunk while AES runs on the next
            aes.get()
            sealed = in_flight.popleft()
            table.extend(crypto.chunk_hash(sealed))
            out.write(sealed)

        with Stage(_aes_call) as aes:
            k = 0
            for index, (_, path, size) in enumerate(files):
                aead = keys.entry_aead(index)
                count = fmt.n_chunks(size, chunk_size)
                with open(path, "rb", buffering=0) as fh:
                    for j in range(count):
                        n = min(chunk_size, size - j * chunk_size)
                        plain = plains[k % _RING][:n]
                        _read_exact(fh, plain, path)
                        sealed = sealeds[k % _RING][: n + fmt.TAG_LEN]
                        aes.put((aead.encrypt_into, crypto.chunk_nonce(j, j == count - 1), plain, sealed))
                        in_flight.append(sealed)
                        if aes.pending > 1:
                            finish_oldest()
                        k += 1
                        if progress:
                            progress(n)
                    if fh.read(1):
                        raise ModelSealError(f"{path} grew while it was being sealed")
            while aes.pending:
                finish_oldest()
        sig = b""
        if signer is not None:
            sig = signer.sign(crypto.signed_message(manifest_bytes, crypto.table_root(table)))
        sigs_bytes = signatures(sig)
        out.write(table)
        out.write(_U32.pack(len(sigs_bytes)))
        out.write(sigs_bytes)
        out.write(keys.trailer_mac(header_mac, table, sigs_bytes))
        out.commit()
    return inspect(out.finals[0] if len(out.finals) == 1 else dst)


# --- opening -----------------------------------------------------------------------------


def _unlock(header: fmt.Header, unwrappers: Sequence[Unwrapper]) -> crypto.KeySchedule:
    """Recover the content key and authenticate the header with it."""
    salt = b64decode(header.manifest["salt"])
    commitment = b64decode(header.manifest["key_commitment"])
    for unwrapper in unwrappers:
        unwrapper.error = None  # forget a failure recorded by an earlier open
    for stanza in header.stanzas:
        if stanza["type"] == "keyserver" and stanza.get("key_commitment") != header.manifest["key_commitment"]:
            continue  # copied from another container: make no request (keyserver spec §4, check 1)
        for unwrapper in unwrappers:
            key = unwrapper.unwrap(stanza)
            if key is None:
                continue
            if len(key) != fmt.KEY_LEN:
                raise IntegrityError()
            keys = crypto.KeySchedule(key, salt)
            if not hmac.compare_digest(keys.commitment, commitment):
                # Not this container's key (a stanza copied from elsewhere, or a body crafted to
                # open under many keys): treat it as not ours, so the error type is no oracle.
                continue
            if not hmac.compare_digest(keys.header_mac(header.signed_prefix), header.header_mac):
                raise IntegrityError()
            return keys
    for unwrapper in unwrappers:
        # An unwrapper that was refused (a key server: licence revoked, unreachable, ...) records why;
        # report that rather than "wrong key".
        if isinstance(unwrapper.error, ModelSealError):
            raise unwrapper.error
    raise WrongKeyError()


def _read_table(source: Source, header: fmt.Header, keys: crypto.KeySchedule) -> bytes:
    table = source.read_at(header.table_offset, header.total_chunks * fmt.HASH_LEN)
    mac = source.read_at(header.trailer_mac_offset, fmt.MAC_LEN)
    if not hmac.compare_digest(keys.trailer_mac(header.header_mac, table, header.signatures_bytes), mac):
        raise IntegrityError()
    return table


def _check_signature(header: fmt.Header, table: bytes, signer: VerifyKey | str) -> VerifyKey:
    signer = VerifyKey.parse(signer)
    message = crypto.signed_message(header.manifest_bytes, crypto.table_root(table))
    for s in header.signatures:
        if b64decode(s["public_key"]) == signer.public_bytes:
            if signer.verify(b64decode(s["signature"]), message):
                return signer
            raise SignatureError(f"the signature by {signer} does not match this container")
    raise SignatureError(f"this container is not signed by {signer}")


class SealedModel:
    """An open container: lists its files and decrypts them into memory on demand.

    Every byte handed out has been authenticated: a chunk is released only after
    its AEAD tag (and, with ``require_signer``, its signed hash) checks out, and
    ``read`` releases a file only when all of it has.
    """

    def __init__(
        self,
        source: Source,
        header: fmt.Header,
        keys: crypto.KeySchedule,
        table: bytes,
        signer: VerifyKey | None,
    ) -> None:
        self._source = source
        self._header = header
        self._keys = keys
        self._table = table
        self._check_hashes = signer is not None
        self.info = _info(source, header, signer)

    # metadata ----------------------------------------------------------------------------
    @property
    def files(self) -> list[str]:
        return [e.path for e in self._header.entries]

    @property
    def entries(self) -> tuple[EntryInfo, ...]:
        return self.info.entries

    @property
    def metadata(self) -> Mapping[str, str]:
        return self.info.metadata

    @property
    def model_format(self) -> str:
        return self.info.model_format

    def size(self, path: str | None = None) -> int:
        return self._entry(path).size

    def _entry(self, path: str | None) -> fmt.Entry:
        if path is None:
            if len(self._header.entries) != 1:
                raise ValueError(f"this container holds {len(self._header.entries)} files; name one of {self.files}")
            return self._header.entries[0]
        try:
            return self._header.entry(path)
        except KeyError:
            raise KeyError(f"no file {path!r} in this container (files: {self.files[:20]})") from None

    # decryption --------------------------------------------------------------------------
    def _chunks(
        self, entry: fmt.Entry, out: memoryview | _ChunkWindow, first: int = 0, last: int | None = None
    ) -> Generator[tuple[int, memoryview], None, None]:
        """Decrypt chunks ``first..last`` of ``entry`` into ``out``, yielding each once authenticated.

        The ciphertext of chunk k+1 is read (and, when checking signed hashes, hashed
        on a second core) while chunk k is decrypted. On any failure the plaintext
        written for the failing chunk is zeroed before the error propagates.
        """
        cs = self._header.chunk_size
        last = entry.chunks - 1 if last is None else last
        aead = self._keys.entry_aead(entry.index)
        bufs = [bytearray(cs + fmt.TAG_LEN), bytearray(cs + fmt.TAG_LEN)]
        # AES-GCM holds the GIL, so it runs on its own thread while this one reads the next
        # chunk and hashes this one (both release the GIL).
        aes: Stage[_AesJob, None] | None = Stage(_aes_call) if last > first else None

        def load(j: int) -> memoryview:
            view = memoryview(bufs[j % 2])[: entry.chunk_plain_len(j, cs) + fmt.TAG_LEN]
            self._source.readinto_at(entry.chunk_offset(j, cs), view)
            return view

        try:
            cview = load(first)
            pos = 0
            for j in range(first, last + 1):
                n = len(cview) - fmt.TAG_LEN
                dest = out[pos : pos + n]
                job: _AesJob = (aead.decrypt_into, crypto.chunk_nonce(j, j == entry.chunks - 1), cview, dest)
                if aes is not None:
                    aes.put(job)
                digest = crypto.chunk_hash(cview) if self._check_hashes else None
                nxt = load(j + 1) if j < last else None
                try:
                    aes.get() if aes is not None else _aes_call(job)
                except InvalidTag:
                    dest[:] = bytes(n)
                    raise IntegrityError() from None
                if digest is not None:
                    k = entry.first_chunk + j
                    if not hmac.compare_digest(digest, self._table[k * 32 : (k + 1) * 32]):
                        dest[:] = bytes(n)
                        raise IntegrityError()
                yield j, dest
                pos += n
                if nxt is not None:
                    cview = nxt
        finally:
            if aes is not None:
                aes.close()

    def read_into(self, path: str | None, buffer: Any, *, progress: Progress | None = None) -> int:
        """Decrypt a whole file into ``buffer``: any writable buffer (bytearray, memoryview,
        numpy array, mmap) of at least the file's size.

        On failure the buffer is zeroed and the error raised, so a caller never
        keeps unauthenticated plaintext. Returns the number of bytes written.
        """
        entry = self._entry(path)
        view = memoryview(buffer).cast("B")
        if view.readonly or len(view) < entry.size:
            raise ValueError(f"buffer must be writable and hold {entry.size} bytes")
        out = view[: entry.size]
        try:
            for _, chunk in self._chunks(entry, out):
                if progress:
                    progress(len(chunk))
        except BaseException:
            out[:] = bytes(entry.size)
            raise
        return entry.size

    def _decrypt_to_fd(self, path: str, fd: int) -> None:
        """Decrypt a whole file into the file descriptor ``fd`` (an in-memory file) with pwrite.

        Writing through the kernel fills shared-memory pages about twice as fast as
        faulting them in through a mapping. On failure the file is truncated to zero,
        so no unauthenticated or partial plaintext stays in it.
        """
        entry = self._entry(path)
        cs = self._header.chunk_size

        def pwrite(j: int, chunk: memoryview) -> None:
            done = 0
            while done < len(chunk):
                done += os.pwrite(fd, chunk[done:], j * cs + done)

        try:
            self._drain(entry, pwrite, None)
        except BaseException:
            os.ftruncate(fd, 0)
            raise

    def _drain(self, entry: fmt.Entry, write: Callable[[int, memoryview], object], progress: Progress | None) -> None:
        """Decrypt ``entry`` chunk by chunk and hand each to ``write(index, chunk)`` on a second thread."""
        cs = self._header.chunk_size
        window = _ChunkWindow(bytearray(cs * _RING), cs, _RING)

        def call(item: tuple[int, memoryview]) -> None:
            write(*item)

        with Stage(call) as writer:
            for j, chunk in self._chunks(entry, window):
                writer.put((j, chunk))
                if progress:
                    progress(len(chunk))
                while writer.pending > _RING - 1:  # the next chunk decrypts into the oldest slot
                    writer.get()
            while writer.pending:
                writer.get()

    def read(self, path: str | None = None, *, progress: Progress | None = None) -> bytearray:
        """Decrypt a whole file into a new ``bytearray`` (the caller may wipe it after use)."""
        entry = self._entry(path)
        buf = bytearray(entry.size)
        self.read_into(entry.path, buf, progress=progress)
        return buf

    def read_chunk(self, path: str | None, index: int) -> bytes:
        """Random access: decrypt chunk ``index`` of a file on its own."""
        entry = self._entry(path)
        if not 0 <= index < entry.chunks:
            raise IndexError(f"chunk {index} out of range (file has {entry.chunks})")
        buf = bytearray(entry.chunk_plain_len(index, self._header.chunk_size))
        for _ in self._chunks(entry, memoryview(buf), index, index):
            pass
        return bytes(buf)

    def open_file(self, path: str | None = None) -> io.BufferedReader:
        """A streaming reader: chunks are authenticated one by one as they are read.

        A truncated or tampered file raises IntegrityError at the first bad chunk;
        the bytes returned before it were authentic, but may be only a prefix of
        the file until the reader reaches its end.
        """
        return io.BufferedReader(_EntryReader(self, self._entry(path)), buffer_size=self._header.chunk_size)

    def extract(self, dst: PathLike, *, progress: Progress | None = None) -> list[Path]:
        """Write the plaintext files under ``dst`` (for publishers; loaders never do this).

        A single-file container is written to ``dst`` itself; a directory container
        into the new directory ``dst``. Written under a temporary name and renamed
        only when every byte authenticated; on failure nothing is left behind.
        """
        dst = Path(dst)
        if dst.exists():
            raise FileExistsError(f"{dst} exists; refusing to overwrite it")
        single = len(self._header.entries) == 1 and "/" not in self.files[0]
        tmp = dst.with_name(f".{dst.name}.{os.urandom(6).hex()}.tmp")
        try:
            if single:
                self._write_entry(self._header.entries[0], tmp, progress)
                os.replace(tmp, dst)
                return [dst]
            tmp.mkdir()
            written = []
            for entry in self._header.entries:
                target = tmp.joinpath(*entry.path.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                self._write_entry(entry, target, progress)
                written.append(dst.joinpath(*entry.path.split("/")))
            os.replace(tmp, dst)
            return written
        except BaseException:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            raise

    def _write_entry(self, entry: fmt.Entry, target: Path, progress: Progress | None) -> None:
        sink = FileSink(target, entry.size, mode=0o600)  # plaintext: owner only
        try:
            self._drain(entry, lambda _, chunk: sink.write(chunk), progress)
        except BaseException:
            sink.abort()
            raise
        sink.close()

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> SealedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SealedModel {self.info.paths[0]} files={len(self.files)} format={self.model_format}>"


class _ChunkWindow:
    """Maps the chunks of a stream onto ``slots`` reusable chunk buffers, round robin."""

    def __init__(self, buf: bytearray, chunk_size: int, slots: int = 1) -> None:
        self._view = memoryview(buf)
        self._cs = chunk_size
        self._slots = slots

    def __getitem__(self, s: slice) -> memoryview:
        start = (s.start // self._cs % self._slots) * self._cs
        return self._view[start : start + (s.stop - s.start)]


class _EntryReader(io.RawIOBase):
    def __init__(self, model: SealedModel, entry: fmt.Entry) -> None:
        self._model = model
        self._entry = entry
        cs = model._header.chunk_size
        self._buf = bytearray(cs)
        self._chunks = model._chunks(entry, _ChunkWindow(self._buf, cs))
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._chunks.close()  # stops the hashing thread of an abandoned stream
        super().close()

    def readinto(self, b: Any) -> int:
        if not len(self._pending):
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._pending = nxt[1]
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def open_sealed(
    path: PathLike,
    *,
    identity: Unwrapper | Sequence[Unwrapper] | None = None,
    passphrase: str | bytes | None = None,
    require_signer: VerifyKey | str | None = None,
    keyserver: str | None = None,
    licence: str | None = None,
    grant_token: str | None = None,
) -> SealedModel:
    """Open a container for reading in memory (also exported as ``modelseal.open``).

    Args:
        path: The container, or the base name / any shard of a shard set.
        identity: One or more identities (or other unwrappers, e.g. ``modelseal.KeyServer(...)``) to try.
        passphrase: A passphrase to try.
        keyserver: Open through this key server (with ``licence``, or this device's activations).
        licence: A licence key for the key server (activates this device on first use).
        grant_token: A one-time grant token to redeem with ``keyserver`` instead of a licence.
        require_signer: Refuse the container unless this publisher key signed it;
            every chunk is then also checked against its signed hash as it is decrypted.

    Raises:
        WrongKeyError: None of the keys given opens the container.
        IntegrityError: The container was tampered with or is corrupt.
        SignatureError: ``require_signer`` was given and did not sign it.
        FormatError: The file is not a well-formed container.
        modelseal.LicenceError: The key server refused (licence or device revoked, ...).
    """
    if keyserver is not None or licence is not None or grant_token is not None:
        from .keyserver.client import KeyServerUnwrapper

        given = [] if identity is None and passphrase is None else as_unwrappers(identity, passphrase)
        unwrappers: list[Unwrapper] = [*given, KeyServerUnwrapper(keyserver, licence, grant_token=grant_token)]
    else:
        unwrappers = as_unwrappers(identity, passphrase)
    source = Source(path)
    try:
        header = fmt.parse_header(source.read_at, source.size)
        keys = _unlock(header, unwrappers)
        table = _read_table(source, header, keys)
        signer = _check_signature(header, table, require_signer) if require_signer is not None else None
        return SealedModel(source, header, keys, table, signer)
    except BaseException:
        source.close()
        raise


def inspect(path: PathLike) -> ContainerInfo:
    """Read a container's public header without a key (structure is checked, nothing authenticated)."""
    with Source(path) as source:
        return _info(source, fmt.parse_header(source.read_at, source.size))


def verify(path: PathLike, signer: VerifyKey | str, *, progress: Progress | None = None) -> ContainerInfo:
    """Check, without any decryption key, that ``signer`` published this container as it is.

    Verifies the Ed25519 signature over the manifest (metadata, entries, key
    commitment) and the chunk table, then hashes every ciphertext chunk against
    the table. Recipient stanzas are not signed (rewrap changes them) and are
    checked when the container is opened.

    Raises:
        SignatureError: Not signed by ``signer``, or anything signed was changed.
        FormatError: The file is not a well-formed container.
    """
    with Source(path) as source:
        header = fmt.parse_header(source.read_at, source.size)
        table = source.read_at(header.table_offset, header.total_chunks * fmt.HASH_LEN)
        key = _check_signature(header, table, signer)
        try:
            _check_payload(source, header, table, progress)
        except IntegrityError:
            raise SignatureError("container content does not match its signature") from None
        return _info(source, header, key)


def _payload_chunks(header: fmt.Header) -> Iterator[tuple[int, int]]:
    """(offset, length) of every ciphertext chunk, in chunk-table order."""
    cs = header.chunk_size
    for e in header.entries:
        for j in range(e.chunks):
            yield e.chunk_offset(j, cs), e.chunk_plain_len(j, cs) + fmt.TAG_LEN


def _check_payload(
    source: Source,
    header: fmt.Header,
    table: bytes,
    progress: Progress | None,
    sink: Callable[[memoryview], None] | None = None,
) -> None:
    """Hash every ciphertext chunk against the table on a second thread, optionally passing it on."""
    ring = [memoryview(bytearray(header.chunk_size + fmt.TAG_LEN)) for _ in range(_RING)]

    def settle(stage: Stage[memoryview, bytes], k: int) -> None:
        if not hmac.compare_digest(stage.get(), table[k * 32 : (k + 1) * 32]):
            raise IntegrityError()

    def hash_and_pass(view: memoryview) -> bytes:
        digest = crypto.chunk_hash(view)
        if sink is not None:
            sink(view)
        if progress:
            progress(len(view) - fmt.TAG_LEN)
        return digest

    with Stage(hash_and_pass) as stage:
        done = 0
        for k, (offset, n) in enumerate(_payload_chunks(header)):
            if stage.pending == _RING:
                settle(stage, done)
                done += 1
            view = ring[k % _RING][:n]
            source.readinto_at(offset, view)
            stage.put(view)
        while stage.pending:
            settle(stage, done)
            done += 1


def rewrap(
    path: PathLike,
    dst: PathLike | None = None,
    *,
    identity: Unwrapper | Sequence[Unwrapper] | None = None,
    passphrase: str | bytes | None = None,
    add: Sequence[Recipient | str] = (),
    remove: Sequence[Recipient | str] = (),
    new_passphrase: str | bytes | None = None,
    remove_passphrase: bool = False,
    scrypt_log_n: int = 18,
    shard_size: int | None = None,
    progress: Progress | None = None,
) -> ContainerInfo:
    """Add or remove recipients without re-encrypting the payload.

    Opens the header with ``identity``/``passphrase``, writes a new recipient set
    and header MAC, and copies the ciphertext as it is (checking every chunk
    against the chunk table on the way, so a damaged payload is not passed on).
    Publisher signatures stay valid: they cover the content, not who may open it.
    ``dst`` defaults to replacing ``path`` atomically.

    Raises:
        WrongKeyError, IntegrityError, FormatError: as for :func:`open_sealed`.
        ValueError: The result would have no recipients.
    """
    unwrappers = as_unwrappers(identity, passphrase)
    to_add = [as_recipient(r) for r in add]
    to_remove = [as_recipient(r) for r in remove]
    if new_passphrase is not None:
        to_add.append(PassphraseRecipient(new_passphrase, scrypt_log_n))
        remove_passphrase = True
    with Source(path) as source:
        header = fmt.parse_header(source.read_at, source.size)
        keys = _unlock(header, unwrappers)
        table = _read_table(source, header, keys)
        kept = [
            s
            for s in header.stanzas
            if not any(r.matches(s) for r in to_remove) and not (remove_passphrase and s["type"] == "scrypt")
        ]
        salt = b64decode(header.manifest["salt"])
        stanzas = kept + [r.wrap_for(keys.content_key, salt=salt, key_commitment=keys.commitment) for r in to_add]
        if not stanzas:
            raise ValueError("rewrap would leave the container with no recipients")
        fmt.validate_stanzas(stanzas)
        stanzas_bytes = dumps_canonical(stanzas)
        preamble = fmt.build_preamble(header.manifest_bytes, stanzas_bytes)
        header_mac = keys.header_mac(preamble)
        total = source.size - header.header_end + len(preamble) + fmt.MAC_LEN
        if dst is not None:
            target = Path(dst)
        elif len(source.paths) == 1:
            target = source.paths[0]
        else:  # rewrap a shard set in place, split the same way
            target = source.paths[0].with_name(source.paths[0].name.rsplit("-shard", 1)[0])
            shard_size = shard_size or source.paths[0].stat().st_size
        with AtomicOutput(target, total, shard_size) as out:
            out.write(preamble)
            out.write(header_mac)
            _check_payload(source, header, table, progress, sink=out.write)
            out.write(table)
            out.write(_U32.pack(len(header.signatures_bytes)))
            out.write(header.signatures_bytes)
            out.write(keys.trailer_mac(header_mac, table, header.signatures_bytes))
            out.commit()
    return inspect(target)
