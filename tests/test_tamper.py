"""Every modification of a container is refused with a typed error, and releases nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import modelseal
from modelseal import FormatError, Identity, IntegrityError, ModelSealError, SigningKey
from modelseal._private import format as fmt
from modelseal._private.io import Source

from .conftest import SMALL_CHUNK, SealFn


def _header(path: Path) -> fmt.Header:
    with Source(path) as s:
        return fmt.parse_header(s.read_at, s.size)


def _refused(path: Path, **kw: object) -> ModelSealError:
    """Open and read everything; the attempt must fail with a modelseal error."""
    with pytest.raises(ModelSealError) as caught, modelseal.open(path, **kw) as model:  # type: ignore[arg-type]
        for f in model.files:
            model.read(f)
    return caught.value


@pytest.fixture
def small(seal_bytes: SealFn, signer: SigningKey) -> Path:
    """Two files of two chunks each plus metadata and a signature: every section present, ~17 KiB."""
    return seal_bytes(os.urandom(SMALL_CHUNK + 50), signer=signer, metadata={"owner": "Example"})


def test_every_single_bit_flip_is_refused(small: Path, identity: Identity, tmp_path: Path) -> None:
    """Flip each bit of the header and trailer, and one bit of every payload byte (exhaustive by byte)."""
    data = small.read_bytes()
    h = _header(small)
    target = tmp_path / "flipped.mseal"
    positions = list(range(len(data)))
    for pos in positions:
        bits = range(8) if pos < h.header_end or pos >= h.table_offset else [pos % 8]
        for bit in bits:
            mutated = bytearray(data)
            mutated[pos] ^= 1 << bit
            target.write_bytes(mutated)
            err = _refused(target, identity=identity)
            assert isinstance(err, (FormatError, IntegrityError, modelseal.WrongKeyError)), (pos, bit, err)


def test_bit_flips_in_signed_content_fail_keyless_verification(small: Path, signer: SigningKey, tmp_path: Path) -> None:
    data = small.read_bytes()
    h = _header(small)
    target = tmp_path / "flipped.mseal"
    manifest_start = fmt.PREFIX_LEN + 4
    signed_ranges = [
        range(manifest_start, manifest_start + len(h.manifest_bytes)),
        range(h.header_end, h.trailer_mac_offset),
    ]
    for r in signed_ranges:
        for pos in r:
            mutated = bytearray(data)
            mutated[pos] ^= 1 << (pos % 8)
            target.write_bytes(mutated)
            with pytest.raises((FormatError, modelseal.SignatureError)):
                modelseal.verify(target, signer.verify_key)


def test_truncation_at_every_length_is_refused(small: Path, identity: Identity, tmp_path: Path) -> None:
    data = small.read_bytes()
    target = tmp_path / "cut.mseal"
    for n in range(len(data)):
        target.write_bytes(data[:n])
        with pytest.raises(FormatError) as caught:
            modelseal.open(target, identity=identity)
        assert caught.value.rule in {"magic", "truncated", "section-size", "json", "schema"}


@pytest.mark.parametrize("extra", [b"\x00", b"x" * 16, os.urandom(SMALL_CHUNK + 16)])
def test_appended_bytes_are_refused(small: Path, identity: Identity, extra: bytes) -> None:
    small.write_bytes(small.read_bytes() + extra)
    with pytest.raises(FormatError) as caught:
        modelseal.open(small, identity=identity)
    assert caught.value.rule == "trailing-data"


def _chunk(data: bytes, h: fmt.Header, entry: int, chunk: int) -> slice:
    e = h.entries[entry]
    start = e.chunk_offset(chunk, h.chunk_size)
    return slice(start, start + e.chunk_plain_len(chunk, h.chunk_size) + fmt.TAG_LEN)


@pytest.fixture
def twins(tmp_path: Path, identity: Identity) -> Path:
    """Two entries of identical size (two full chunks each), so chunks can be spliced between them."""
    src = tmp_path / "twins"
    src.mkdir()
    for name in ("a.bin", "b.bin"):
        (src / name).write_bytes(os.urandom(2 * SMALL_CHUNK))
    dst = tmp_path / "twins.mseal"
    modelseal.seal(src, dst, recipients=[identity.recipient], chunk_size=SMALL_CHUNK)
    return dst


def _rewrite(path: Path, edit: object) -> None:
    data = path.read_bytes()
    h = _header(path)
    buf = bytearray(data)
    edit(buf, data, h)  # type: ignore[operator]
    path.write_bytes(bytes(buf))


def test_reordered_chunks_are_refused(twins: Path, identity: Identity) -> None:
    def swap(buf: bytearray, data: bytes, h: fmt.Header) -> None:
        a, b = _chunk(data, h, 0, 0), _chunk(data, h, 0, 1)
        buf[a], buf[b] = data[b], data[a]

    _rewrite(twins, swap)
    assert isinstance(_refused(twins, identity=identity), IntegrityError)


def test_duplicated_chunk_is_refused(twins: Path, identity: Identity) -> None:
    def dup(buf: bytearray, data: bytes, h: fmt.Header) -> None:
        buf[_chunk(data, h, 0, 1)] = data[_chunk(data, h, 0, 0)]

    _rewrite(twins, dup)
    assert isinstance(_refused(twins, identity=identity), IntegrityError)


def test_chunks_spliced_between_entries_are_refused(twins: Path, identity: Identity) -> None:
    def splice(buf: bytearray, data: bytes, h: fmt.Header) -> None:
        buf[_chunk(data, h, 1, 0)] = data[_chunk(data, h, 0, 0)]

    _rewrite(twins, splice)
    assert isinstance(_refused(twins, identity=identity), IntegrityError)


def test_whole_entries_swapped_are_refused(twins: Path, identity: Identity) -> None:
    def swap(buf: bytearray, data: bytes, h: fmt.Header) -> None:
        for c in range(2):
            a, b = _chunk(data, h, 0, c), _chunk(data, h, 1, c)
            buf[a], buf[b] = data[b], data[a]

    _rewrite(twins, swap)
    assert isinstance(_refused(twins, identity=identity), IntegrityError)


def test_chunks_spliced_between_containers_are_refused(tmp_path: Path, twins: Path, identity: Identity) -> None:
    other = tmp_path / "other.mseal"
    modelseal.seal(tmp_path / "twins", other, recipients=[identity.recipient], chunk_size=SMALL_CHUNK)
    od, oh = other.read_bytes(), _header(other)

    def splice(buf: bytearray, data: bytes, h: fmt.Header) -> None:
        buf[_chunk(data, h, 0, 1)] = od[_chunk(od, oh, 0, 1)]

    _rewrite(twins, splice)
    assert isinstance(_refused(twins, identity=identity), IntegrityError)


def test_header_swapped_between_containers_is_refused(tmp_path: Path, twins: Path, identity: Identity) -> None:
    """Same plaintext, same key holder, same layout: the other container's header still doesn't fit."""
    other = tmp_path / "other.mseal"
    modelseal.seal(tmp_path / "twins", other, recipients=[identity.recipient], chunk_size=SMALL_CHUNK)
    h = _header(twins)
    oh = _header(other)
    twins.write_bytes(other.read_bytes()[: oh.header_end] + twins.read_bytes()[h.header_end :])
    assert isinstance(_refused(twins, identity=identity), IntegrityError)


def test_a_failing_read_into_zeroes_the_callers_buffer(small: Path, identity: Identity) -> None:
    h = _header(small)
    data = bytearray(small.read_bytes())
    data[h.entries[0].chunk_offset(1, h.chunk_size) + 3] ^= 0x40  # damage the second chunk
    small.write_bytes(data)
    with modelseal.open(small, identity=identity) as model:
        buf = bytearray(b"\xaa" * model.size())
        with pytest.raises(IntegrityError):
            model.read_into(None, buf)
        assert buf == bytearray(len(buf)), "unauthenticated or partial plaintext was left in the buffer"


def test_stream_reader_stops_at_the_first_bad_chunk(small: Path, identity: Identity) -> None:
    h = _header(small)
    data = bytearray(small.read_bytes())
    data[h.entries[0].chunk_offset(1, h.chunk_size) + 3] ^= 0x40
    small.write_bytes(data)
    with modelseal.open(small, identity=identity) as model, model.open_file() as f:
        assert len(f.read(100)) == 100  # first chunk is authentic
        with pytest.raises(IntegrityError):
            f.read()


def test_signed_hash_mismatch_is_caught_during_decryption(small: Path, identity: Identity, signer: SigningKey) -> None:
    """require_signer checks each chunk's signed hash in the decryption pass itself."""
    from modelseal._private import crypto

    with modelseal.open(small, identity=identity, require_signer=signer.verify_key) as model:
        model._table = crypto.chunk_hash(b"not this chunk") + model._table[32:]  # type: ignore[attr-defined]
        buf = bytearray(model.size())
        with pytest.raises(IntegrityError):
            model.read_into(None, buf)
        assert buf == bytearray(len(buf))
