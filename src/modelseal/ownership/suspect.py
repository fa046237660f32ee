"""Suspect models: a possible stolen copy, queried with batches of secret inputs.

Ownership verification sends inputs to a suspect and counts how often it answers like our
watermarked model. A suspect can be a PyTorch module, an ONNX model, a sealed container or an
HTTP endpoint; :func:`as_suspect` picks the right wrapper. Every wrapper answers labels
(:meth:`Suspect.predict`) and, where the model gives them, scores (:meth:`Suspect.predict_scores`),
counts the inputs it sent (``queries``) and refuses to go past its query ``budget``: the inputs are
secret, and an endpoint operator sees every one of them.

Anything that stops a suspect from answering usefully (an endpoint that errors or times out, an
output of the wrong shape, NaN scores, a spent budget) raises :class:`~modelseal.errors.SuspectError`.
Frameworks (torch, onnxruntime, httpx) are imported only when a wrapper that needs them is built.
"""

from __future__ import annotations

import abc
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from ..errors import SuspectError

if TYPE_CHECKING:
    import httpx
    import onnxruntime
    import torch
    from typing_extensions import Self, Unpack

    from ..loaders import OpenKeys

__all__ = [
    "HttpSuspect",
    "OnnxSuspect",
    "Suspect",
    "TorchSuspect",
    "as_suspect",
    "labels_from_output",
    "scores_from_output",
    "sealed_suspect",
]

Labels = npt.NDArray[np.int64]
Scores = npt.NDArray[np.float64]
_Answer = TypeVar("_Answer", Labels, Scores)

MAX_RESPONSE_BYTES = 64 * 2**20
"""An HTTP response body larger than this is refused (a suspect must not exhaust our memory)."""

_MAX_LABEL = 2**62  # far above any class count; keeps float -> int64 conversion exact enough to be safe
_MAX_RETRY_AFTER_S = 5.0
_BACKOFF_S = 0.1
_EXCERPT_CHARS = 200
_PLACEHOLDER = "$INPUTS"


# --- validating what a suspect answers --------------------------------------------------------


def _numeric(out: Any, n: int) -> npt.NDArray[Any]:
    """``out`` as a numeric array of ``n`` rows, 1-D or 2-D, finite; else SuspectError."""
    try:
        arr = np.asarray(out)
    except ValueError as exc:  # a ragged nested list
        raise SuspectError(f"the output is ragged (rows of different lengths): {exc}") from None
    if arr.dtype.kind not in "iuf":  # booleans are not labels: a mapping to the wrong field, most likely
        raise SuspectError(f"the output is not numeric (dtype {arr.dtype})")
    if arr.ndim == 0:
        raise SuspectError(f"the output is a single value, not one answer for each of the {n} inputs")
    if arr.ndim > 2:
        raise SuspectError(f"the output has shape {arr.shape}: expected ({n},) labels or ({n}, K) scores")
    if arr.shape[0] != n:
        raise SuspectError(f"the output has {arr.shape[0]} answers for {n} inputs (shape {arr.shape})")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise SuspectError("the output contains NaN or infinite values")
    return arr


def labels_from_output(out: npt.NDArray[Any], n: int) -> Labels:
    """Class labels from a model's raw output for ``n`` inputs.

    Args:
        out: ``(n,)`` labels (integers, or floats that are whole numbers), or ``(n, K)`` scores
            with ``K >= 2`` (the label is the argmax).
        n: The number of inputs the output answers.

    Returns:
        ``(n,)`` int64 labels.

    Raises:
        SuspectError: Wrong number of answers, NaN or infinity, more than two dimensions, negative
            or fractional labels, non-numeric values, or a single score per input (which does not
            say which class was meant).
    """
    arr = _numeric(out, n)
    if arr.ndim == 2:
        k = arr.shape[1]
        if k == 0:
            raise SuspectError(f"the output has shape {arr.shape}: no scores")
        if k == 1:
            raise SuspectError(
                f"the output has shape {arr.shape}: a single score per input does not name a class "
                "(a binary model's one logit?); map it to labels before querying"
            )
        return np.asarray(np.argmax(arr, axis=1), dtype=np.int64)
    if arr.size and (arr.min() < 0):
        raise SuspectError(f"the output contains negative labels (min {arr.min()})")
    if arr.size and arr.max() >= _MAX_LABEL:
        raise SuspectError(f"the output contains implausibly large labels (max {arr.max()})")
    if arr.dtype.kind == "f" and not np.array_equal(arr, np.floor(arr)):
        raise SuspectError("the output is 1-D but not whole numbers: expected class labels")
    return arr.astype(np.int64)


