"""modelseal quickstart demo (``make demo``).

Builds a small real ONNX model, seals it for a device and signs it as the
publisher, inspects and verifies it without any key, opens it in memory and runs
it in ONNX Runtime (no plaintext written anywhere), then shows that a tampered
copy and a wrong key are refused. Everything lands in ./demo-output/.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

import modelseal

console = Console()
OUT = Path("demo-output")


def step(title: str) -> None:
    console.rule(f"[bold cyan]{title}")


def cli(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "modelseal", *args]
    console.print(f"[dim]$ modelseal {shlex.join(args)}[/]")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.stdout.strip():
        console.print(proc.stdout.rstrip(), highlight=False)
    if proc.stderr.strip():
        console.print(proc.stderr.rstrip(), style="yellow", highlight=False)
    if proc.returncode != expect:
        raise SystemExit(f"demo failed: expected exit {expect}, got {proc.returncode}")
    return proc


def build_model(path: Path) -> None:
    """A 64-128-10 MLP classifier with fixed random weights (a real ONNX graph)."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((64, 128)).astype(np.float32) * 0.1
    b1 = rng.standard_normal(128).astype(np.float32) * 0.1
    w2 = rng.standard_normal((128, 10)).astype(np.float32) * 0.1
    b2 = np.zeros(10, dtype=np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="modelseal-demo")
    model.ir_version = 9  # what every supported onnxruntime reads
    onnx.checker.check_model(model)
    onnx.save(model, path)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    model_path = OUT / "classifier.onnx"
    sealed = OUT / "classifier.mseal"

    step("1. A real ONNX model")
    build_model(model_path)
    console.print(f"built {model_path} ({model_path.stat().st_size:,} bytes)")

    step("2. Keys: a device identity and a publisher signing key")
    device = cli("keygen", "-o", str(OUT / "device.key")).stdout.strip()
    publisher = cli("keygen", "--signing", "-o", str(OUT / "publisher.key")).stdout.strip()

    step("3. Seal it for the device, signed, with public ownership metadata")
    cli(
        "seal", str(model_path), "-o", str(sealed), "-r", device, "--sign", str(OUT / "publisher.key"),
        "--owner", "Example Corp", "--copyright", "(c) 2026 Example Corp. All rights reserved.",
        "--license", "Licensed to device fleet A only", "--name", "demo-classifier", "--model-version", "1.0",
    )  # fmt: skip

    step("4. Anyone can inspect it and check who published it - no decryption key")
    cli("inspect", str(sealed))
    cli("verify", str(sealed), "--signer", publisher)

    step("5. The device opens it in memory and runs it: no plaintext byte touches the disk")
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    identity = modelseal.Identity.load(OUT / "device.key")
    session = modelseal.load_onnx(sealed, identity=identity, require_signer=publisher)
    sealed_out = session.run(None, {"x": x})[0]
    plain_out = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(sealed_out, plain_out)
    console.print(f"predictions from the sealed model: {sealed_out.argmax(axis=1).tolist()} (identical to plaintext)")

    step("6. A tampered copy is refused")
    tampered = OUT / "tampered.mseal"
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 0x01  # flip one bit in the encrypted weights
    tampered.write_bytes(bytes(data))
    cli("open", str(tampered), "-i", str(OUT / "device.key"), "-o", str(OUT / "never.onnx"), expect=4)
    cli("verify", str(tampered), "--signer", publisher, expect=5)
    assert not (OUT / "never.onnx").exists()
    console.print("nothing was written for the tampered copy")

    step("7. One inference from the shell, still in memory")
    np.save(OUT / "x.npy", x)
    cli("run", str(sealed), "-i", str(OUT / "device.key"), "-x", str(OUT / "x.npy"))

    step("8. Another device's key is refused")
    cli("keygen", "-o", str(OUT / "other.key"))
    cli("open", str(sealed), "-i", str(OUT / "other.key"), "-o", str(OUT / "never.onnx"), expect=6)

    console.rule("[bold green]demo complete")


if __name__ == "__main__":
    main()
