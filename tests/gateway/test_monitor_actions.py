"""The extraction monitor inside the gateway (docs/spec/gateway-v1.md §6): a flagged key is logged,
alerted, throttled, degraded or misinformed as its tier says; other keys are untouched."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from modelseal.gateway.app import create_app
from modelseal.gateway.monitor import Reference
from modelseal.gateway.service import Gateway
from modelseal.gateway.tracing import trace_suspect


@pytest.fixture
def monitored(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> Gateway:
    reference = Reference.fit(np.random.default_rng(0).normal(size=(4000, 32)).astype(np.float32), seed=1)
    reference.save(tmp_path / "reference.npz")
    return gateway_factory(
        trace_rate=0.0,
        monitor={"reference": str(tmp_path / "reference.npz"), "thresholds": {"ood": 0.9}},
        tiers={
            "default": {"on_alert": "degrade", "degraded_policy": ["label_only"]},
            "throttled": {"per_minute": 10_000, "on_alert": "throttle", "throttle_factor": 0.01},
            "misinformed": {"on_alert": "misinform"},
        },
    )


def _send(client: TestClient, token: str, x: np.ndarray) -> list[dict[str, object]]:
    answers = []
    for start in range(0, len(x), 50):
        r = client.post(
            "/v1/predict", json={"inputs": x[start : start + 50].tolist()}, headers={"Authorization": f"Bearer {token}"}
        )
        answers.append({"status": r.status_code, **r.json()})
    return answers


def test_an_out_of_distribution_key_is_flagged_and_degraded_and_others_are_not(monitored: Gateway) -> None:
    rng = np.random.default_rng(2)
    benign = rng.normal(size=(300, 32)).astype(np.float32)
    odd = (8 * rng.normal(size=(300, 32))).astype(np.float32)  # far outside the training distribution
    _, thief = monitored.store.create("thief")
    _, user = monitored.store.create("user")
    with TestClient(create_app(monitored)) as client:
        before = _send(client, user, benign[:50])
        thief_answers = _send(client, thief, odd[:150])
        monitored.flush()  # the monitor observes beside the request path; let it catch up
        thief_answers += _send(client, thief, odd[150:])
        after = _send(client, user, benign[:50])
        user_rest = _send(client, user, benign[50:])
    # the thief's first answers carry scores; once flagged (after >= 100 queries) labels only
    assert thief_answers[0]["policy"] == "full" and thief_answers[-1]["policy"] == "degraded"
    last_scores = np.array(thief_answers[-1]["scores"])
    assert set(np.unique(last_scores)) <= {0.0, 1.0}
    # the benign key is never flagged, and its answers did not change while the thief was flagged
    assert before == after and all(a["policy"] == "full" for a in user_rest)
    monitored.flush()
    records = [json.loads(line) for line in monitored.config.audit_path.read_text().splitlines()]
    alerts = [r for r in records if r["event"] == "alert"]
    assert len(alerts) == 1 and alerts[0]["key"] == thief.split("_")[1] and "ood" in alerts[0]["monitor"]["reasons"]
    assert alerts[0]["action"] == "degrade"
    metrics = monitored.metrics.render()[0].decode()
    assert f'modelseal_gateway_monitor_alerts_total{{key="{thief.split("_")[1]}",reason="ood"}} 1.0' in metrics


def test_a_throttled_key_gets_a_fraction_of_its_quota(monitored: Gateway) -> None:
    odd = (8 * np.random.default_rng(3).normal(size=(200, 32))).astype(np.float32)
    _, token = monitored.store.create("heavy", tier="throttled")
    if time.time() % 60 > 50:  # keep the requests inside one minute window
        time.sleep(61 - time.time() % 60)
    with TestClient(create_app(monitored)) as client:
        answers = _send(client, token, odd[:150])
        monitored.flush()
        answers += _send(client, token, odd[150:])
    # flagged at 100-150 queries; from then on the per-minute limit is 10_000 * 0.01 = 100 rows
    statuses = [a["status"] for a in answers]
    assert statuses[:2] == [200, 200] and statuses[-1] == 429


class _Parrot:
    """A copy that memorised every answer its thief was given (and knows nothing else)."""

    name = "parrot"

    def __init__(self, x: np.ndarray, labels: np.ndarray) -> None:
        self.answers = {row.tobytes(): int(label) for row, label in zip(x, labels, strict=True)}

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.array([self.answers[row.astype(np.float32).tobytes()] for row in x])


class _Honest:
    name = "independent"

    def __init__(self, gateway: Gateway) -> None:
        self.runner = gateway.runner

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.runner.probabilities(x).argmax(axis=1))


def test_a_misinformed_key_gets_wrong_labels_silently_and_its_copy_names_it(monitored: Gateway) -> None:
    rng = np.random.default_rng(4)
    odd = (8 * rng.normal(size=(300, 32))).astype(np.float32)
    benign = rng.normal(size=(100, 32)).astype(np.float32)
    _, thief = monitored.store.create("thief", tier="misinformed")
    _, user = monitored.store.create("user", tier="misinformed")
    truth = monitored.runner.probabilities(odd).argmax(axis=1)
    with TestClient(create_app(monitored)) as client:
        user_answers = _send(client, user, benign)
        answers = _send(client, thief, odd[:150])
        monitored.flush()
        answers += _send(client, thief, odd[150:])
    monitored.flush()
    labels = np.concatenate([a["labels"] for a in answers])
    # nothing tells the key: every answer is a 200 under the tier's own policy name
    assert all(a["status"] == 200 and a["policy"] == "full" for a in answers)
    # before the flag (100-150 queries) the truth; from the next request on, every label is wrong
    assert (labels[:100] == truth[:100]).all() and (labels[150:] != truth[150:]).all()
    # the benign key was not flagged and got the truth
    benign_truth = monitored.runner.probabilities(benign).argmax(axis=1)
    assert (np.concatenate([a["labels"] for a in user_answers]) == benign_truth).all()
    # the wrong answers are recorded as traced ones: a copy that learned them names the key, the
    # model itself (which never saw them) names no key
    thief_id = thief.split("_")[1]
    assert monitored.store.traced_keys() == {thief_id: int((labels != truth).sum())}
    named = trace_suspect(monitored.store, _Parrot(odd, labels), num_classes=10)
    assert named.named == [thief_id] and named.keys[0].p_value < 1e-100
    assert trace_suspect(monitored.store, _Honest(monitored), num_classes=10).named == []
    metrics = monitored.metrics.render()[0].decode()
    assert f"modelseal_gateway_misinformed_answers_total {float((labels != truth).sum())}" in metrics