def scores_from_output(out: npt.NDArray[Any], n: int) -> Scores:
    """Per-class scores from a model's raw output for ``n`` inputs.

    Args:
        out: ``(n, K)`` numeric scores (probabilities or logits, as the model gives them).
        n: The number of inputs the output answers.

    Returns:
        ``(n, K)`` float64 scores.

    Raises:
        SuspectError: The suspect answers labels only (1-D output), or the output has the wrong
            number of rows, no columns, NaN or infinity, or non-numeric values.
    """
    arr = _numeric(out, n)
    if arr.ndim == 1:
        raise SuspectError(f"the suspect answers labels only (output of shape {arr.shape}), not scores")
    if arr.shape[1] == 0:
        raise SuspectError(f"the output has shape {arr.shape}: no scores")
    return arr.astype(np.float64)


# --- the interface ----------------------------------------------------------------------------


class Suspect(abc.ABC):
    """A model under suspicion, queried with batches of inputs.

    Subclasses implement :meth:`_query` (one batch in, the raw output out); this class checks
    the query budget before anything is sent, splits inputs into batches, validates the answers
    and counts the inputs sent.

    Attributes:
        name: A human-readable description for reports, e.g. ``"onnx:path/model.onnx"``.
        queries: Inputs sent so far, counted per input row (a retried request counts once).
        budget: The most inputs this suspect may be sent in all; ``None`` for no limit.
        batch_size: The most inputs sent in one request.
    """

    name: str
    queries: int
    budget: int | None
    batch_size: int

    def __init__(self, *, name: str, budget: int | None = None, batch_size: int = 256) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 or None, not {budget}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.name = name
        self.budget = budget
        self.batch_size = batch_size
        self.queries = 0

    def predict(self, x: npt.NDArray[Any]) -> Labels:
        """Labels ``(n,)`` int64 for inputs ``x`` of shape ``(n, ...)`` (float32).

        Raises:
            SuspectError: The budget would be exceeded (nothing is sent), or the suspect failed or
                answered something that is not one label or score row per input.
        """
        return self._run(x, labels_from_output)

    def predict_scores(self, x: npt.NDArray[Any]) -> Scores:
        """Scores ``(n, K)`` float64 for inputs ``x`` (probabilities or logits, as the model gives them).

        Raises:
            SuspectError: As :meth:`predict`, and when the suspect answers labels only.
        """
        return self._run(x, scores_from_output)

    @abc.abstractmethod
    def _query(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Send one batch (at most ``batch_size`` rows) and return the raw output; SuspectError on failure."""

    def close(self) -> None:  # noqa: B027 - a no-op default that wrappers holding resources override
        """Release what the suspect holds (an HTTP connection pool); the default does nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, queries={self.queries}, budget={self.budget})"

    def _run(self, x: npt.NDArray[Any], convert: Callable[[npt.NDArray[Any], int], _Answer]) -> _Answer:
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise ValueError(f"inputs must be numeric, not {x.dtype}")
        if x.ndim == 0:
            raise ValueError("inputs must have shape (n, ...), not be a scalar")
        if x.dtype.kind != "f":
            x = x.astype(np.float32)
        n = x.shape[0]
        if self.budget is not None and self.queries + n > self.budget:
            raise SuspectError(f"query budget of {self.budget} inputs spent: {self.queries} sent, {n} more asked for")
        parts = []
        for start in range(0, n, self.batch_size):
            batch = x[start : start + self.batch_size]
            try:
                out = self._query(batch)
            except SuspectError:
                self.queries += len(batch)  # the suspect may have seen them
                raise
            self.queries += len(batch)
            parts.append(convert(out, len(batch)))
        if not parts:  # no inputs: no answers (and no number of classes to report)
            empty = np.zeros((0, 0), np.float64) if convert is scores_from_output else np.zeros(0, np.int64)
            return cast(_Answer, empty)
        if len({p.shape[1:] for p in parts}) > 1:
            raise SuspectError(f"the suspect answered batches with different shapes: {[p.shape for p in parts]}")
        return cast(_Answer, np.concatenate(parts))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:500] if lines else type(exc).__name__


