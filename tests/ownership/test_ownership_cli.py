"""``modelseal watermark``, ``modelseal fingerprint`` and ``modelseal lab removal`` as a user runs them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from modelseal.cli import app
from modelseal.lab import models
from modelseal.lab.data import load_dataset
from modelseal.ownership import OwnershipKey

runner = CliRunner()

ARCH = """
from torch import nn

def build():
    layers = [nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)]
    return nn.Sequential(*layers)
"""


def run(*args: str, expect: int = 0) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result.output


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A publisher's directory: data, a trained model, keys; the commands run from here."""
    root = tmp_path_factory.mktemp("owner")
    (root / "owner_arch.py").write_text(ARCH)
    ds = load_dataset("digits")
    np.savez(root / "data.npz", x=ds.x_train, y=ds.y_train)
    np.savez(root / "pool.npz", x=ds.x_train)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from modelseal.ownership_cli import _import_factory

        build = _import_factory("owner_arch:build")  # as the CLI imports it: the current directory on the path
        model = build()
        models.train(model, ds.x_train, ds.y_train, seed=1)
        torch.save(model.state_dict(), root / "model.pt")
        for i in range(12):  # reference models: other seeds and data halves
            ref = build()
            (x, y) = ds.halves()[i % 2]
            torch.manual_seed(100 + i)
            for p in ref.parameters():
                torch.nn.init.normal_(p, std=0.05)
            models.train(ref, x, y, seed=i)
            torch.save(ref.state_dict(), root / f"ref{i}.pt")
        # A fixed ownership key keeps the triggers and probes, and so the verdicts, the same every run
        # (`watermark keygen` itself is exercised below, for the second key).
        OwnershipKey(bytes([1]) * 32).save(root / "owner.key")
        run("keygen", "--signing", "--output", "publisher.key")
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture()
def in_workdir(workdir: Path) -> Path:
    cwd = os.getcwd()
    os.chdir(workdir)
    yield workdir
    os.chdir(cwd)


def test_watermark_embed_calibrate_verify(in_workdir: Path) -> None:
    out = run("watermark", "embed", "model.pt", "--arch", "owner_arch:build")
    assert "commitment" in out and Path("watermarked.pt").exists() and Path("watermark.json").exists()
    refs = [f"ref{i}.pt" for i in range(10)]
    out = run("watermark", "calibrate", "watermark.json", *refs, "--arch", "owner_arch:build")
    assert "10 reference models" in out
    out = run(
        "watermark", "verify", "watermark.json", "watermarked.pt", "--arch", "owner_arch:build",
        "--calibration", "watermark-null.json", "--json", "verdict.json",
    )  # fmt: skip
    assert "OWNERSHIP PROVEN" in out
    verdict = json.loads(Path("verdict.json").read_text())
    assert verdict["decision"] == "proven" and verdict["queries"] == 100
    # the original, unwatermarked model: not proven, exit 14
    out = run("watermark", "verify", "watermark.json", "model.pt", "--arch", "owner_arch:build", expect=14)
    assert "not proven" in out
    # too small a budget: inconclusive, exit 15
    run(
        "watermark",
        "verify",
        "watermark.json",
        "watermarked.pt",
        "--arch",
        "owner_arch:build",
        "--budget",
        "3",
        expect=15,
    )
    # another ownership key: an OwnershipError, exit 12
    run("watermark", "keygen", "other.key", "--force")
    run(
        "watermark",
        "verify",
        "watermark.json",
        "watermarked.pt",
        "--arch",
        "owner_arch:build",
        "-k",
        "other.key",
        expect=12,
    )
    # refuses to overwrite outputs
    run("watermark", "embed", "model.pt", "--arch", "owner_arch:build", expect=2)


def test_fingerprint_record_calibrate_verify(in_workdir: Path) -> None:
    run("fingerprint", "record", "model.pt", "--arch", "owner_arch:build", "--count", "150", "-o", "fp.json")
    run("fingerprint", "verify", "fp.json", "model.pt", "--arch", "owner_arch:build", expect=15)  # no calibration
    refs = [f"ref{i}.pt" for i in range(12)]
    run("fingerprint", "calibrate", "fp.json", *refs, "--arch", "owner_arch:build", "-o", "fp-null.json")
    out = run(
        "fingerprint", "verify", "fp.json", "model.pt", "--arch", "owner_arch:build", "--calibration", "fp-null.json"
    )
    assert "OWNERSHIP PROVEN" in out


def test_bad_suspect_specs(in_workdir: Path) -> None:
    run("watermark", "keygen", "k2.key", "--force")
    run("fingerprint", "record", "model.pt", "--arch", "owner_arch:build", "--count", "20", "-o", "fp2.json")
    assert "need --arch" in run("fingerprint", "verify", "fp2.json", "model.pt", expect=2)
    assert "module:factory" in run("fingerprint", "verify", "fp2.json", "model.pt", "--arch", "nocolon", expect=2)
    assert "name an .onnx" in run("fingerprint", "verify", "fp2.json", "model.bin", expect=2)
    Path("broken.json").write_text("{")
    assert "not valid JSON" in run("fingerprint", "verify", "broken.json", "model.pt", expect=12)
    Path("corrupt.pt").write_bytes(b"not a checkpoint")
    assert "not readable PyTorch weights" in run(
        "fingerprint", "verify", "fp2.json", "corrupt.pt", "--arch", "owner_arch:build", expect=8
    )
    assert "cannot import" in run(
        "fingerprint", "verify", "fp2.json", "model.pt", "--arch", "nosuch_mod:build", expect=2
    )
    out = run(
        "fingerprint",
        "verify",
        "fp2.json",
        "model.pt",
        "--arch",
        "owner_arch:build",
        "--json",
        "no/such/dir/v.json",
        expect=7,
    )
    assert "INCONCLUSIVE" in out  # the verdict is printed before the JSON file fails
    assert "no such directory" in run(
        "watermark",
        "embed",
        "model.pt",
        "--arch",
        "owner_arch:build",
        "-o",
        "no/dir/w.pt",
        "--record",
        "w2.json",
        expect=7,
    )


def test_lab_removal_fast(tmp_path: Path) -> None:
    out = run("lab", "removal", "--fast", "--out", str(tmp_path / "report"))
    assert "targets met" in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    (victim,) = report["victims"]
    attacks = {a["attack"]: a for a in victim["attacks"]}
    assert attacks["copy"]["watermark"]["decision"] == "proven" and attacks["copy"]["watermark"]["queries"] == 100
    assert attacks["int8-torch"]["watermark"]["decision"] == "proven"
    assert attacks["int8-onnxruntime"]["watermark"]["decision"] == "proven"
    assert victim["null"]["models"] == 20 and victim["null"]["false_claims"]["watermark"] == 0
    for name in ("report.md", "report.html", "removal-digits-mlp.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
