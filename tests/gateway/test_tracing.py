"""Traceable answers end to end (docs/spec/gateway-v1.md §7): a thief extracts a copy through one
API key of a live gateway; the verifier names that key, and no other, from the copy alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import modelseal
from modelseal.cli import app as cli_app
from modelseal.errors import OwnershipError
from modelseal.gateway.app import create_app
from modelseal.gateway.runner import OnnxRunner
from modelseal.gateway.service import Gateway
from modelseal.gateway.tracing import trace_suspect
from modelseal.lab import data, models
from modelseal.ownership import TorchSuspect

from .conftest import make_config


def _export(model: torch.nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    torch.onnx.export(
        model, (torch.zeros((1, *shape)),), str(path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load_dataset("digits")


@pytest.fixture(scope="module")
def served_digits(digits: data.Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("traced")
    victim = models.train(
        models.build("mlp", digits.input_shape, 10, seed=0), digits.x_train, digits.y_train, epochs=40
    )
    identity = modelseal.Identity.generate()
    identity.save(root / "device.key")
    plain = _export(victim, digits.input_shape, root / "digits.onnx")
    modelseal.seal(plain, root / "digits.mseal", recipients=[identity.recipient])
    plain.unlink()
    return root / "digits.mseal"


def test_the_key_a_copy_was_extracted_through_is_named(
    digits: data.Dataset, served_digits: Path, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path, served_digits, trace_rate=0.05, model_identity=str(served_digits.parent / "device.key")
    )
    gateway = Gateway(config)
    assert isinstance(gateway.runner, OnnxRunner)
    thief_token = gateway.store.create("thief")[1]
    innocent_token = gateway.store.create("innocent")[1]
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(digits.x_pool), 1200)
    span = digits.feature_high - digits.feature_low
    queries = np.clip(digits.x_pool[idx] + 0.05 * span * rng.normal(size=(1200, *digits.input_shape)), 0, span.max())
    queries = queries.astype(np.float32)
    with TestClient(create_app(gateway)) as client:
        labels = []
        for start in range(0, len(queries), 200):
            r = client.post(
                "/v1/predict",
                json={"inputs": queries[start : start + 200].tolist()},
                headers={"Authorization": f"Bearer {thief_token}"},
            )
            assert r.status_code == 200, r.text
            labels += r.json()["labels"]
        # an innocent user asks about its own data through its own key
        r = client.post(
            "/v1/predict",
            json={"inputs": digits.x_test[:250].tolist()},
            headers={"Authorization": f"Bearer {innocent_token}"},
        )
        assert r.status_code == 200
        gateway.flush()
    thief_id, innocent_id = thief_token.split("_")[1], innocent_token.split("_")[1]
    counts = gateway.store.traced_keys()
    assert counts[thief_id] >= 40 and counts[innocent_id] >= 5
    # the alterations are what the thief was served: its labels disagree with the model exactly there
    traces = gateway.store.traces(thief_id)
    assert all(t.served != t.original for t in traces)

    stolen = models.train(
        models.build("mlp", digits.input_shape, 10, seed=5), queries, np.array(labels), epochs=300, seed=5
    )
    independent = models.train(
        models.build("mlp", digits.input_shape, 10, seed=9), digits.x_train, digits.y_train, epochs=60, seed=9
    )
    verdict = trace_suspect(gateway.store, TorchSuspect(stolen, name="stolen"), num_classes=10)
    assert verdict.named == [thief_id], verdict.summary()
    thief = next(k for k in verdict.keys if k.key_id == thief_id)
    assert thief.p_value <= 1e-6 and thief.matches >= 0.7 * thief.queries
    clean = trace_suspect(gateway.store, TorchSuspect(independent, name="independent"), num_classes=10)
    assert clean.named == [] and clean.decision == "not-named"
    assert all(k.matches <= 0.35 * k.queries for k in clean.keys)

    # the same through the command line, with the copy as an ONNX file
    onnx_copy = _export(stolen, digits.input_shape, tmp_path / "copy.onnx")
    gateway.close()
    result = CliRunner().invoke(
        cli_app,
        ["gateway", "trace", "verify", str(onnx_copy), "--data-dir", str(config.data_dir),
         "--json", str(tmp_path / "verdict.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"-> key {thief_id}" in result.output
    result = CliRunner().invoke(
        cli_app,
        ["gateway", "trace", "verify", str(onnx_copy), "--num-classes", "10", "--data-dir", str(config.data_dir),
         "--key", innocent_id],
    )  # fmt: skip
    assert result.exit_code == 14, result.output


def test_tracing_refuses_a_wrong_or_too_small_number_of_classes(gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory()
    assert gateway.store.meta("num_classes") == "10"  # recorded when the model was served
    with pytest.raises(OwnershipError, match="10 classes, not 11"):  # overstating K shrinks the null
        trace_suspect(gateway.store, object(), num_classes=11)
    gateway.store.set_meta("num_classes", "2")
    with pytest.raises(OwnershipError, match="three classes"):
        trace_suspect(gateway.store, object())
