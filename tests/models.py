"""Small real models built at test time (ONNX graphs, PyTorch checkpoints, hostile pickles)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp_onnx(path: Path, *, hidden: int = 64, external_data: bool = False, seed: int = 0) -> Path:
    """A 32-hidden-10 MLP; with ``external_data`` its weights go to ``<name>.data`` beside it."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((32, hidden)).astype(np.float32)
    w2 = rng.standard_normal((hidden, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, path)
    return path


class _RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def hostile_checkpoints(folder: Path, marker: Path) -> dict[str, Path]:
    """Checkpoints that would execute code if loaded with an unrestricted unpickler."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    out["zip-reduce"] = folder / "zip_reduce.pt"
    torch.save({"weight": torch.zeros(2), "payload": _RunsCode(marker)}, out["zip-reduce"])
    out["legacy-reduce"] = folder / "legacy_reduce.pt"
    torch.save({"payload": _RunsCode(marker)}, out["legacy-reduce"], _use_new_zipfile_serialization=False)
    out["raw-pickle"] = folder / "raw_pickle.pt"
    out["raw-pickle"].write_bytes(pickle.dumps(_RunsCode(marker)))
    return out
