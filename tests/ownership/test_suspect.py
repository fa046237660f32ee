"""Suspect wrappers against a tiny real model (torch, ONNX, sealed) and a real local HTTP server."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelseal
from modelseal.errors import SuspectError
from modelseal.ownership import suspect as suspect_module
from modelseal.ownership.suspect import (
    HttpSuspect,
    OnnxSuspect,
    Suspect,
    TorchSuspect,
    as_suspect,
    labels_from_output,
    scores_from_output,
    sealed_suspect,
)

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

# --- a tiny real model ------------------------------------------------------------------------


def _mlp() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()


@pytest.fixture(scope="module")
def mlp() -> Any:
    return _mlp()


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def expected(mlp: Any, inputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        labels = np.asarray(mlp(torch.from_numpy(inputs)).argmax(dim=1).numpy())
    assert len(set(labels.tolist())) > 1, "the test model should not answer one class for everything"
    return labels


def _export(module: Any, path: Path, *, dynamic: bool = True, double: bool = False) -> Path:
    example = torch.zeros((1, 4), dtype=torch.float64 if double else torch.float32)
    with warnings.catch_warnings():  # dynamo=False (onnxscript is not installed) is "legacy"
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}} if dynamic else None,
            opset_version=17,
            dynamo=False,
        )
    return path


@pytest.fixture(scope="module")
def onnx_path(mlp: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(mlp, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def sealed_path(onnx_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("sealed") / "model.mseal"
    modelseal.seal(onnx_path, dst, recipients=[modelseal.PassphraseRecipient("pw", log_n=10)])
    return dst


def test_torch_suspect_matches_argmax(mlp: Any, inputs: np.ndarray, expected: np.ndarray) -> None:
    with TorchSuspect(mlp, batch_size=16) as s:
        labels = s.predict(inputs)
        assert labels.dtype == np.int64 and labels.shape == (50,)
        np.testing.assert_array_equal(labels, expected)
        scores = s.predict_scores(inputs)
        assert scores.dtype == np.float64 and scores.shape == (50, 3)
        np.testing.assert_array_equal(scores.argmax(axis=1), expected)
        assert s.queries == 100
        assert s.name == "torch:Sequential"


def test_torch_suspect_wraps_model_failures(mlp: Any) -> None:
    s = TorchSuspect(mlp)
    with pytest.raises(SuspectError, match=r"the model failed on a batch of shape \(3, 5\)"):
        s.predict(np.zeros((3, 5), dtype=np.float32))


def test_torch_suspect_takes_tuple_outputs(mlp: Any, inputs: np.ndarray, expected: np.ndarray) -> None:
    class Pair(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.inner = mlp

        def forward(self, x: Any) -> Any:
            return self.inner(x), x

    np.testing.assert_array_equal(TorchSuspect(Pair()).predict(inputs), expected)


@pytest.mark.parametrize("kind", ["path", "bytes", "session"])
def test_onnx_suspect_matches_torch(kind: str, onnx_path: Path, inputs: np.ndarray, expected: np.ndarray) -> None:
    model: Any = {
        "path": onnx_path,
        "bytes": onnx_path.read_bytes(),
        "session": ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]),
    }[kind]
    s = OnnxSuspect(model, batch_size=7)
    np.testing.assert_array_equal(s.predict(inputs), expected)
    assert s.predict_scores(inputs).shape == (50, 3)
    assert s.queries == 100
    assert s.input_name == "x" and s.output_name == "logits"
    if kind == "path":
        assert s.name == f"onnx:{onnx_path}"


def test_onnx_fixed_batch_of_one_is_sent_row_by_row(
    mlp: Any, inputs: np.ndarray, expected: np.ndarray, tmp_path: Path
) -> None:
    path = _export(mlp, tmp_path / "fixed.onnx", dynamic=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 1
    np.testing.assert_array_equal(OnnxSuspect(path).predict(inputs), expected)


def test_onnx_float64_input_is_cast(inputs: np.ndarray, expected: np.ndarray, tmp_path: Path) -> None:
    path = _export(_mlp().double(), tmp_path / "double.onnx", double=True)
    np.testing.assert_array_equal(OnnxSuspect(path).predict(inputs), expected)


def test_onnx_errors(onnx_path: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(SuspectError, match=r"junk\.onnx"):
        OnnxSuspect(junk)
    with pytest.raises(SuspectError, match=r"missing\.onnx"):
        OnnxSuspect(tmp_path / "missing.onnx")
    with pytest.raises(SuspectError, match="not a loadable ONNX model"):
        OnnxSuspect(b"\x00garbage")
    with pytest.raises(SuspectError, match="no input 'y'"):
        OnnxSuspect(onnx_path, input_name="y")
    with pytest.raises(SuspectError, match="no output 'probs'"):
        OnnxSuspect(onnx_path, output_name="probs")
    with pytest.raises(SuspectError, match=r"ONNX Runtime failed on a batch of shape \(2, 5\)"):
        OnnxSuspect(onnx_path).predict(np.zeros((2, 5), dtype=np.float32))


def test_sealed_suspect_matches_torch(sealed_path: Path, inputs: np.ndarray, expected: np.ndarray) -> None:
    s = sealed_suspect(sealed_path, passphrase="pw", budget=100)
    assert isinstance(s, OnnxSuspect) and s.budget == 100
    assert s.name == f"sealed:{sealed_path}"
    np.testing.assert_array_equal(s.predict(inputs), expected)


def test_sealed_suspect_wrong_passphrase_propagates(sealed_path: Path) -> None:
    with pytest.raises(modelseal.WrongKeyError):
        sealed_suspect(sealed_path, passphrase="not pw")
    with pytest.raises(modelseal.WrongKeyError):
        as_suspect(sealed_path, passphrase="not pw")


# --- budget and batching (no framework needed) ------------------------------------------------


class _Echo(Suspect):
    """Answers the first feature as the label; records each batch it is sent."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(name="echo", **kw)
        self.batches: list[int] = []

    def _query(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        return x[:, 0].copy()


def test_budget_is_checked_before_sending_and_counts_rows() -> None:
    s = _Echo(budget=10, batch_size=4)
    x = np.arange(11, dtype=np.float32).reshape(11, 1)
    with pytest.raises(SuspectError, match="query budget of 10 inputs spent"):
        s.predict(x)
    assert s.batches == [] and s.queries == 0
    np.testing.assert_array_equal(s.predict(x[:10]), np.arange(10))
    assert s.batches == [4, 4, 2] and s.queries == 10
    with pytest.raises(SuspectError, match="query budget of 10 inputs spent"):
        s.predict(x[:1])
    assert s.predict(x[:0]).shape == (0,)  # nothing asked, nothing spent
    assert s.predict_scores(x[:0]).shape == (0, 0)
    assert s.batches == [4, 4, 2]


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        _Echo(batch_size=0)
    with pytest.raises(ValueError, match="budget"):
        _Echo(budget=-1)
    with pytest.raises(ValueError, match="numeric"):
        _Echo().predict(np.array([["a"]]))


# --- labels_from_output / scores_from_output --------------------------------------------------


def test_labels_from_output_accepts() -> None:
    np.testing.assert_array_equal(labels_from_output(np.array([2, 0, 1]), 3), [2, 0, 1])
    whole = labels_from_output(np.array([2.0, 0.0, 1.0]), 3)
    assert whole.dtype == np.int64
    np.testing.assert_array_equal(whole, [2, 0, 1])
    np.testing.assert_array_equal(labels_from_output(np.array([[0.1, 0.9], [0.7, 0.3]]), 2), [1, 0])


@pytest.mark.parametrize(
    ("out", "n", "match"),
    [
        (np.array([[0.3], [0.8]]), 2, "single score"),
        (np.array([1, 2]), 3, "2 answers for 3 inputs"),
        (np.array([[0.1, np.nan], [0.5, 0.5]]), 2, "NaN or infinite"),
        (np.array([0.0, np.inf]), 2, "NaN or infinite"),
        (np.zeros((2, 3, 4)), 2, r"shape \(2, 3, 4\)"),
        (np.array([1, -1]), 2, "negative"),
        (np.array([0.5, 1.0]), 2, "not whole numbers"),
        (np.array(3), 1, "single value"),
        (np.array(["a", "b"]), 2, "not numeric"),
        (np.zeros((2, 0)), 2, "no scores"),
    ],
)
def test_labels_from_output_rejects(out: np.ndarray, n: int, match: str) -> None:
    with pytest.raises(SuspectError, match=match):
        labels_from_output(out, n)


def test_scores_from_output() -> None:
    scores = scores_from_output(np.array([[1, 0], [0, 1]], dtype=np.int32), 2)
    assert scores.dtype == np.float64 and scores.shape == (2, 2)
    assert scores_from_output(np.array([[0.3], [0.8]]), 2).shape == (2, 1)
    with pytest.raises(SuspectError, match="answers labels only"):
        scores_from_output(np.array([1, 2]), 2)
    with pytest.raises(SuspectError, match="NaN"):
        scores_from_output(np.array([[np.nan, 1.0]]), 1)
    with pytest.raises(SuspectError, match="1 answers for 2 inputs"):
        scores_from_output(np.array([[0.2, 0.8]]), 2)


# --- a real HTTP server -----------------------------------------------------------------------


def _rule(rows: list[list[float]]) -> list[int]:
    """The served model: the argmax of the first three features."""
    return [int(i) for i in np.argmax(np.asarray(rows)[:, :3], axis=1)]


def _softmax(rows: list[list[float]]) -> list[list[float]]:
    z = np.asarray(rows)[:, :3]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    probs: list[list[float]] = (e / e.sum(axis=1, keepdims=True)).tolist()
    return probs


Reply = tuple[int, Any, dict[str, str]]  # status, JSON value or raw bytes, extra headers


def _route(path: str, body: Any, raw: bytes, headers: Any, count: int) -> Reply:
    inputs: Any = body.get("inputs") if isinstance(body, dict) else None
    if path == "/labels":
        return 200, {"outputs": _rule(inputs)}, {}
    if path == "/probs":
        return 200, {"data": {"predictions": _softmax(inputs)}}, {}
    if path == "/nested":
        return 200, {"result": [{"scores": _softmax(inputs)}]}, {}
    if path == "/whole":
        return 200, _rule(inputs), {}
    if path == "/custom":
        if not (isinstance(body, dict) and body.get("model") == "v1" and "features" in body.get("instances", {})):
            return 400, {"error": "unexpected request"}, {}
        return 200, {"preds": _rule(body["instances"]["features"])}, {}
    if path == "/x-api-key":
        if headers.get("X-Api-Key") != "s3cret":
            return 401, {"error": "bad key"}, {}
        return 200, {"outputs": _rule(inputs)}, {}
    if path == "/bearer":
        if headers.get("Authorization") != "Bearer s3cret":
            return 403, {"error": "forbidden"}, {}
        return 200, {"outputs": _rule(inputs)}, {}
    if path == "/fail":
        return 500, b"internal error; " * 50, {}
    if path == "/flaky":
        if count == 1:
            return 429, {"error": "slow down"}, {"Retry-After": "0"}
        return 200, {"outputs": _rule(inputs)}, {}
    if path == "/slow":
        time.sleep(0.6)
        return 200, {"outputs": _rule(inputs)}, {}
    if path == "/malformed":
        return 200, b"<html>oops</html>", {}
    if path == "/short":
        return 200, {"outputs": _rule(inputs)[:-1]}, {}
    if path == "/nan":
        return 200, b'{"outputs": [[0.1, NaN, 0.3], [0.2, 0.2, 0.6]]}', {}
    if path == "/null":
        return 200, {"outputs": [0, None]}, {}
    if path == "/strings":
        return 200, {"outputs": ["cat", "dog"]}, {}
    if path == "/ragged":
        return 200, {"outputs": [[0.1, 0.9], [1.0]]}, {}
    if path == "/scalar":
        return 200, {"outputs": 3}, {}
    if path == "/redirect":
        return 302, b"", {"Location": "/labels"}
    if path == "/big":
        return 200, b"[" + b"0," * 3000 + b"0]", {}
    return 404, {"error": "no such route"}, {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.hits: collections.Counter[str] = collections.Counter()
        self.requests: list[tuple[str, dict[str, str], Any]] = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (the timeout test) breaks the pipe: expected

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def reset(self) -> None:
        with self.lock:
            self.hits.clear()
            self.requests.clear()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with self.server.lock:
            self.server.hits[self.path] += 1
            count = self.server.hits[self.path]
            self.server.requests.append((self.path, dict(self.headers), body))
        status, reply, extra = _route(self.path, body, raw, self.headers, count)
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def _server() -> Iterator[_Server]:
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(_server: _Server) -> _Server:
    _server.reset()
    return _server


@pytest.fixture
def rows() -> np.ndarray:
    return np.random.default_rng(2).standard_normal((10, 4)).astype(np.float32)


Make = Callable[..., HttpSuspect]


@pytest.fixture
def http(server: _Server) -> Iterator[Make]:
    made: list[HttpSuspect] = []

    def make(path: str, **kw: Any) -> HttpSuspect:
        kw.setdefault("retries", 0)
        s = HttpSuspect(server.url(path), **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_http_labels(http: Make, server: _Server, rows: np.ndarray) -> None:
    s = http("/labels", batch_size=4)
    labels = s.predict(rows)
    assert labels.dtype == np.int64
    assert labels.tolist() == _rule(rows.tolist())
    assert s.queries == 10 and server.hits["/labels"] == 3
    _, headers, body = server.requests[0]
    assert headers["Content-Type"] == "application/json"
    assert np.allclose(body["inputs"], rows[:4])
    with pytest.raises(SuspectError, match="answers labels only"):
        s.predict_scores(rows)
    assert s.name == f"http:{server.url('/labels')}"


@pytest.mark.parametrize(("path", "response_path"), [("/probs", "data.predictions"), ("/nested", "result.0.scores")])
def test_http_scores_under_a_path(http: Make, rows: np.ndarray, path: str, response_path: str) -> None:
    s = http(path, response_path=response_path)
    scores = s.predict_scores(rows)
    np.testing.assert_allclose(scores, _softmax(rows.tolist()), rtol=1e-6)
    assert s.predict(rows).tolist() == _rule(rows.tolist())


def test_http_whole_body_and_custom_template(http: Make, server: _Server, rows: np.ndarray) -> None:
    assert http("/whole", response_path="").predict(rows).tolist() == _rule(rows.tolist())
    s = http("/custom", request_template='{"instances": {"features": "$INPUTS"}, "model": "v1"}', response_path="preds")
    assert s.predict(rows).tolist() == _rule(rows.tolist())
    assert server.requests[-1][2]["model"] == "v1"


def test_http_api_key(http: Make, server: _Server, rows: np.ndarray) -> None:
    with pytest.raises(SuspectError, match=r"refused the API key \(none was given\): HTTP 401"):
        http("/x-api-key").predict(rows)
    with pytest.raises(SuspectError, match="refused the API key: HTTP 401"):
        http("/x-api-key", api_key="wrong", api_key_header="X-Api-Key").predict(rows)
    assert server.hits["/x-api-key"] == 2  # refused at once, not retried
    s = http("/x-api-key", api_key="s3cret", api_key_header="X-Api-Key")
    assert s.predict(rows).tolist() == _rule(rows.tolist())
    with pytest.raises(SuspectError, match="refused the API key: HTTP 403"):
        http("/bearer", api_key="wrong").predict(rows)
    assert http("/bearer", api_key="s3cret").predict(rows).tolist() == _rule(rows.tolist())
    assert "s3cret" not in repr(s)


def test_http_500_is_retried_then_fails(http: Make, server: _Server, rows: np.ndarray) -> None:
    s = http("/fail", retries=2)
    with pytest.raises(SuspectError, match="HTTP 500 3 times") as info:
        s.predict(rows)
    assert server.hits["/fail"] == 3
    excerpt = str(info.value).split(": ", 1)[1]
    assert excerpt.startswith("internal error;") and len(excerpt) <= 200
    assert s.queries == 10  # the endpoint saw them


def test_http_429_then_success(http: Make, server: _Server, rows: np.ndarray) -> None:
    assert http("/flaky", retries=1).predict(rows).tolist() == _rule(rows.tolist())
    assert server.hits["/flaky"] == 2


def test_http_other_4xx_is_not_retried(http: Make, server: _Server, rows: np.ndarray) -> None:
    with pytest.raises(SuspectError, match="HTTP 404"):
        http("/nowhere", retries=3).predict(rows)
    assert server.hits["/nowhere"] == 1


def test_http_timeout(http: Make, server: _Server, rows: np.ndarray) -> None:
    start = time.monotonic()
    with pytest.raises(SuspectError, match=r"timed out after 0.2 s"):
        http("/slow", timeout=0.2, retries=2).predict(rows)
    assert time.monotonic() - start < 0.55  # not retried
    assert server.hits["/slow"] == 1


def test_http_connection_refused_is_retried(rows: np.ndarray) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with (
        HttpSuspect(f"http://127.0.0.1:{port}/predict", retries=1) as s,
        pytest.raises(SuspectError, match="cannot reach the endpoint after 2 attempts"),
    ):
        s.predict(rows)


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("/malformed", r"not JSON.*<html>oops"),
        ("/short", "9 answers for 10 inputs"),
        ("/null", "not numeric"),
        ("/strings", "not numeric"),
        ("/ragged", "ragged"),
        ("/scalar", "'outputs' is a int, not a list"),
        ("/redirect", r"redirects \(HTTP 302 to /labels\)"),
    ],
)
def test_http_bad_answers(http: Make, server: _Server, rows: np.ndarray, path: str, match: str) -> None:
    n = 2 if path in ("/null", "/strings", "/ragged") else 10
    with pytest.raises(SuspectError, match=match):
        http(path, retries=2).predict(rows[:n])
    assert server.hits[path] == 1
    assert server.hits["/labels"] == 0  # the redirect was not followed


def test_http_nan_scores(http: Make, rows: np.ndarray) -> None:
    with pytest.raises(SuspectError, match="NaN"):
        http("/nan").predict_scores(rows[:2])


def test_http_missing_response_path(http: Make, rows: np.ndarray) -> None:
    with pytest.raises(SuspectError, match="no key 'predict' at data"):
        http("/probs", response_path="data.predict").predict(rows)
    with pytest.raises(SuspectError, match="no index '5'"):
        http("/nested", response_path="result.5.scores").predict(rows)
    with pytest.raises(SuspectError, match=r"data\.predictions\.0\.0 is a float, not an object or list"):
        http("/probs", response_path="data.predictions.0.0.x").predict(rows)
    with pytest.raises(SuspectError, match="no index 'x'"):
        http("/nested", response_path="result.x.scores").predict(rows)


def test_http_response_size_limit(http: Make, rows: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suspect_module, "MAX_RESPONSE_BYTES", 1000)
    with pytest.raises(SuspectError, match="over the 1000-byte limit"):
        http("/big", response_path="").predict(rows)


def test_http_budget_refuses_before_any_request(http: Make, server: _Server) -> None:
    s = http("/labels", budget=10, batch_size=3)
    x = np.zeros((11, 4), dtype=np.float32)
    with pytest.raises(SuspectError, match="query budget of 10 inputs spent"):
        s.predict(x)
    assert server.hits["/labels"] == 0 and s.queries == 0
    s.predict(x[:10])
    assert s.queries == 10 and server.hits["/labels"] == 4
    with pytest.raises(SuspectError, match="query budget"):
        s.predict_scores(x[:1])
    assert server.hits["/labels"] == 4


def test_http_constructor_validates() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        HttpSuspect("http://127.0.0.1:1/", request_template="{inputs: $INPUTS}")
    with pytest.raises(ValueError, match="found 0"):
        HttpSuspect("http://127.0.0.1:1/", request_template='{"inputs": "$INPUT"}')
    with pytest.raises(ValueError, match="found 2"):
        HttpSuspect("http://127.0.0.1:1/", request_template='{"a": "$INPUTS", "b": ["$INPUTS"]}')
    with pytest.raises(ValueError, match="http"):
        HttpSuspect("ftp://example.com/model")
    with HttpSuspect("https://user:pw@example.com/predict?token=abc") as s:
        assert s.name == "http:https://example.com/predict"  # no credentials in reports


# --- as_suspect and the import cost -----------------------------------------------------------


def test_as_suspect_dispatch(mlp: Any, onnx_path: Path, sealed_path: Path, tmp_path: Path) -> None:
    echo = _Echo()
    assert as_suspect(echo) is echo
    assert isinstance(as_suspect(mlp, budget=5), TorchSuspect)
    assert as_suspect(mlp, budget=5).budget == 5
    assert isinstance(as_suspect(onnx_path), OnnxSuspect)
    assert isinstance(as_suspect(str(onnx_path)), OnnxSuspect)
    assert isinstance(as_suspect(onnx_path.read_bytes()), OnnxSuspect)
    assert isinstance(as_suspect(ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])), OnnxSuspect)
    sealed = as_suspect(sealed_path, passphrase="pw")
    assert isinstance(sealed, OnnxSuspect) and sealed.name.startswith("sealed:")
    with as_suspect("https://example.com/predict", budget=7) as http_suspect:
        assert isinstance(http_suspect, HttpSuspect) and http_suspect.budget == 7
    with pytest.raises(ValueError, match="cannot tell"):
        as_suspect(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="cannot make a suspect of a int"):
        as_suspect(42)
    with pytest.raises(ValueError, match="key arguments"):
        as_suspect(onnx_path, passphrase="pw")
    with pytest.raises(ValueError, match="set the budget on the Suspect"):
        as_suspect(echo, budget=3)


def test_import_is_light() -> None:
    code = "import sys, modelseal.ownership.suspect; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert "modelseal" in loaded
    heavy = {"torch", "onnxruntime", "onnx", "httpx"}
    assert not loaded & heavy, f"importing modelseal.ownership.suspect imported {sorted(loaded & heavy)}"
