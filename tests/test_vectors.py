"""Golden vectors: every valid one opens to known plaintext, every invalid one raises its named error."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import modelseal

VECTORS = Path(__file__).parent / "vectors"
INDEX: list[dict[str, Any]] = json.loads((VECTORS / "index.json").read_text())


def _open_kwargs(spec: dict[str, str]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if "identity" in spec:
        kw["identity"] = modelseal.Identity.from_string(spec["identity"])
    if "passphrase" in spec:
        kw["passphrase"] = spec["passphrase"]
    if "require_signer" in spec:
        kw["require_signer"] = spec["require_signer"]
    return kw


def _open_and_read(vector: dict[str, Any]) -> dict[str, str]:
    path = VECTORS / vector["files"][0]
    with modelseal.open(path, **_open_kwargs(vector["open"])) as model:
        return {f: hashlib.sha256(model.read(f)).hexdigest() for f in model.files}


@pytest.mark.parametrize("vector", [v for v in INDEX if "ok" in v["expect"]], ids=lambda v: v["name"])
def test_valid_vector_opens(vector: dict[str, Any]) -> None:
    assert _open_and_read(vector) == vector["expect"]["ok"]


@pytest.mark.parametrize("vector", [v for v in INDEX if "error" in v["expect"]], ids=lambda v: v["name"])
def test_invalid_vector_is_refused_with_its_error(vector: dict[str, Any]) -> None:
    error = getattr(modelseal, vector["expect"]["error"])
    with pytest.raises(error) as caught:
        _open_and_read(vector)
    assert type(caught.value) is error
    if "rule" in vector["expect"]:
        assert caught.value.rule == vector["expect"]["rule"]


def test_every_format_rule_has_a_vector() -> None:
    rules = {v["expect"].get("rule") for v in INDEX} - {None}
    # shard-set is covered in test_container.py (it needs files missing, not bytes)
    assert rules >= {
        "magic", "version", "flags", "section-size", "truncated", "trailing-data", "json", "schema",
        "base64", "chunk-size", "entry-path", "entry-collision", "limits", "recipients", "scrypt-work-factor",
    }  # fmt: skip


def test_committed_vectors_are_reproduced_exactly() -> None:
    """The deterministic seam still produces the committed bytes: the format has not drifted."""
    proc = subprocess.run([sys.executable, str(VECTORS / "generate.py")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