# --- PyTorch ----------------------------------------------------------------------------------


class TorchSuspect(Suspect):
    """A PyTorch module, run in eval mode without gradients on the device of its parameters.

    The module's output may be a tensor, a tuple or list whose first item is one, or an object
    with a ``logits`` tensor (Hugging Face model outputs).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        budget: int | None = None,
        batch_size: int = 256,
        name: str | None = None,
    ) -> None:
        import torch

        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"expected a torch.nn.Module, not {type(module).__name__}")
        super().__init__(name=name or f"torch:{type(module).__name__}", budget=budget, batch_size=batch_size)
        self.module = module.eval()
        floating = [p for p in module.parameters() if p.is_floating_point()]
        # float32 unless the model's weights are another float type (a half-precision model)
        self._dtype = floating[0].dtype if floating else torch.float32
        self._device = floating[0].device if floating else torch.device("cpu")

    def _query(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        import torch

        try:
            with torch.no_grad():
                out = self.module(torch.from_numpy(np.ascontiguousarray(x)).to(self._device, self._dtype))
        except Exception as exc:
            raise SuspectError(f"the model failed on a batch of shape {tuple(x.shape)}: {_first_line(exc)}") from exc
        if not isinstance(out, torch.Tensor):
            if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
                out = out[0]
            elif isinstance(getattr(out, "logits", None), torch.Tensor):
                out = out.logits
            else:
                raise SuspectError(f"the model returned {type(out).__name__}, not a tensor")
        out = out.detach().cpu()
        if out.is_floating_point() and out.dtype != torch.float64:
            out = out.float()  # bfloat16 has no numpy type
        return np.asarray(out.numpy())


# --- ONNX -------------------------------------------------------------------------------------

_ONNX_FLOAT_TYPES: dict[str, type[np.floating[Any]]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}


class OnnxSuspect(Suspect):
    """An ONNX model run with ONNX Runtime: a file, the model's bytes, or an open ``InferenceSession``.

    The model's only input (or ``input_name``) gets the batch, cast to its float type; the
    first output (or ``output_name``) is the answer. A model whose batch dimension is fixed to 1
    is sent one row at a time.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes | onnxruntime.InferenceSession,
        *,
        input_name: str | None = None,
        output_name: str | None = None,
        budget: int | None = None,
        batch_size: int = 256,
        name: str | None = None,
        providers: Sequence[Any] | None = None,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            default_name = f"onnx:{path}"
            session = _open_onnx(path, providers, what=path)
        elif isinstance(model, (bytes, bytearray, memoryview)):
            default_name = f"onnx:<{len(model)} bytes>"
            session = _open_onnx(bytes(model), providers, what="the given bytes")
        elif callable(getattr(model, "get_inputs", None)) and callable(getattr(model, "run", None)):
            default_name = "onnx:<InferenceSession>"
            session = model
        else:
            raise TypeError(f"expected an ONNX path, bytes or InferenceSession, not {type(model).__name__}")
        super().__init__(name=name or default_name, budget=budget, batch_size=batch_size)
        self.session = session

        inputs = {i.name: i for i in session.get_inputs()}
        if input_name is None:
            if len(inputs) != 1:
                raise SuspectError(f"the model has {len(inputs)} inputs {sorted(inputs)}: pass input_name=")
            input_name = next(iter(inputs))
        elif input_name not in inputs:
            raise SuspectError(f"the model has no input {input_name!r} (inputs: {sorted(inputs)})")
        outputs = [o.name for o in session.get_outputs()]
        if output_name is None:
            if not outputs:
                raise SuspectError("the model has no outputs")
            output_name = outputs[0]
        elif output_name not in outputs:
            raise SuspectError(f"the model has no output {output_name!r} (outputs: {outputs})")
        meta = inputs[input_name]
        if meta.type not in _ONNX_FLOAT_TYPES:
            raise SuspectError(f"input {input_name!r} has type {meta.type}: only float inputs are supported")
        self.input_name: str = input_name
        self.output_name: str = output_name
        self._dtype = _ONNX_FLOAT_TYPES[meta.type]
        shape = list(meta.shape or [])
        self._one_at_a_time = bool(shape) and shape[0] == 1

    def _query(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        x = np.ascontiguousarray(x, dtype=self._dtype)
        if not self._one_at_a_time:
            return np.asarray(self._run_session(x))
        rows = []
        for i in range(len(x)):
            out = np.asarray(self._run_session(x[i : i + 1]))
            rows.append(out[0] if out.ndim >= 1 and out.shape[0] == 1 else out)
        try:
            return np.stack(rows)
        except ValueError as exc:
            raise SuspectError(f"the model's answers to single rows differ in shape: {exc}") from None

    def _run_session(self, x: npt.NDArray[Any]) -> Any:
        try:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        except Exception as exc:  # ORT raises pybind11 exception types without a common base
            raise SuspectError(
                f"ONNX Runtime failed on a batch of shape {tuple(x.shape)}: {_first_line(exc)}"
            ) from None


def _open_onnx(model: str | bytes, providers: Sequence[Any] | None, *, what: str) -> Any:
    import onnxruntime as ort

    if isinstance(model, str) and not os.path.isfile(model):
        raise SuspectError(f"{model}: no such ONNX model file")
    try:
        return ort.InferenceSession(model, providers=list(providers) if providers is not None else None)
    except Exception as exc:  # ORT raises pybind11 exception types without a common base
        raise SuspectError(f"{what} is not a loadable ONNX model: {_first_line(exc)}") from None


def sealed_suspect(
    path: str | os.PathLike[str],
    *,
    budget: int | None = None,
    batch_size: int = 256,
    input_name: str | None = None,
    output_name: str | None = None,
    providers: Sequence[Any] | None = None,
    **open_keys: Unpack[OpenKeys],
) -> OnnxSuspect:
    """An ONNX model inside a sealed container, opened in memory with :func:`modelseal.load_onnx`.

    Args:
        path: The container.
        open_keys: The key arguments of :func:`modelseal.open` (``identity``, ``passphrase``,
            ``require_signer``, ``keyserver``, ``licence``, ``grant_token``).
        budget, batch_size, input_name, output_name, providers: As for :class:`OnnxSuspect`.

    Raises:
        WrongKeyError, IntegrityError, SignatureError, FormatError, ModelLoadError: Unchanged from
            opening the container (the container is at fault, not the suspect's answers).
        SuspectError: The model's inputs or outputs do not fit (see :class:`OnnxSuspect`).
    """
    from ..loaders import load_onnx

    session = load_onnx(path, providers=providers, **open_keys)
    return OnnxSuspect(
        session,
        input_name=input_name,
        output_name=output_name,
        budget=budget,
        batch_size=batch_size,
        name=f"sealed:{os.fspath(path)}",
    )


# --- HTTP -------------------------------------------------------------------------------------


def _placeholder_paths(node: Any, at: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    if node == _PLACEHOLDER and isinstance(node, str):
        return [at]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _placeholder_paths(v, (*at, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _placeholder_paths(v, (*at, i))]
    return []


def _substitute(node: Any, value: Any) -> Any:
    if isinstance(node, str) and node == _PLACEHOLDER:
        return value
    if isinstance(node, dict):
        return {k: _substitute(v, value) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, value) for v in node]
    return node


def _excerpt(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    return text if len(text) <= _EXCERPT_CHARS else text[: _EXCERPT_CHARS - 3] + "..."


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        import email.utils

        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER_S)


def _display_url(url: str) -> str:
    """The URL without credentials or query string, for reports."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


class HttpSuspect(Suspect):
    """A model behind an HTTP endpoint that takes a JSON batch and answers JSON.

    Each batch is POSTed as ``request_template`` with the JSON string ``"$INPUTS"`` replaced by
    the batch as nested lists; the answer is found in the response at ``response_path``
    (dot-separated keys and list indices, ``""`` for the whole body) and must be a list of one
    label or one list of scores per input.

    Connection errors, 429 and 5xx are retried ``retries`` times with a short exponential backoff
    (honouring ``Retry-After`` up to 5 s); other errors, timeouts and malformed answers raise
    :class:`~modelseal.errors.SuspectError` at once. Redirects are not followed and response
    bodies over 64 MiB are refused.

    Args:
        url: The endpoint (``http://`` or ``https://``).
        api_key: Sent in ``api_key_header``: as ``Bearer <key>`` for ``Authorization``, raw otherwise.
        request_template: A JSON document with exactly one ``"$INPUTS"`` string value.
        response_path: Where the answers are in the response, e.g. ``"data.predictions"``.
        headers: Extra request headers.
        timeout: Seconds to wait for a response before giving up (not retried).
        retries: How many times a failed request is retried.
        transport: An ``httpx`` transport, for advanced use (proxies, custom TLS).

    Raises:
        ValueError: A URL that is not http(s), a template that is not JSON or does not hold
            exactly one ``"$INPUTS"``, a negative timeout or retry count.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        api_key_header: str = "Authorization",
        request_template: str = '{"inputs": "$INPUTS"}',
        response_path: str = "outputs",
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        retries: int = 2,
        budget: int | None = None,
        batch_size: int = 64,
        name: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in ("http", "https") or not urllib.parse.urlsplit(url).hostname:
            raise ValueError(f"the suspect URL must be http:// or https:// with a host, not {url!r}")
        try:
            template = json.loads(request_template)
        except json.JSONDecodeError as exc:
            raise ValueError(f"request_template is not JSON: {exc}") from None
        found = _placeholder_paths(template)
        if len(found) != 1:
            raise ValueError(
                f'request_template must hold exactly one "{_PLACEHOLDER}" string value, found {len(found)}'
            )
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, not {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries}")
        super().__init__(name=name or f"http:{_display_url(url)}", budget=budget, batch_size=batch_size)

        import httpx

        self.url = url
        self.timeout = float(timeout)
        self.retries = retries
        self.response_path = response_path
        self._template = template
        self._api_key_given = api_key is not None
        self._path: list[str] = response_path.split(".") if response_path else []
        sent = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        if api_key is not None:
            sent[api_key_header] = f"Bearer {api_key}" if api_key_header.lower() == "authorization" else api_key
        self._client = httpx.Client(headers=sent, timeout=self.timeout, follow_redirects=False, transport=transport)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def _query(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if not np.isfinite(x).all():
            raise ValueError("inputs contain NaN or infinity, which JSON cannot carry")
        body = json.dumps(_substitute(self._template, x.tolist()), allow_nan=False).encode()
        status, content = self._post(body)
        try:
            answer = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SuspectError(f"the response (HTTP {status}) is not JSON ({exc}): {_excerpt(content)}") from None
        value = self._follow(answer)
        if not isinstance(value, list):
            raise SuspectError(
                f"the response's {self._where()} is a {type(value).__name__}, not a list of answers: "
                f"{_excerpt(json.dumps(value).encode())}"
            )
        try:
            return np.asarray(value)
        except ValueError as exc:
            raise SuspectError(f"the response's {self._where()} is ragged or mixed: {exc}") from None

    def _where(self) -> str:
        return f"'{self.response_path}'" if self.response_path else "body"

    def _follow(self, node: Any) -> Any:
        for depth, key in enumerate(self._path):
            at = ".".join(self._path[:depth]) or "the top level"
            if isinstance(node, dict):
                if key not in node:
                    raise SuspectError(f"the response has no {self._where()}: no key {key!r} at {at}")
                node = node[key]
            elif isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise SuspectError(
                        f"the response has no {self._where()}: {at} is a list of {len(node)}, no index {key!r}"
                    )
                node = node[int(key)]
            else:
                raise SuspectError(
                    f"the response has no {self._where()}: {at} is a {type(node).__name__}, not an object or list"
                )
        return node

    def _post(self, body: bytes) -> tuple[int, bytes]:
        import httpx

        attempts = self.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                status, content, headers = self._send(body)
            except httpx.TimeoutException:
                raise SuspectError(f"the endpoint timed out after {self.timeout:g} s") from None
            except httpx.TransportError as exc:
                if last:
                    raise SuspectError(f"cannot reach the endpoint after {attempts} attempts: {exc}") from None
                time.sleep(_BACKOFF_S * 2**attempt)
                continue
            if 200 <= status < 300:
                return status, content
            if status == 429 or status >= 500:
                if last:
                    raise SuspectError(f"the endpoint answered HTTP {status} {attempts} times: {_excerpt(content)}")
                wait = _retry_after(headers.get("retry-after"))
                time.sleep(wait if wait is not None else _BACKOFF_S * 2**attempt)
                continue
            if status in (401, 403):
                given = "" if self._api_key_given else " (none was given)"
                raise SuspectError(f"the endpoint refused the API key{given}: HTTP {status}: {_excerpt(content)}")
            if 300 <= status < 400:
                where = headers.get("location", "?")
                raise SuspectError(f"the endpoint redirects (HTTP {status} to {where}); redirects are not followed")
            raise SuspectError(f"the endpoint answered HTTP {status}: {_excerpt(content)}")
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(self, body: bytes) -> tuple[int, bytes, httpx.Headers]:
        # httpx's timeout bounds each read; an endpoint trickling a byte at a time would never trip
        # it, so the whole exchange also has a deadline of ``timeout`` seconds.
        deadline = time.monotonic() + self.timeout
        with self._client.stream("POST", self.url, content=body) as response:
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
                raise SuspectError(f"the response is {int(declared)} bytes, over the {MAX_RESPONSE_BYTES}-byte limit")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                if time.monotonic() > deadline:
                    raise SuspectError(f"the endpoint timed out after {self.timeout:g} s (response still arriving)")
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise SuspectError(f"the response is over the {MAX_RESPONSE_BYTES}-byte limit")
                chunks.append(chunk)
            return response.status_code, b"".join(chunks), response.headers


# --- dispatch ---------------------------------------------------------------------------------


def as_suspect(obj: Any, *, budget: int | None = None, **open_keys: Unpack[OpenKeys]) -> Suspect:
    """Wrap whatever names a suspect model in the matching :class:`Suspect`.

    ============================================  =====================
    ``obj``                                       wrapper
    ============================================  =====================
    a :class:`Suspect`                            itself, unchanged
    a ``torch.nn.Module``                         :class:`TorchSuspect`
    an ``onnxruntime.InferenceSession``, bytes    :class:`OnnxSuspect`
    a string starting ``http://``/``https://``    :class:`HttpSuspect`
    a path with ``.mseal`` in its name            :func:`sealed_suspect`
    a path ending ``.onnx``                       :class:`OnnxSuspect`
    ============================================  =====================

    Args:
        obj: The suspect.
        budget: The query budget of the wrapper built (a :class:`Suspect` keeps its own).
        open_keys: Key arguments for a sealed container (as :func:`modelseal.open`).

    Raises:
        ValueError: ``obj`` is none of the above, ``budget`` is given with a :class:`Suspect` whose
            budget differs, or key arguments are given for something that is not a container.
        SuspectError, WrongKeyError, ...: As the wrapper raises when built.
    """
    if any(v is not None for v in open_keys.values()):
        text = os.fspath(obj) if isinstance(obj, (str, os.PathLike)) else None
        if not isinstance(text, str) or ".mseal" not in Path(text).name.lower():
            raise ValueError(f"key arguments are for a sealed container, not {obj!r}")
    if isinstance(obj, Suspect):
        if budget is not None and budget != obj.budget:
            raise ValueError(f"budget={budget} given for {obj!r}: set the budget on the Suspect itself")
        return obj
    if isinstance(obj, (str, os.PathLike)) and isinstance(os.fspath(obj), str):
        text = os.fspath(obj)
        if text.lower().startswith(("http://", "https://")):
            return HttpSuspect(text, budget=budget)
        if ".mseal" in Path(text).name.lower():
            return sealed_suspect(text, budget=budget, **open_keys)
        if text.lower().endswith(".onnx"):
            return OnnxSuspect(text, budget=budget)
        raise ValueError(f"cannot tell what kind of suspect {text!r} is: expected an http(s) URL, .mseal or .onnx")
    if isinstance(obj, (bytes, bytearray, memoryview)) or _is_instance_of(obj, "onnxruntime", "InferenceSession"):
        return OnnxSuspect(obj, budget=budget)
    if _is_instance_of(obj, "torch", "nn", "Module"):
        return TorchSuspect(obj, budget=budget)
    raise ValueError(
        f"cannot make a suspect of a {type(obj).__name__}: expected a Suspect, torch.nn.Module, "
        "onnxruntime.InferenceSession, ONNX bytes, an http(s) URL, or a .mseal or .onnx path"
    )


def _is_instance_of(obj: Any, module: str, *attrs: str) -> bool:
    """``isinstance(obj, module.attr...)`` without importing ``module`` (an object of its types needs it loaded)."""
    cls: Any = sys.modules.get(module)
    for attr in attrs:
        cls = getattr(cls, attr, None)
    return isinstance(cls, type) and isinstance(obj, cls)
