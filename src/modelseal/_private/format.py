"""Byte layout of a modelseal v1 container: constants, limits and the header parser.

Everything here is structural: it runs before any key is known and raises
FormatError naming the spec rule a container breaks. See docs/spec/container-v1.md.

    preamble   magic(8) version(u16) flags(u16)
               manifest_len(u32) manifest(JSON)
               stanzas_len(u32)  stanzas(JSON)
               header_mac(32)
    payload    for each entry, for each chunk: ciphertext || tag(16)
    trailer    chunk_table(32 * total_chunks)
               signatures_len(u32) signatures(JSON)
               trailer_mac(32)

All integers are big-endian.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError
from .encoding import b64decode, loads_strict
from .paths import check_entry_path, check_entry_set

MAGIC = b"\x89MSEAL\r\n"
VERSION = 1
PREFIX_LEN = len(MAGIC) + 4  # magic, version, flags
MAC_LEN = 32
TAG_LEN = 16
HASH_LEN = 32
KEY_LEN = 32
SALT_LEN = 32

AEAD_NAME = "AES-256-GCM"
HASH_NAME = "BLAKE3"

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1 << 12
MAX_CHUNK_SIZE = 1 << 26

MAX_MANIFEST_LEN = 4 << 20
MAX_STANZAS_LEN = 1 << 20
MAX_SIGNATURES_LEN = 1 << 16
MAX_ENTRIES = 10_000
MAX_ENTRY_SIZE = 1 << 44
MAX_TOTAL_CHUNKS = 1 << 24
MAX_STANZAS = 256
MAX_SIGNATURES = 16
MAX_METADATA_FIELDS = 64
MAX_METADATA_VALUE = 8192
MAX_CREATED = 1 << 40
SCRYPT_MIN_LOG_N = 10
SCRYPT_MAX_LOG_N = 20

MODEL_FORMATS = ("onnx", "safetensors", "pytorch", "tfjs", "huggingface", "unknown")
METADATA_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
STANZA_TYPE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")

_U32 = struct.Struct(">I")


def n_chunks(size: int, chunk_size: int) -> int:
    """Chunks an entry of ``size`` bytes is split into (an empty entry still has one)."""
    return max(1, -(-size // chunk_size))


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    index: int
    first_chunk: int  # index of its first chunk in the chunk table
    chunks: int
    offset: int  # absolute file offset of its first ciphertext chunk

    def chunk_offset(self, chunk: int, chunk_size: int) -> int:
        return self.offset + chunk * (chunk_size + TAG_LEN)

    def chunk_plain_len(self, chunk: int, chunk_size: int) -> int:
        return min(chunk_size, self.size - chunk * chunk_size)


@dataclass(frozen=True)
class Header:
    """A parsed, structurally valid (not yet authenticated) container header."""

    version: int
    manifest_bytes: bytes
    manifest: dict[str, Any]
    stanzas_bytes: bytes
    stanzas: list[dict[str, Any]]
    header_mac: bytes
    header_end: int
    entries: tuple[Entry, ...]
    chunk_size: int
    total_chunks: int
    table_offset: int
    signatures_bytes: bytes
    signatures: list[dict[str, Any]]
    trailer_mac_offset: int
    total_size: int

    @property
    def signed_prefix(self) -> bytes:
        """Bytes the header MAC covers."""
        return build_preamble(self.manifest_bytes, self.stanzas_bytes)

    def entry(self, path: str) -> Entry:
        for e in self.entries:
            if e.path == path:
                return e
        raise KeyError(path)


def build_preamble(manifest_bytes: bytes, stanzas_bytes: bytes) -> bytes:
    return b"".join(
        [
            MAGIC,
            struct.pack(">HH", VERSION, 0),
            _U32.pack(len(manifest_bytes)),
            manifest_bytes,
            _U32.pack(len(stanzas_bytes)),
            stanzas_bytes,
        ]
    )


def layout_entries(sizes: list[tuple[str, int]], chunk_size: int, payload_offset: int) -> tuple[tuple[Entry, ...], int]:
    """Place entries in the payload; returns the entries and the total chunk count."""
    entries = []
    offset = payload_offset
    first = 0
    for index, (path, size) in enumerate(sizes):
        count = n_chunks(size, chunk_size)
        entries.append(Entry(path, size, index, first, count, offset))
        offset += size + count * TAG_LEN
        first += count
    return tuple(entries), first


# --- validation --------------------------------------------------------------------------


def _require(cond: bool, rule: str, message: str) -> None:
    if not cond:
        raise FormatError(rule, message)


def _int(value: object, field: str, lo: int, hi: int, rule: str = "schema") -> int:
    _require(isinstance(value, int) and not isinstance(value, bool), "schema", f"{field} must be an integer")
    assert isinstance(value, int)
    _require(lo <= value <= hi, rule, f"{field} = {value} is outside [{lo}, {hi}]")
    return value


def _fields(obj: object, required: set[str], where: str, optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    _require(isinstance(obj, dict), "schema", f"{where} must be a JSON object")
    assert isinstance(obj, dict)
    keys = set(obj)
    missing = required - keys
    extra = keys - required - optional
    _require(not missing, "schema", f"{where} is missing {sorted(missing)}")
    _require(not extra, "schema", f"{where} has unknown fields {sorted(extra)}")
    return obj


_MANIFEST_FIELDS = {
    "version",
    "aead",
    "chunk_hash",
    "chunk_size",
    "salt",
    "key_commitment",
    "created",
    "model_format",
    "entries",
    "metadata",
}


def validate_manifest(manifest: object) -> dict[str, Any]:
    m = _fields(manifest, _MANIFEST_FIELDS, "manifest")
    _require(m["version"] == VERSION and type(m["version"]) is int, "version", "manifest version must be 1")
    _require(m["aead"] == AEAD_NAME, "schema", f"manifest aead must be {AEAD_NAME!r}")
    _require(m["chunk_hash"] == HASH_NAME, "schema", f"manifest chunk_hash must be {HASH_NAME!r}")
    cs = _int(m["chunk_size"], "chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE, "chunk-size")
    _require(cs & (cs - 1) == 0, "chunk-size", f"chunk_size {cs} is not a power of two")
    b64decode(m["salt"], length=SALT_LEN, field="salt")
    b64decode(m["key_commitment"], length=KEY_LEN, field="key_commitment")
    _int(m["created"], "created", 0, MAX_CREATED)
    _require(m["model_format"] in MODEL_FORMATS, "schema", f"model_format must be one of {MODEL_FORMATS}")
    entries = m["entries"]
    _require(isinstance(entries, list), "schema", "entries must be a list")
    _require(1 <= len(entries) <= MAX_ENTRIES, "limits", f"a container holds 1 to {MAX_ENTRIES} entries")
    total = 0
    for i, e in enumerate(entries):
        e = _fields(e, {"path", "size"}, f"entries[{i}]")
        check_entry_path(e["path"])
        size = _int(e["size"], f"entries[{i}].size", 0, MAX_ENTRY_SIZE, "limits")
        total += n_chunks(size, cs)
    _require(total <= MAX_TOTAL_CHUNKS, "limits", f"container has more than {MAX_TOTAL_CHUNKS} chunks")
    check_entry_set(e["path"] for e in entries)
    md = m["metadata"]
    _require(isinstance(md, dict), "schema", "metadata must be a JSON object")
    _require(len(md) <= MAX_METADATA_FIELDS, "limits", f"metadata has more than {MAX_METADATA_FIELDS} fields")
    for key, value in md.items():
        _require(bool(METADATA_KEY.fullmatch(key)), "schema", f"metadata key {key!r} must match {METADATA_KEY.pattern}")
        _require(isinstance(value, str), "schema", f"metadata value of {key!r} must be a string")
        _require(len(value) <= MAX_METADATA_VALUE, "limits", f"metadata value of {key!r} is too long")
    return m


def validate_stanzas(stanzas: object) -> list[dict[str, Any]]:
    _require(isinstance(stanzas, list), "schema", "stanzas section must be a JSON list")
    assert isinstance(stanzas, list)
    _require(1 <= len(stanzas) <= MAX_STANZAS, "recipients", f"a container has 1 to {MAX_STANZAS} recipient stanzas")
    scrypt = 0
    for i, s in enumerate(stanzas):
        where = f"stanzas[{i}]"
        _require(isinstance(s, dict) and isinstance(s.get("type"), str), "schema", f"{where} needs a string 'type'")
        kind = s["type"]
        _require(bool(STANZA_TYPE.fullmatch(kind)), "schema", f"{where} type {kind!r} is malformed")
        if kind == "x25519":
            _fields(s, {"type", "kid", "epk", "body"}, where)
            b64decode(s["kid"], length=8, field=f"{where}.kid")
            b64decode(s["epk"], length=32, field=f"{where}.epk")
            b64decode(s["body"], length=KEY_LEN + TAG_LEN, field=f"{where}.body")
        elif kind == "scrypt":
            scrypt += 1
            _fields(s, {"type", "salt", "log_n", "body"}, where)
            b64decode(s["salt"], length=16, field=f"{where}.salt")
            _int(s["log_n"], f"{where}.log_n", SCRYPT_MIN_LOG_N, SCRYPT_MAX_LOG_N, "scrypt-work-factor")
            b64decode(s["body"], length=KEY_LEN + TAG_LEN, field=f"{where}.body")
        else:
            # Unknown stanza types are kept and skipped, so newer recipient kinds
            # (the key server's, for instance) don't break older readers.
            _require(len(s) <= 16, "schema", f"{where} has too many fields")
            for key, value in s.items():
                _require(
                    isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)),
                    "schema",
                    f"{where}.{key} must be a string or an integer",
                )
    _require(scrypt <= 1, "recipients", "a container has at most one passphrase stanza")
    return stanzas


def validate_signatures(sigs: object) -> list[dict[str, Any]]:
    _require(isinstance(sigs, list), "schema", "signatures section must be a JSON list")
    assert isinstance(sigs, list)
    _require(len(sigs) <= MAX_SIGNATURES, "signatures", f"a container carries at most {MAX_SIGNATURES} signatures")
    for i, s in enumerate(sigs):
        _fields(s, {"alg", "public_key", "signature"}, f"signatures[{i}]")
        _require(s["alg"] == "ed25519", "schema", f"signatures[{i}].alg must be 'ed25519'")
        b64decode(s["public_key"], length=32, field=f"signatures[{i}].public_key")
        b64decode(s["signature"], length=64, field=f"signatures[{i}].signature")
    return sigs


# --- parsing -----------------------------------------------------------------------------

ReadAt = Callable[[int, int], bytes]


def parse_header(read_at: ReadAt, total_size: int) -> Header:
    """Parse and structurally validate everything but the payload.

    ``read_at(offset, n)`` must return exactly ``n`` bytes; the caller guarantees
    ``offset + n <= total_size`` is checked here first.
    """

    def need(end: int) -> None:
        if end > total_size:
            raise FormatError("truncated", f"container ends at byte {total_size}, expected at least {end}")

    if total_size < len(MAGIC) or read_at(0, len(MAGIC)) != MAGIC:
        raise FormatError("magic", "not a modelseal container (bad magic bytes)")
    need(PREFIX_LEN + 4)
    version, flags = struct.unpack(">HH", read_at(len(MAGIC), 4))
    _require(version == VERSION, "version", f"unsupported container version {version}")
    _require(flags == 0, "flags", f"reserved flags are set ({flags:#06x})")

    pos = PREFIX_LEN
    (mlen,) = _U32.unpack(read_at(pos, 4))
    _require(0 < mlen <= MAX_MANIFEST_LEN, "section-size", f"manifest length {mlen} is outside (0, {MAX_MANIFEST_LEN}]")
    pos += 4
    need(pos + mlen + 4)
    manifest_bytes = read_at(pos, mlen)
    pos += mlen
    (slen,) = _U32.unpack(read_at(pos, 4))
    _require(0 < slen <= MAX_STANZAS_LEN, "section-size", f"stanzas length {slen} is outside (0, {MAX_STANZAS_LEN}]")
    pos += 4
    need(pos + slen + MAC_LEN)
    stanzas_bytes = read_at(pos, slen)
    pos += slen
    header_mac = read_at(pos, MAC_LEN)
    header_end = pos + MAC_LEN

    manifest = validate_manifest(loads_strict(manifest_bytes, section="manifest"))
    stanzas = validate_stanzas(loads_strict(stanzas_bytes, section="stanzas"))

    chunk_size = manifest["chunk_size"]
    entries, total_chunks = layout_entries(
        [(e["path"], e["size"]) for e in manifest["entries"]], chunk_size, header_end
    )
    table_offset = entries[-1].offset + entries[-1].size + entries[-1].chunks * TAG_LEN
    sig_len_offset = table_offset + total_chunks * HASH_LEN
    need(sig_len_offset + 4 + MAC_LEN)
    (siglen,) = _U32.unpack(read_at(sig_len_offset, 4))
    _require(0 < siglen <= MAX_SIGNATURES_LEN, "section-size", f"signatures length {siglen} is out of range")
    trailer_mac_offset = sig_len_offset + 4 + siglen
    need(trailer_mac_offset + MAC_LEN)
    _require(
        total_size == trailer_mac_offset + MAC_LEN,
        "trailing-data",
        f"{total_size - trailer_mac_offset - MAC_LEN} bytes follow the trailer",
    )
    signatures_bytes = read_at(sig_len_offset + 4, siglen)
    signatures = validate_signatures(loads_strict(signatures_bytes, section="signatures"))

    return Header(
        version=version,
        manifest_bytes=manifest_bytes,
        manifest=manifest,
        stanzas_bytes=stanzas_bytes,
        stanzas=stanzas,
        header_mac=header_mac,
        header_end=header_end,
        entries=entries,
        chunk_size=chunk_size,
        total_chunks=total_chunks,
        table_offset=table_offset,
        signatures_bytes=signatures_bytes,
        signatures=signatures,
        trailer_mac_offset=trailer_mac_offset,
        total_size=total_size,
    )


def container_size(header_end: int, sizes: list[int], chunk_size: int, signatures_len: int) -> int:
    """Total size of a container, known before any payload byte is written."""
    chunks = sum(n_chunks(s, chunk_size) for s in sizes)
    payload = sum(sizes) + chunks * TAG_LEN
    return header_end + payload + chunks * HASH_LEN + 4 + signatures_len + MAC_LEN
