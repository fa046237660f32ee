"""Property tests: open(seal(x)) == x for any content and layout; any mutation is refused."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelseal
from modelseal import Identity, ModelSealError
from modelseal._private.paths import check_entry_path

IDENTITY = Identity.generate()
PROFILE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12).filter(
    lambda n: n.split(".")[0].lower() not in {"con", "prn", "aux", "nul"}
)
files = st.dictionaries(names, st.binary(max_size=20_000), min_size=1, max_size=4)


def _seal(tmp: Path, content: dict[str, bytes], chunk_size: int) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name, data in content.items():
        (src / name).write_bytes(data)
    dst = tmp / "c.mseal"
    modelseal.seal(src, dst, recipients=[IDENTITY.recipient], chunk_size=chunk_size)
    return dst


@PROFILE
@given(content=files, chunk_size=st.sampled_from([4096, 8192, 65536]))
def test_open_of_seal_is_identity(content: dict[str, bytes], chunk_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _seal(Path(tmp), content, chunk_size)
        with modelseal.open(path, identity=IDENTITY) as model:
            assert {f: bytes(model.read(f)) for f in model.files} == content
            for f in model.files:
                with model.open_file(f) as r:
                    assert r.read() == content[f]


@PROFILE
@given(content=files, data=st.data())
def test_any_mutation_is_refused(content: dict[str, bytes], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _seal(Path(tmp), content, 4096)
        original = path.read_bytes()
        kind = data.draw(st.sampled_from(["flip", "replace", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(original) - 1))
        mutated = bytearray(original)
        if kind == "flip":
            mutated[pos] ^= data.draw(st.integers(1, 255))
        elif kind == "replace":
            repl = data.draw(st.binary(min_size=1, max_size=64))
            mutated[pos : pos + len(repl)] = repl
        elif kind == "insert":
            mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=64))
        else:
            del mutated[pos : pos + data.draw(st.integers(1, 64))]
        if bytes(mutated) == original:
            return
        path.write_bytes(bytes(mutated))
        try:
            with modelseal.open(path, identity=IDENTITY) as model:
                for f in model.files:
                    model.read(f)
        except ModelSealError:
            return
        raise AssertionError(f"{kind} at {pos} was accepted")


@given(st.text(max_size=40))
def test_entry_path_checker_never_accepts_an_escaping_path(path: str) -> None:
    try:
        check_entry_path(path)
    except ModelSealError:
        return
    parts = path.split("/")
    assert not path.startswith("/") and ".." not in parts and "." not in parts and "" not in parts
    assert "\\" not in path and ":" not in path and "\x00" not in path
