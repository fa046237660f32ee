"""Sealing and opening: files, directories, shards, recipients, random access, streaming, rewrap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import modelseal
from modelseal import FormatError, Identity, IntegrityError, WrongKeyError

from .conftest import SMALL_CHUNK, SealFn, read_all, tree


@pytest.mark.parametrize(
    "size",
    [0, 1, SMALL_CHUNK - 1, SMALL_CHUNK, SMALL_CHUNK + 1, 3 * SMALL_CHUNK, 5 * SMALL_CHUNK + 7],
)
def test_single_file_roundtrip_at_chunk_boundaries(seal_bytes: SealFn, identity: Identity, size: int) -> None:
    data = os.urandom(size)
    assert read_all(seal_bytes(data), identity=identity) == {"model.bin": data}


def test_directory_roundtrip_keeps_every_file(tmp_path: Path, model_dir: Path, identity: Identity) -> None:
    info = modelseal.seal(model_dir, tmp_path / "m.mseal", recipients=[identity.recipient], chunk_size=SMALL_CHUNK)
    assert [e.path for e in info.entries] == ["config.json", "model.safetensors", "tokenizer/vocab.txt"]
    assert info.model_format == "huggingface"
    assert read_all(tmp_path / "m.mseal", identity=identity) == tree(model_dir)


def test_extract_writes_the_tree_and_refuses_to_overwrite(tmp_path: Path, model_dir: Path, identity: Identity) -> None:
    modelseal.seal(model_dir, tmp_path / "m.mseal", recipients=[identity.recipient], chunk_size=SMALL_CHUNK)
    with modelseal.open(tmp_path / "m.mseal", identity=identity) as model:
        model.extract(tmp_path / "out")
        assert tree(tmp_path / "out") == tree(model_dir)
        with pytest.raises(FileExistsError):
            model.extract(tmp_path / "out")


def test_random_access_and_streaming_match_the_plaintext(seal_bytes: SealFn, identity: Identity) -> None:
    data = os.urandom(4 * SMALL_CHUNK + 100)
    with modelseal.open(seal_bytes(data), identity=identity) as model:
        for i in range(5):
            assert model.read_chunk(None, i) == data[i * SMALL_CHUNK : (i + 1) * SMALL_CHUNK]
        with pytest.raises(IndexError):
            model.read_chunk(None, 5)
        with model.open_file() as f:
            assert f.read(10) == data[:10]
            assert f.read() == data[10:]
        buf = bytearray(len(data) + 5)
        assert model.read_into(None, buf) == len(data)
        assert bytes(buf[: len(data)]) == data


def test_metadata_is_public_and_authenticated(seal_bytes: SealFn, identity: Identity) -> None:
    meta = {"owner": "Example Corp", "copyright": "(c) 2026", "license": "fleet A", "x-build": "42"}
    path = seal_bytes(b"weights", metadata=meta)
    assert dict(modelseal.inspect(path).metadata) == meta
    with modelseal.open(path, identity=identity) as model:
        assert dict(model.metadata) == meta


@pytest.mark.parametrize("bad", [{"Owner": "x"}, {"owner": 1}, {"o" * 65: "x"}, {"owner": "x" * 9000}])
def test_bad_metadata_is_refused_before_writing(tmp_path: Path, seal_bytes: SealFn, bad: dict[str, object]) -> None:
    with pytest.raises(FormatError):
        seal_bytes(b"x", metadata=bad)
    assert not list(tmp_path.glob("*.mseal*"))


def test_several_recipients_and_a_passphrase_each_open_it(
    seal_bytes: SealFn, identity: Identity, other_identity: Identity
) -> None:
    path = seal_bytes(
        b"shared", recipients=[identity.recipient, str(other_identity.recipient)], passphrase="pw", scrypt_log_n=10
    )
    for kw in ({"identity": identity}, {"identity": other_identity}, {"passphrase": "pw"}):
        assert read_all(path, **kw) == {"model.bin": b"shared"}
    with pytest.raises(WrongKeyError):
        read_all(path, identity=Identity.generate())
    with pytest.raises(WrongKeyError):
        read_all(path, passphrase="wrong")


def test_seal_needs_a_recipient(tmp_path: Path) -> None:
    (tmp_path / "m").write_bytes(b"x")
    with pytest.raises(ValueError, match="recipient"):
        modelseal.seal(tmp_path / "m", tmp_path / "m.mseal")
    with pytest.raises(ValueError, match="chunk_size"):
        modelseal.seal(tmp_path / "m", tmp_path / "m.mseal", passphrase="x", chunk_size=1000)


def test_sharded_container_roundtrip_and_missing_shard(tmp_path: Path, model_dir: Path, identity: Identity) -> None:
    info = modelseal.seal(
        model_dir, tmp_path / "m.mseal", recipients=[identity.recipient], chunk_size=SMALL_CHUNK, shard_size=5000
    )
    shards = sorted(tmp_path.glob("m.mseal-shard*"))
    assert len(shards) == len(info.paths) > 1
    assert all(p.stat().st_size <= 5000 for p in shards)
    assert read_all(tmp_path / "m.mseal", identity=identity) == tree(model_dir)
    assert read_all(shards[1], identity=identity) == tree(model_dir)  # any shard names the set
    shards[1].unlink()
    with pytest.raises(FormatError) as caught:
        modelseal.open(tmp_path / "m.mseal", identity=identity)
    assert caught.value.rule == "shard-set"


def test_shards_in_the_wrong_order_are_refused(tmp_path: Path, model_dir: Path, identity: Identity) -> None:
    modelseal.seal(
        model_dir, tmp_path / "m.mseal", recipients=[identity.recipient], chunk_size=SMALL_CHUNK, shard_size=5000
    )
    a, b = tmp_path / "m.mseal-shard2of3", tmp_path / "m.mseal-shard3of3"
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    with pytest.raises((FormatError, IntegrityError)):
        read_all(tmp_path / "m.mseal", identity=identity)


def test_reseal_with_fewer_shards_removes_stale_ones(tmp_path: Path, model_dir: Path, identity: Identity) -> None:
    kw = {"recipients": [identity.recipient], "chunk_size": SMALL_CHUNK}
    modelseal.seal(model_dir, tmp_path / "m.mseal", shard_size=4096, **kw)  # type: ignore[arg-type]
    modelseal.seal(model_dir, tmp_path / "m.mseal", shard_size=8192, **kw)  # type: ignore[arg-type]
    assert read_all(tmp_path / "m.mseal", identity=identity) == tree(model_dir)


def test_failed_seal_leaves_nothing(tmp_path: Path, identity: Identity) -> None:
    src = tmp_path / "bad"
    (src / "sub").mkdir(parents=True)
    (src / "ok.bin").write_bytes(b"x")
    (src / "sub" / "CON.txt").write_bytes(b"reserved name on Windows")
    with pytest.raises(FormatError):
        modelseal.seal(src, tmp_path / "out.mseal", recipients=[identity.recipient])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_rewrap_adds_and_removes_recipients_without_touching_the_payload(
    seal_bytes: SealFn, identity: Identity, other_identity: Identity, signer: modelseal.SigningKey
) -> None:
    data = os.urandom(3 * SMALL_CHUNK)
    path = seal_bytes(data, signer=signer)
    modelseal.rewrap(path, identity=identity, add=[other_identity.recipient], remove=[identity.recipient])
    assert read_all(path, identity=other_identity) == {"model.bin": data}
    with pytest.raises(WrongKeyError):
        read_all(path, identity=identity)
    # the publisher's signature carries over: it covers the content, not the recipients
    assert modelseal.verify(path, signer.verify_key).verified_signer == str(signer.verify_key)
    with pytest.raises(ValueError, match="no recipients"):
        modelseal.rewrap(path, identity=other_identity, remove=[other_identity.recipient])


def test_rewrap_keeps_ciphertext_bytes(seal_bytes: SealFn, identity: Identity, other_identity: Identity) -> None:
    from modelseal._private import format as fmt
    from modelseal._private.io import Source

    def payload(p: Path) -> bytes:
        with Source(p) as s:
            h = fmt.parse_header(s.read_at, s.size)
            return s.read_at(h.header_end, h.trailer_mac_offset - h.header_end)

    path = seal_bytes(os.urandom(2 * SMALL_CHUNK))
    before = payload(path)
    modelseal.rewrap(path, identity=identity, add=[other_identity.recipient])
    assert payload(path) == before


def test_passphrase_change_via_rewrap(seal_bytes: SealFn) -> None:
    path = seal_bytes(b"p", recipients=[], passphrase="old", scrypt_log_n=10)
    modelseal.rewrap(path, passphrase="old", new_passphrase="new", scrypt_log_n=10)
    assert read_all(path, passphrase="new") == {"model.bin": b"p"}
    with pytest.raises(WrongKeyError):
        read_all(path, passphrase="old")


def test_unknown_stanza_types_are_skipped(seal_bytes: SealFn, identity: Identity) -> None:
    """The extension point: a recipient kind this reader doesn't know must not stop others opening."""

    class FutureRecipient(modelseal.Recipient):
        def wrap(self, content_key: bytes, random_bytes: object = None) -> dict[str, object]:
            return {"type": "keyserver", "url": "https://keys.example", "model": "m-1"}

    path = seal_bytes(b"future", recipients=[FutureRecipient(), identity.recipient])
    assert [r["type"] for r in modelseal.inspect(path).recipients] == ["keyserver", "x25519"]
    assert read_all(path, identity=identity) == {"model.bin": b"future"}


def test_model_format_detection(tmp_path: Path, identity: Identity) -> None:
    from modelseal.container import detect_format

    assert detect_format(["model.onnx", "model.onnx.data"]) == "onnx"
    assert detect_format(["model.safetensors"]) == "safetensors"
    assert detect_format(["model.json", "group1-shard1of2", "group1-shard2of2"]) == "tfjs"
    assert detect_format(["config.json", "model-00001-of-00002.safetensors", "tokenizer.json"]) == "huggingface"
    assert detect_format(["weights.pt"]) == "pytorch"
    assert detect_format(["notes.txt"]) == "unknown"


def test_open_needs_a_key_argument(seal_bytes: SealFn) -> None:
    with pytest.raises(ValueError, match="identity or a passphrase"):
        modelseal.open(seal_bytes(b"x"))
