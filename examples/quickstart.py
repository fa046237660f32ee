"""modelseal quickstart demo (``make demo``).

Builds a small real ONNX model, seals it for a device and signs it as the
publisher, inspects and verifies it without any key, opens it in memory and runs
it in ONNX Runtime (no plaintext written anywhere), then shows that a tampered
copy and a wrong key are refused. Then the same with a key server on a local
SQLite file: a licence for one device, activation, a grant on open, a refused
second device, a one-time token, revocation and the audit log. Everything lands
in ./demo-output/.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

import modelseal

console = Console()
OUT = Path("demo-output")


def step(title: str) -> None:
    console.rule(f"[bold cyan]{title}")


def cli(*args: str, expect: int = 0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "modelseal", *args]
    console.print(f"[dim]$ modelseal {shlex.join(args)}[/]")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
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
    import onnxruntime as ort  # after modelseal, which turns ONNX Runtime's telemetry file off

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

    keyserver_demo(model_path, x, plain_out)
    console.rule("[bold green]demo complete")


def keyserver_demo(model_path: Path, x: np.ndarray, expected: np.ndarray) -> None:
    """Steps 9-13: the same model behind a key server on a local SQLite file."""
    step("9. A key server on a local SQLite file (dev mode, this machine only)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    workdir = OUT / "keyserver"
    workdir.mkdir()
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSEAL")}
    server_env["MODELSEAL_KS_PUBLIC_URL"] = url
    console.print(f"[dim]$ modelseal keyserver serve --dev --port {port}   (in {workdir})[/]")
    log = (OUT / "keyserver.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "modelseal", "keyserver", "serve", "--dev", "--port", str(port)],
        cwd=workdir, env=server_env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise SystemExit(f"demo failed: the key server did not start (see {OUT / 'keyserver.log'})")
        token = (workdir / "modelseal-keyserver" / "admin-token").read_text().strip()
        publisher = {"MODELSEAL_KEYSERVER": url, "MODELSEAL_ADMIN_TOKEN": token}
        console.print(f"serving {url}; SQLite database, master key and admin token in {workdir}/modelseal-keyserver/")

        step("10. Publisher: register the model, seal it for the server, sell a licence for one device")
        cli("model", "create", "demo-classifier", env=publisher)
        sealed = OUT / "classifier-ks.mseal"
        cli("seal", str(model_path), "-o", str(sealed), "--keyserver", url, "--model", "demo-classifier", env=publisher)
        licence = cli("licence", "create", "--model", "demo-classifier", "--max-devices", "1",
                      "--offline-grace", "3d", "--label", "Acme", env=publisher).stdout.strip()  # fmt: skip

        step("11. Device: activate, then open straight into ONNX Runtime through a grant")
        device = {"MODELSEAL_KEYSERVER": url, "MODELSEAL_HOME": str(OUT / "device-state")}
        cli("activate", "--licence", licence, env=device)
        os.environ["MODELSEAL_HOME"] = device["MODELSEAL_HOME"]
        try:
            session = modelseal.load_onnx(sealed, keyserver=url, providers=["CPUExecutionProvider"])
        finally:
            del os.environ["MODELSEAL_HOME"]
        assert np.array_equal(session.run(None, {"x": x})[0], expected)
        console.print("predictions identical to the plaintext model; the grant is cached, encrypted, for offline use")
        other = {"MODELSEAL_KEYSERVER": url, "MODELSEAL_HOME": str(OUT / "second-device-state")}
        cli("activate", "--licence", licence, env=other, expect=10)  # device-limit-reached

        step("12. A one-time token: opens the model once, on a machine with no activation")
        [lic] = httpx.get(url + "/v1/admin/licences", headers={"Authorization": f"Bearer {token}"}).json()["items"]
        grant_token = cli("grant-token", "create", "--licence", lic["id"], "--model", "demo-classifier",
                          "--expires", "10m", env=publisher).stdout.strip()  # fmt: skip
        os.environ["MODELSEAL_HOME"] = str(OUT / "token-machine")  # a machine with no device key
        try:
            for attempt in (1, 2):
                console.print(
                    f"[dim]>>> modelseal.open(sealed, keyserver=url, grant_token=...)  # attempt {attempt}[/]"
                )
                try:
                    with modelseal.open(sealed, keyserver=url, grant_token=grant_token) as opened:
                        name = opened.files[0]
                        console.print(f"opened: {name} ({opened.size(name):,} bytes, in memory)")
                except modelseal.LicenceError as exc:
                    console.print(f"refused: {exc.code}", style="yellow")
                    assert attempt == 2 and exc.code == "token-already-redeemed"
        finally:
            del os.environ["MODELSEAL_HOME"]

        step("13. Revoke the licence; every decision is in a hash-chained audit log")
        cli("licence", "revoke", lic["id"], "--reason", "demo over", env=publisher)
        cli("activate", "--licence", licence, env=other, expect=10)  # licence-revoked
        console.print(f"[dim]$ modelseal keyserver audit-verify   (in {workdir})[/]")
        verify = subprocess.run(
            [sys.executable, "-m", "modelseal", "keyserver", "audit-verify"],
            cwd=workdir, env={**server_env, "MODELSEAL_KS_DEV": "true"}, capture_output=True, text=True, check=False,
        )  # fmt: skip
        console.print(verify.stderr.strip(), style="green" if verify.returncode == 0 else "red")
        if verify.returncode != 0:
            raise SystemExit("demo failed: the audit log does not verify")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


if __name__ == "__main__":
    main()
