"""Loader benchmark: sealed models into ONNX Runtime, safetensors and PyTorch vs their plaintext loads.

Each measurement runs in a fresh subprocess (so peak RSS is that load's own), the
plaintext and sealed sides interleaved, repeated, and compared by median:

    time      seconds from just before the load call to a usable model (imports excluded);
              for torch and safetensors this includes reading every tensor once, because
              mmap-backed loads (safetensors' load_file, our in-memory file) defer the work
    peak RSS  VmHWM of the process, which includes the runtime's own baseline

Baselines are the ordinary ways to load the plaintext: ``InferenceSession(path)``,
``safetensors.torch.load_file(path)``, ``torch.load(path, weights_only=True)``.
Targets (issue "loaders"): time <= 1.15x and peak RSS <= 1.15x plaintext.

    python benchmarks/bench_loaders.py                  # 256 MiB models, plus ONNX at 2.25 GiB
    python benchmarks/bench_loaders.py --quick          # 32 MiB, no large ONNX
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
kind, side, path, key = sys.argv[1:5]
import modelseal
if kind == "onnx":
    import onnxruntime as ort
elif kind == "torch":
    import torch
else:
    import safetensors.torch
ident = modelseal.Identity.from_string(key) if side == "sealed" else None
t = time.perf_counter()
if kind == "onnx":
    s = (ort.InferenceSession(path, providers=["CPUExecutionProvider"]) if side == "plain"
         else modelseal.load_onnx(path, identity=ident, providers=["CPUExecutionProvider"]))
elif kind == "torch":
    s = torch.load(path, weights_only=True) if side == "plain" else modelseal.load_torch(path, identity=ident)
else:
    s = safetensors.torch.load_file(path) if side == "plain" else modelseal.load_safetensors(path, identity=ident)
if kind != "onnx":  # mmap-backed loads defer their page faults: touch every tensor once, on both sides
    total = sum(float(v.sum()) for v in s.values())
dt = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": dt, "peak_rss_mib": hwm / 1024}))
"""


def make_models(root: Path, mib: int, large_onnx_mib: int | None) -> dict[str, Path]:
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.torch import save_file

    def onnx_model(folder: Path, total_mib: int) -> Path:
        n = 4096  # 64 MiB float32 matrices
        layers = max(1, total_mib // 64)
        rng = np.random.default_rng(0)
        inits, nodes, prev = [], [], "x"
        for i in range(layers):
            w = rng.standard_normal((n, n), dtype=np.float32) * 0.01
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
            prev = f"h{i}"
        graph = helper.make_graph(
            nodes,
            "bench",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
            [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, n])],
            initializer=inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        folder.mkdir(parents=True)
        onnx.save_model(model, folder / "model.onnx", save_as_external_data=True, location="model.onnx.data")
        return folder / "model.onnx"

    tensors = {f"layer{i}.weight": torch.randn(2048, 2048) for i in range(max(1, mib // 16))}  # 16 MiB each
    models = {"onnx": onnx_model(root / "onnx", mib)}
    if large_onnx_mib:
        models["onnx-large"] = onnx_model(root / "onnx-large", large_onnx_mib)
    save_file(tensors, root / "model.safetensors")
    models["safetensors"] = root / "model.safetensors"
    torch.save(tensors, root / "model.pt")
    models["torch"] = root / "model.pt"
    return models


def measure(kind: str, side: str, path: Path, key: str) -> dict[str, float]:
    runtime = "onnx" if kind.startswith("onnx") else kind
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, runtime, side, str(path), key], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind}/{side} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--large-onnx-mib", type=int, default=2304, help="0 to skip the >2 GiB ONNX case")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="32 MiB, 3 repeats, no large ONNX")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.large_onnx_mib, args.repeat = 32, 0, 3

    import modelseal

    root = Path(tempfile.mkdtemp(prefix="modelseal-bench-loaders-"))
    try:
        need = (args.size_mib * 3 + args.large_onnx_mib) * 2 * (1 << 20) * 1.1
        if shutil.disk_usage(root).free < need:
            raise SystemExit(f"need {need / 2**30:.1f} GiB free in {root.parent}")
        identity = modelseal.Identity.generate()
        key = identity.to_string()
        models = make_models(root, args.size_mib, args.large_onnx_mib or None)
        sealed = {}
        for kind, path in models.items():
            src = path.parent if kind.startswith("onnx") else path
            sealed[kind] = root / f"{kind}.mseal"
            modelseal.seal(src, sealed[kind], recipients=[identity.recipient])
            for p in (*src.parent.glob("*"), sealed[kind]):  # warm the page cache for both sides alike
                if p.is_file():
                    p.read_bytes()

        rows = []
        for kind in models:
            samples: dict[str, list[dict[str, float]]] = {"plain": [], "sealed": []}
            measure(kind, "plain", models[kind], key)  # warm-up (imports, caches)
            repeat = args.repeat if kind != "onnx-large" else max(2, args.repeat // 2)
            for _ in range(repeat):
                samples["plain"].append(measure(kind, "plain", models[kind], key))
                samples["sealed"].append(measure(kind, "sealed", sealed[kind], key))
            row = {"loader": kind, "size_mib": args.large_onnx_mib if kind == "onnx-large" else args.size_mib}
            for side in ("plain", "sealed"):
                row[f"{side}_s"] = statistics.median(s["seconds"] for s in samples[side])
                row[f"{side}_rss_mib"] = statistics.median(s["peak_rss_mib"] for s in samples[side])
            row["time_ratio"] = row["sealed_s"] / row["plain_s"]
            row["rss_ratio"] = row["sealed_rss_mib"] / row["plain_rss_mib"]
            rows.append(row)
            print(json.dumps(row), flush=True)

        print()
        header = (
            f"{'loader':<12} {'MiB':>5} {'plain s':>8} {'sealed s':>9} {'ratio':>6}"
            f"  {'plain RSS':>9} {'sealed RSS':>10} {'ratio':>6}"
        )
        print(header)
        print("-" * len(header))
        for r in rows:
            print(
                f"{r['loader']:<12} {r['size_mib']:>5} {r['plain_s']:>8.3f} {r['sealed_s']:>9.3f}"
                f" {r['time_ratio']:>5.2f}x"
                f"  {r['plain_rss_mib']:>9.0f} {r['sealed_rss_mib']:>10.0f} {r['rss_ratio']:>5.2f}x"
                f"   {'meets' if r['time_ratio'] <= 1.15 and r['rss_ratio'] <= 1.15 else 'misses'} 1.15x/1.15x"
            )
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
