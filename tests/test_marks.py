"""Ownership marks (``modelseal.read_marks`` / ``write_marks`` / ``modelseal mark``): written into
ONNX ``metadata_props`` and the safetensors ``__metadata__`` without changing anything else, read
back from those and from a container; bad input refused with nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

import modelseal
from modelseal.cli import app as cli_app

from .models import mlp_onnx

X = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)
MARKS = {"owner": "Example Corp", "copyright": "(c) 2026 Example Corp", "license": "internal use only"}


def _run(path: Path) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]


def test_onnx_marks_round_trip_and_change_nothing_else(tmp_path: Path) -> None:
    model = mlp_onnx(tmp_path / "m.onnx")
    before = _run(model)
    os.chmod(model, 0o640)
    assert modelseal.read_marks(model) == {}
    modelseal.write_marks(model, MARKS)
    assert modelseal.read_marks(model) == MARKS
    assert np.array_equal(_run(model), before)
    assert model.stat().st_mode & 0o777 == 0o640
    modelseal.write_marks(model, {"license": "v2"})  # merges, replaces one
    assert modelseal.read_marks(model) == {**MARKS, "license": "v2"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left


def test_onnx_with_external_data_is_marked_in_its_folder(tmp_path: Path) -> None:
    model = mlp_onnx(tmp_path / "src" / "m.onnx", external_data=True)
    before = _run(model)
    data = (tmp_path / "src" / "m.onnx.data").read_bytes()
    with pytest.raises(ValueError, match="own folder"):
        modelseal.write_marks(model, MARKS, tmp_path / "elsewhere.onnx")
    assert not (tmp_path / "elsewhere.onnx").exists()
    out = modelseal.write_marks(model, MARKS, tmp_path / "src" / "marked.onnx")
    assert modelseal.read_marks(out) == MARKS and modelseal.read_marks(model) == {}
    assert np.array_equal(_run(out), before)
    assert (tmp_path / "src" / "m.onnx.data").read_bytes() == data


def test_safetensors_marks_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, dtype=np.int64)}
    save_file(tensors, str(path), metadata={"format": "np"})
    modelseal.write_marks(path, MARKS)
    assert modelseal.read_marks(path) == {"format": "np", **MARKS}  # existing metadata kept
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys() and all(np.array_equal(loaded[k], tensors[k]) for k in tensors)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0


def test_container_marks_are_its_signed_metadata(tmp_path: Path) -> None:
    identity = modelseal.Identity.generate()
    sealed = tmp_path / "m.mseal"
    modelseal.seal(mlp_onnx(tmp_path / "m.onnx"), sealed, recipients=[identity.recipient], metadata=MARKS)
    assert modelseal.read_marks(sealed) == MARKS
    with pytest.raises(ValueError, match="sealed"):
        modelseal.write_marks(sealed, {"owner": "someone else"})


@pytest.mark.parametrize(
    ("marks", "match"),
    [({"Owner": "x"}, "must match"), ({"owner": 5}, "string"), ({"owner": "x" * 9000}, "string")],
)
def test_bad_marks_are_refused_and_nothing_changes(tmp_path: Path, marks: dict[str, object], match: str) -> None:
    model = mlp_onnx(tmp_path / "m.onnx")
    before = model.read_bytes()
    with pytest.raises(ValueError, match=match):
        modelseal.write_marks(model, marks)  # type: ignore[arg-type]
    assert model.read_bytes() == before


def test_files_that_are_not_what_they_say(tmp_path: Path) -> None:
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(modelseal.ModelLoadError):
        modelseal.read_marks(fake)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(modelseal.ModelLoadError):
        modelseal.write_marks(bad, MARKS)
    assert bad.read_bytes()[:8] == (10**12).to_bytes(8, "little")
    with pytest.raises(ValueError, match="marks are read from"):
        modelseal.read_marks(tmp_path / "model.pt")


def test_cli_mark(tmp_path: Path) -> None:
    model = mlp_onnx(tmp_path / "m.onnx")
    runner = CliRunner()
    r = runner.invoke(cli_app, ["mark", str(model), "--owner", "Example Corp", "--meta", "contact=legal@example.com"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout) == {"owner": "Example Corp", "contact": "legal@example.com"}
    r = runner.invoke(cli_app, ["mark", str(model)])
    assert r.exit_code == 0 and json.loads(r.stdout)["owner"] == "Example Corp"
    r = runner.invoke(cli_app, ["mark", str(model), "--meta", "BAD KEY=x"])
    assert r.exit_code == 2 and "must match" in r.stderr
    r = runner.invoke(cli_app, ["mark", str(tmp_path / "nope.onnx")])
    assert r.exit_code == 7
