from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import modelseal
from modelseal import Identity, SigningKey

SMALL_CHUNK = 4096


@pytest.fixture(scope="session")
def identity() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="session")
def other_identity() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="session")
def signer() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A small Hugging Face-style folder: config, a multi-chunk weights file, an empty file."""
    d = tmp_path / "model"
    (d / "tokenizer").mkdir(parents=True)
    (d / "config.json").write_text('{"hidden_size": 8}\n')
    (d / "model.safetensors").write_bytes(os.urandom(3 * SMALL_CHUNK + 123))
    (d / "tokenizer" / "vocab.txt").write_bytes(b"")
    return d


SealFn = Callable[..., Path]


@pytest.fixture
def seal_bytes(tmp_path: Path, identity: Identity) -> SealFn:
    """Seal ``data`` as one file and return the container path."""
    counter = {"n": 0}

    def _seal(data: bytes, name: str = "model.bin", **kw: object) -> Path:
        counter["n"] += 1
        src_dir = tmp_path / f"src{counter['n']}"
        src_dir.mkdir()
        src = src_dir / name
        src.write_bytes(data)
        dst = tmp_path / f"c{counter['n']}.mseal"
        kw.setdefault("recipients", [identity.recipient])
        kw.setdefault("chunk_size", SMALL_CHUNK)
        modelseal.seal(src, dst, **kw)  # type: ignore[arg-type]
        return dst

    return _seal


def read_all(path: Path, **kw: object) -> dict[str, bytes]:
    with modelseal.open(path, **kw) as model:  # type: ignore[arg-type]
        return {f: bytes(model.read(f)) for f in model.files}


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
