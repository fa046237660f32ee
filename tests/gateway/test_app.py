"""The gateway over HTTP (docs/spec/gateway-v1.md §2-§5, §8): answers, bad input, keys, quotas,
policies, isolation between keys, audit and metrics — through the real app, in process."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from modelseal.gateway.app import create_app
from modelseal.gateway.service import Answer, Gateway

TIERS: dict[str, Any] = {
    "default": {"per_minute": 1000},
    "small": {"per_minute": 10, "per_day": 15},
    "labels": {"policy": ["label_only"]},
    "top2": {"policy": ["top_k:2", "round:3"]},
    "noisy": {"policy": ["noise:0.05"]},
    "one-row": {"max_batch": 1},
}


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway]) -> Gateway:
    return gateway_factory(tiers=TIERS, trace_rate=0.0, max_body_bytes=65536, max_batch=64)


@pytest.fixture
def client(gateway: Gateway) -> Iterator[TestClient]:
    with TestClient(create_app(gateway), raise_server_exceptions=False) as c:
        yield c


def _key(gateway: Gateway, tier: str = "default", scopes: tuple[str, ...] = ("predict",)) -> dict[str, str]:
    _, token = gateway.store.create(f"user-{tier}", tier=tier, scopes=scopes)
    return {"Authorization": f"Bearer {token}"}


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 32)).astype(np.float32)


def _reference(sealed: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(sealed.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": x})[0].astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: np.ndarray = p / p.sum(axis=1, keepdims=True)
    return out


def test_predict_json_and_binary_match_the_model(client: TestClient, gateway: Gateway, sealed_model: Path) -> None:
    headers = _key(gateway)
    x = _rows(8)
    expected = _reference(sealed_model, x)
    r = client.post("/v1/predict", json={"inputs": x.tolist()}, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["labels"] == expected.argmax(axis=1).tolist()
    assert np.allclose(body["scores"], expected, atol=1e-5)
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    r = client.post(
        "/v1/predict",
        content=buf.getvalue(),
        headers={**headers, "Content-Type": "application/x-npy", "Accept": "application/x-npz"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npz"
    answer = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert answer["labels"].tolist() == expected.argmax(axis=1).tolist()
    assert np.allclose(answer["scores"], expected, atol=1e-5)
    r = client.get("/v1/model", headers=headers)
    assert r.json()["model"]["num_classes"] == 10 and r.json()["model"]["input_shape"] == [None, 32]


def _npy(arr: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


ROW = ",".join(["0.5"] * 32)
BAD: list[tuple[str, bytes, str, int, str]] = [
    ("not json", b"{inputs: [", "application/json", 400, "not valid JSON"),
    ("empty body", b"", "application/json", 400, "empty"),
    ("extra field", b'{"inputs": [[' + ROW.encode() + b'"]], "x": 1}', "application/json", 400, ""),
    ("no inputs", b'{"rows": []}', "application/json", 400, "exactly one field"),
    ("a list, not an object", b"[[1, 2]]", "application/json", 400, "exactly one field"),
    ("strings", json.dumps({"inputs": [["1"] * 32]}).encode(), "application/json", 400, "numbers"),
    ("booleans", json.dumps({"inputs": [[True] * 32]}).encode(), "application/json", 400, "numbers"),
    ("ragged", json.dumps({"inputs": [[1.0] * 32, [1.0] * 31]}).encode(), "application/json", 400, "rectangular"),
    ("rank 1", json.dumps({"inputs": [1.0] * 32}).encode(), "application/json", 400, "rank"),
    ("rank 3", json.dumps({"inputs": [[[1.0] * 32]]}).encode(), "application/json", 400, "rank"),
    ("wrong width", json.dumps({"inputs": [[1.0] * 31]}).encode(), "application/json", 400, "dimension 1 must be 32"),
    ("empty batch", b'{"inputs": []}', "application/json", 400, ""),
    ("NaN", b'{"inputs": [[NaN,' + ROW.encode()[4:] + b"]]}", "application/json", 400, "NaN"),
    ("Infinity", b'{"inputs": [[Infinity,' + ROW.encode()[4:] + b"]]}", "application/json", 400, "NaN or infinity"),
    ("overflows float32", json.dumps({"inputs": [[1e300] * 32]}).encode(), "application/json", 400, "overflow"),
    ("huge integer", b'{"inputs": [[' + b"9" * 400 + b"," + ROW.encode()[4:] + b"]]}", "application/json", 400, ""),
    ("deep nesting", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", 413, ""),
    ("deep nesting, small", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400, ""),
    ("too many rows", json.dumps({"inputs": [[0.5] * 32] * 65}).encode(), "application/json", 413, "at most 64"),
    ("oversized body", b'{"inputs": [' + b" " * 70_000 + b"]}", "application/json", 413, "limit"),
    ("pickled npy", _npy(np.array([object()], dtype=object)), "application/x-npy", 400, "pickled objects are refused"),
    ("truncated npy", _npy(np.zeros((2, 32), np.float32))[:-10], "application/x-npy", 400, ".npy"),
    ("npy of strings", _npy(np.array([["a"] * 32])), "application/x-npy", 400, "numbers"),
    ("form data", b"a=1", "application/x-www-form-urlencoded", 415, ""),
    ("a scalar", b'{"inputs": 5}', "application/json", 400, "rank"),
    ("0-d npy", _npy(np.float32(1.0)), "application/x-npy", 400, "rank"),
    ("npy header claims gigabytes", _npy(np.zeros((2, 32), np.float32)).replace(b"(2, 32)", b"(99999999, 32)"),
     "application/x-npy", 400, "declares more data"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body", "content_type", "status", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_4xx(
    client: TestClient, gateway: Gateway, name: str, body: bytes, content_type: str, status: int, message: str
) -> None:
    headers = _key(gateway)
    r = client.post("/v1/predict", content=body, headers={**headers, "Content-Type": content_type})
    assert r.status_code == status, (name, r.text)
    error = r.json()["error"]
    assert message in error["message"] and error["code"] != "internal"
    # nothing was charged for a refused request (it never reached the quota or the model)
    if status in (400, 413, 415):
        assert gateway.quota.usage(_key_id(headers))["minute"] == 0


def _key_id(headers: dict[str, str]) -> str:
    return headers["Authorization"].split("_")[1]


def test_oversized_body_is_refused_without_content_length(client: TestClient, gateway: Gateway) -> None:
    headers = _key(gateway)

    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": ['
        for _ in range(100):
            yield b" " * 1000
        yield b"]}"

    r = client.post("/v1/predict", content=chunks(), headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_keys_one_answer_for_every_bad_credential(client: TestClient, gateway: Gateway) -> None:
    headers = _key(gateway)
    good = headers["Authorization"]
    key_id = _key_id(headers)
    body = {"inputs": _rows(1).tolist()}
    wrong_secret = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    unknown_id = "Bearer msk_" + "0" * 16 + good[len("Bearer msk_") + 16 :]
    answers = []
    for value in (None, "Bearer", "Basic abc", "Bearer msk_short", wrong_secret, unknown_id):
        h = {} if value is None else {"Authorization": value}
        r = client.post("/v1/predict", json=body, headers=h)
        answers.append((r.status_code, r.json()))
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert len({json.dumps(a) for a in answers}) == 1 and answers[0][0] == 401
    assert client.post("/v1/predict", json=body, headers=headers).status_code == 200
    gateway.store.revoke(key_id)
    r = client.post("/v1/predict", json=body, headers=headers)
    assert (r.status_code, r.json()) == answers[0]
    # scopes: a predict key cannot read metrics; a metrics key cannot predict
    assert client.get("/metrics", headers=_key(gateway)).status_code == 403
    metrics_key = _key(gateway, scopes=("metrics",))
    assert client.post("/v1/predict", json=body, headers=metrics_key).status_code == 403
    assert client.get("/metrics", headers=metrics_key).status_code == 200


def test_quota_refuses_whole_requests_and_keys_are_independent(client: TestClient, gateway: Gateway) -> None:
    small, other = _key(gateway, "small"), _key(gateway, "small")
    assert client.post("/v1/predict", json={"inputs": _rows(6).tolist()}, headers=small).status_code == 200
    r = client.post("/v1/predict", json={"inputs": _rows(6).tolist()}, headers=small)
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota-exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert client.get("/v1/model", headers=small).json()["usage"]["minute"] == 6  # refused whole
    assert client.post("/v1/predict", json={"inputs": _rows(4).tolist()}, headers=small).status_code == 200
    # the other key of the same tier still has its whole quota, and sees only its own usage
    state = client.get("/v1/model", headers=other).json()
    assert state["usage"] == {"minute": 0, "day": 0, "total": 0} and state["key"] == _key_id(other)
    assert client.post("/v1/predict", json={"inputs": _rows(10).tolist()}, headers=other).status_code == 200


def test_policies_per_tier(client: TestClient, gateway: Gateway, sealed_model: Path) -> None:
    x = _rows(20, seed=4)
    expected = _reference(sealed_model, x)
    labels = client.post("/v1/predict", json={"inputs": x.tolist()}, headers=_key(gateway, "labels")).json()
    assert labels["labels"] == expected.argmax(axis=1).tolist()
    assert np.array_equal(np.array(labels["scores"]), np.eye(10)[expected.argmax(axis=1)])
    top2 = np.array(
        client.post("/v1/predict", json={"inputs": x.tolist()}, headers=_key(gateway, "top2")).json()["scores"]
    )
    assert ((top2 > 0).sum(axis=1) <= 2).all() and np.allclose(top2, np.round(top2, 3))
    noisy_key = _key(gateway, "noisy")
    a = client.post("/v1/predict", json={"inputs": x.tolist()}, headers=noisy_key).json()
    b = client.post("/v1/predict", json={"inputs": x.tolist()}, headers=noisy_key).json()
    assert a == b  # repeating a query gets the same noise: averaging buys nothing
    assert a["labels"] == expected.argmax(axis=1).tolist() and not np.allclose(a["scores"], expected, atol=1e-3)
    one = _key(gateway, "one-row")
    assert client.post("/v1/predict", json={"inputs": x[:2].tolist()}, headers=one).status_code == 413
    assert client.post("/v1/predict", json={"inputs": x[:1].tolist()}, headers=one).status_code == 200


def test_audit_records_hashes_not_data_and_metrics_count(client: TestClient, gateway: Gateway) -> None:
    headers = _key(gateway, "small")
    x = _rows(3, seed=9)
    client.post("/v1/predict", json={"inputs": x.tolist()}, headers=headers)
    client.post("/v1/predict", json={"inputs": _rows(8).tolist()}, headers=headers)  # over the minute quota
    client.post("/v1/predict", json={"inputs": x.tolist()})  # no key
    gateway.flush()
    lines = [json.loads(line) for line in gateway.config.audit_path.read_text().splitlines()]
    predicts = [rec for rec in lines if rec["event"] == "predict"]
    assert len(predicts) == 1 and predicts[0]["rows"] == 3 and predicts[0]["key"] == _key_id(headers)
    assert len(predicts[0]["inputs"]) == 3 and all(len(h) == 24 for h in predicts[0]["inputs"])
    text = gateway.config.audit_path.read_text()
    assert f"{float(x[0, 0])!r}"[:8] not in text  # no raw values
    refused = [(rec["status"], rec["reason"]) for rec in lines if rec["event"] == "refused"]
    assert refused == [(429, "quota-exceeded"), (401, "invalid-api-key")]
    metrics = client.get("/metrics", headers=_key(gateway, scopes=("metrics",))).text
    assert f'modelseal_gateway_rows_total{{key="{_key_id(headers)}"}} 3.0' in metrics
    assert f'modelseal_gateway_quota_refusals_total{{key="{_key_id(headers)}",period="minute"}} 1.0' in metrics
    assert 'modelseal_gateway_requests_total{status="401",tier=""} 1.0' in metrics
    assert "modelseal_gateway_traced_answers_total{" not in metrics  # never per key: it would reveal them


def test_metrics_summed_over_keys_when_per_key_is_off(gateway_factory: Callable[..., Gateway]) -> None:
    gw = gateway_factory(tiers=TIERS, trace_rate=0.0, metrics_per_key=False)
    with TestClient(create_app(gw), raise_server_exceptions=False) as client:
        a, b = _key(gw), _key(gw, "small")
        client.post("/v1/predict", json={"inputs": _rows(3).tolist()}, headers=a)
        client.post("/v1/predict", json={"inputs": _rows(2).tolist()}, headers=b)
        client.post("/v1/predict", json={"inputs": _rows(9).tolist()}, headers=b)  # over its minute quota
        metrics = client.get("/metrics", headers=_key(gw, scopes=("metrics",))).text
    assert 'modelseal_gateway_rows_total{key="*"} 5.0' in metrics
    assert 'modelseal_gateway_quota_refusals_total{key="*",period="minute"} 1.0' in metrics
    assert _key_id(a) not in metrics and _key_id(b) not in metrics


def test_unknown_routes_and_methods_are_json_4xx(client: TestClient) -> None:
    assert client.get("/nope").status_code == 404
    r = client.get("/v1/predict")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method-not-allowed"
    assert client.get("/healthz").json() == {"status": "ok"}
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


def test_pickle_is_never_loaded(client: TestClient, gateway: Gateway, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    arr = np.empty(1, dtype=object)
    arr[0] = Evil()
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    assert marker.name.encode() in buf.getvalue()  # the payload really is in the body
    r = client.post(
        "/v1/predict", content=buf.getvalue(), headers={**_key(gateway), "Content-Type": "application/x-npy"}
    )
    assert r.status_code == 400 and not marker.exists()


def test_the_fast_path_and_the_documented_route_answer_alike(gateway: Gateway) -> None:
    """``serve`` answers POST /v1/predict in an ASGI front; the FastAPI route (what OpenAPI documents)
    calls the same core: every request, good or bad, gets the same status, headers and body."""
    front = create_app(gateway)
    good, labels_only = _key(gateway), _key(gateway, "labels")
    rows = _rows(3)
    requests: list[tuple[bytes | None, dict[str, str]]] = [
        (json.dumps({"inputs": rows.tolist()}).encode(), {**good, "Content-Type": "application/json"}),
        (json.dumps({"inputs": rows.tolist()}).encode(), {**labels_only, "Content-Type": "application/json"}),
        (json.dumps({"inputs": rows.tolist()}).encode(), {**good, "Accept": "application/x-npz"}),
        (b"{not json", {**good, "Content-Type": "application/json"}),
        (json.dumps({"inputs": rows.tolist()}).encode(), {"Authorization": "Bearer msk_nope"}),
        (json.dumps({"inputs": rows.tolist()}).encode(), {**good, "Accept": "text/html"}),
        (b"x" * 70_000, {**good, "Content-Type": "application/json"}),
        (b"abc", {**good, "Content-Type": "text/plain"}),
    ]
    with TestClient(front, raise_server_exceptions=False) as fast:
        fast_answers = [fast.post("/v1/predict", content=body, headers=h) for body, h in requests]
        # the same gateway, started by the front's lifespan, answered through FastAPI alone
        routed = TestClient(front.api, raise_server_exceptions=False)
        routed_answers = [routed.post("/v1/predict", content=body, headers=h) for body, h in requests]
    assert [r.status_code for r in fast_answers] == [200, 200, 200, 400, 401, 406, 413, 415]
    for a, b in zip(fast_answers, routed_answers, strict=True):
        assert (a.status_code, a.content) == (b.status_code, b.content)
        for name in ("content-type", "www-authenticate", "retry-after", "modelseal-policy"):
            assert a.headers.get(name) == b.headers.get(name), name


@pytest.mark.parametrize("offload", [False, True], ids=["on-loop", "worker-thread"])
def test_requests_answered_together_get_what_each_would_alone(
    gateway_factory: Callable[..., Gateway], offload: bool
) -> None:
    """The app coalesces predictions that arrive together; tracing, keyed noise, coverage pricing,
    quotas and refusals stay per request (and per key, in arrival order). Alike when the service
    call runs on a worker thread (as with Redis quotas)."""
    import asyncio

    from modelseal.gateway.app import Coalescer

    tiers = {"default": {"per_minute": 15, "policy": ["noise:0.05", "coverage"]}, "other": {"policy": ["top_k:2"]}}
    alone_gw = gateway_factory(tiers=tiers, trace_rate=0.2)
    together_gw = gateway_factory(tiers=tiers, trace_rate=0.2, data_dir=str(alone_gw.config.data_dir))  # same secret
    keys = [alone_gw.store.create("a")[1], alone_gw.store.create("b", tier="other")[1]]
    plan = [(keys[i % 2], _rows(1 + i % 3, seed=i)) for i in range(24)]
    bad = (keys[0], np.zeros((2, 31), dtype=np.float32))  # wrong shape: refused alone, others unaffected
    plan.insert(5, bad)

    def outcome(result: Any) -> Any:
        if isinstance(result, Exception):
            return type(result).__name__
        return result.labels.tolist(), np.round(result.scores, 12).tolist(), result.policy

    import time

    if time.time() % 60 > 55:  # keep both runs inside one quota minute
        time.sleep(61 - time.time() % 60)
    alone = []
    for token, x in plan:
        try:
            alone.append(outcome(alone_gw.predict(alone_gw.authenticate(token), x)))
        except Exception as exc:
            alone.append(outcome(exc))

    async def together() -> list[Any]:
        coalescer = Coalescer(together_gw, offload=offload)
        calls = [coalescer.predict(together_gw.authenticate(t), x) for t, x in plan]  # type: ignore[arg-type]
        try:
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            coalescer.close()

    coalesced = [outcome(r) for r in asyncio.run(together())]
    assert coalesced == alone
    # the quota ran out part-way for the first key in both runs (15 rows a minute), at the same request
    assert "QuotaExceeded" in alone and alone.count("MalformedRequest") == 1


def test_onnx_runtime_threads_do_not_spin_unless_asked(gateway_factory: Callable[..., Gateway]) -> None:
    quiet = gateway_factory().runner._session.get_session_options()  # type: ignore[attr-defined]
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    busy = gateway_factory(model_spin=True, model_intra_op_threads=1).runner._session  # type: ignore[attr-defined]
    assert busy.get_session_options().intra_op_num_threads == 1
    with pytest.raises(RuntimeError):  # not set: ONNX Runtime's default, which spins
        busy.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")


def test_coalesced_rows_of_different_lengths_are_answered_apart(tmp_path: Path, sealed_model: Path) -> None:
    """A model with a free row dimension: one key's requests of different row lengths, answered at
    once, each get the answer they get alone."""
    from modelseal.gateway.runner import Runner
    from modelseal.gateway.service import Gateway as _Gateway

    from .conftest import make_config

    class Ragged(Runner):
        row_shape = (None,)
        dtype = np.dtype(np.float32)
        num_classes = 3
        name = "ragged"

        def _raw(self, x: np.ndarray) -> np.ndarray:
            return np.stack([x.sum(axis=1), x.max(axis=1), -x.min(axis=1)], axis=1)

    gw = _Gateway(make_config(tmp_path, sealed_model, trace_rate=0.0), runner=Ragged("logits"))
    try:
        key = gw.authenticate(gw.store.create("ragged")[1])
        assert key is not None
        short, long = _rows(2, seed=1)[:, :4], _rows(3, seed=2)[:, :7]
        together = gw.predict_many([(key, short), (key, long), (key, short)])
        for got, x in zip(together, (short, long, short), strict=True):
            alone = gw.predict(key, x)
            assert isinstance(got, Answer) and np.array_equal(got.scores, alone.scores)
    finally:
        gw.close()


# --- a quota store across the network ---------------------------------------------------------


def test_an_unreachable_redis_delays_predictions_but_never_the_event_loop(tmp_path: Path, sealed_model: Path) -> None:
    """With Redis quotas the service call runs off the event loop: while a charge waits on a Redis
    that never answers, /healthz still answers, and the prediction then gets a 503."""
    import asyncio
    import socket

    import httpx

    from modelseal.gateway.quota import RedisQuota

    from .conftest import make_config

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connects complete, nobody ever answers
        quota = RedisQuota(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", socket_timeout=2.0)
        gateway = Gateway(make_config(tmp_path, sealed_model), quota=quota)
        _, token = gateway.store.create("user", tier="default", scopes=("predict",))
        app = create_app(gateway)

        async def scenario() -> tuple[int, bool, int, str]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                body = {"inputs": _rows(1).tolist()}
                predicting = asyncio.create_task(
                    client.post("/v1/predict", json=body, headers={"Authorization": f"Bearer {token}"})
                )
                await asyncio.sleep(0.2)  # the charge is now waiting on the silent socket
                health = await client.get("/healthz")
                still_waiting = not predicting.done()
                answer = await predicting
                return health.status_code, still_waiting, answer.status_code, answer.json()["error"]["code"]

        gateway.start()
        try:
            health, still_waiting, status, code = asyncio.run(scenario())
        finally:  # ASGITransport runs no lifespan: start and close by hand
            gateway.close()
    assert health == 200
    assert still_waiting  # on the event loop, the charge would have held /healthz until it failed
    assert (status, code) == (503, "unavailable")


def test_requests_arriving_during_an_offloaded_flush_join_the_next(gateway: Gateway) -> None:
    """On a worker thread, one flush runs at a time: requests arriving while it runs wait for it and
    then go together in the next flush, and every request gets its own answer."""
    import asyncio
    import time

    from modelseal.gateway.app import Coalescer

    calls: list[int] = []

    class Slow:  # the real gateway, made slow so the second wave arrives during the first flush
        def predict_many(self, requests: Any) -> Any:
            calls.append(len(requests))
            time.sleep(0.3)
            return gateway.predict_many(requests)

    key = gateway.authenticate(_key(gateway)["Authorization"].split()[1])
    assert key is not None

    async def waves() -> list[Any]:
        coalescer = Coalescer(Slow(), offload=True)  # type: ignore[arg-type]
        try:
            first = [asyncio.ensure_future(coalescer.predict(key, _rows(1, seed=i))) for i in range(3)]
            await asyncio.sleep(0.1)  # the first flush is running on the worker thread
            second = [asyncio.ensure_future(coalescer.predict(key, _rows(2, seed=10 + i))) for i in range(4)]
            return await asyncio.gather(*first, *second)
        finally:
            coalescer.close()

    answers = asyncio.run(waves())
    assert calls == [3, 4]
    assert [len(a.labels) for a in answers] == [1, 1, 1, 2, 2, 2, 2]
    for i, a in enumerate(answers[:3]):  # each its own rows' answer
        assert a.labels.tolist() == gateway.predict(key, _rows(1, seed=i)).labels.tolist()


def test_the_key_table_is_refreshed_off_the_request_path(gateway_factory: Callable[..., Gateway]) -> None:
    """With ``key_refresh_s > 0`` a thread keeps the cached key table fresh: a key made (or revoked)
    elsewhere is known without any request reading the table, and within ``key_refresh_s``."""
    import threading
    import time

    gw = gateway_factory(key_refresh_s=0.2)
    gw.start()
    _, token = gw.store.create("later")  # as `modelseal gateway key create` does from another process
    key_id = token.split("_")[1]
    deadline = time.monotonic() + 5
    while key_id not in gw.store._cache:  # no authenticate call: only the thread can bring it in
        assert time.monotonic() < deadline, "the refresher thread did not pick up the new key"
        time.sleep(0.05)
    assert gw.authenticate(token) is not None
    gw.store.revoke(key_id)
    time.sleep(0.25)  # key_refresh_s
    assert gw.authenticate(token) is None  # revoked within key_refresh_s
    gw.close()
    assert not any(t.name == "gateway-keys" and t.is_alive() for t in threading.enumerate())
