"""Models to steal from: a local model, an ONNX or sealed file, or a modelseal gateway over HTTP.

Every target is a :data:`~modelseal.lab.extraction.Victim`: a callable from a batch of inputs
``(n, *input_shape)`` to int64 labels ``(n,)`` (``outputs="labels"``) or float64 class
probabilities ``(n, K)`` (``outputs="probabilities"``), so any attack in
:mod:`modelseal.lab.extraction` takes any target. Each counts what it answered: ``queries`` (input
rows answered) and ``calls`` (times it was called); :class:`HttpTarget` also counts per API key.

A target that will not answer any more raises :class:`QueryRefused`, carrying the answers to the
rows it did answer before refusing (a prefix of the batch). Attacks stop there and train on what they
got. :class:`LocalTarget` and :class:`OnnxTarget` take an optional ``quota`` (rows in all) to play a
rate-limited victim without a gateway; :class:`HttpTarget` is refused by the gateway itself (HTTP 429
when a key's quota is used up, 401/403 for a revoked or unknown key) and moves on to its next key,
so a thief with several "sybil" accounts gets the sum of their quotas.

Answers that are not one label or one probability row per input raise :class:`MalformedAnswer`;
anything else that stops a target from answering raises :class:`TargetError`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import ModelSealError, SuspectError

if TYPE_CHECKING:
    import httpx
    from torch import nn
    from typing_extensions import Unpack

    from ..loaders import OpenKeys
    from ..ownership.suspect import OnnxSuspect

__all__ = [
    "HttpTarget",
    "LocalTarget",
    "MalformedAnswer",
    "OnnxTarget",
    "QueryRefused",
    "Target",
    "TargetError",
]

OUTPUTS = ("labels", "probabilities")
_EXCERPT_CHARS = 200


class TargetError(ModelSealError):
    """A target could not answer (an unreachable endpoint, an HTTP error, a failing runtime)."""


class MalformedAnswer(TargetError):
    """A target answered something that is not one label or one probability row per input."""


class QueryRefused(TargetError):
    """The target refuses further queries (a quota is used up, every API key is refused).

    Attributes:
        answers: Answers to the rows answered before the refusal: the first ``len(answers)`` rows of
            the batch asked about, in the target's output format; ``None`` when nothing was answered.
        retry_after: Seconds until the target may answer again (the soonest of its keys); ``None``
            when waiting will not help or is not known.
    """

    def __init__(self, message: str, *, answers: np.ndarray | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.answers = answers
        self.retry_after = retry_after

    @property
    def answered(self) -> int:
        """How many rows of the refused batch were answered."""
        return 0 if self.answers is None else len(self.answers)


def _check_outputs(outputs: str) -> None:
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs must be one of {', '.join(OUTPUTS)}, got {outputs!r}")


def _labels(raw: Any, n: int, where: str) -> np.ndarray:
    """``raw`` as ``(n,)`` int64 labels, or MalformedAnswer."""
    try:
        arr = np.asarray(raw)
    except ValueError:
        raise MalformedAnswer(f"{where}: the labels are ragged") from None
    if arr.dtype.kind not in "iu":  # booleans or floats are a mapping to the wrong field, most likely
        raise MalformedAnswer(f"{where}: labels must be integers, got {arr.dtype}")
    if arr.shape != (n,):
        raise MalformedAnswer(f"{where}: expected {n} labels, got shape {arr.shape}")
    if n and arr.min() < 0:
        raise MalformedAnswer(f"{where}: negative label {arr.min()}")
    return arr.astype(np.int64)


def _probabilities(raw: Any, n: int, where: str) -> np.ndarray:
    """``raw`` as ``(n, K)`` float64 probabilities (K >= 2, finite, non-negative, no all-zero row)."""
    try:
        arr = np.asarray(raw)
    except ValueError:
        raise MalformedAnswer(f"{where}: the scores are ragged") from None
    if arr.dtype.kind not in "iuf":
        raise MalformedAnswer(f"{where}: scores must be numbers, got {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] < 2:
        raise MalformedAnswer(f"{where}: expected scores of shape ({n}, K) with K >= 2, got {arr.shape}")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)) or np.any(out < 0) or np.any(out.sum(axis=1) <= 0):
        raise MalformedAnswer(f"{where}: scores must be finite, non-negative and not all zero in a row")
    return out


def _softmax_unless_probabilities(out: np.ndarray, scores: str) -> np.ndarray:
    """The gateway runner's rule: ``auto`` takes rows that are non-negative and sum to 1 as they are."""
    if scores == "logits" or (
        scores == "auto" and not (np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))
    ):
        out = out - out.max(axis=1, keepdims=True)
        out = np.exp(out)
        out /= out.sum(axis=1, keepdims=True)
    return out


class Target:
    """A victim with a query counter: call it with a batch, get labels or probabilities.

    Subclasses implement :meth:`_answer` (at most ``batch_size`` rows in, validated answers out).

    Attributes:
        outputs: ``"labels"`` or ``"probabilities"``.
        name: For reports.
        queries: Input rows answered so far.
        calls: Times the target was called (each call may be several requests).
        batch_size: The most rows answered in one go; ``None`` for the whole call at once.
        quota: The most rows this target answers in all (``None``: no limit); past it, :class:`QueryRefused`.
    """

    def __init__(self, outputs: str, *, name: str, batch_size: int | None = None, quota: int | None = None) -> None:
        _check_outputs(outputs)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 or None, got {batch_size}")
        if quota is not None and quota < 0:
            raise ValueError(f"quota must be non-negative or None, got {quota}")
        self.outputs = outputs
        self.name = name
        self.batch_size = batch_size
        self.quota = quota
        self.queries = 0
        self.calls = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, outputs={self.outputs!r}, queries={self.queries})"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Answers for the rows of ``x``: ``(n,)`` int64 labels or ``(n, K)`` float64 probabilities.

        Raises:
            QueryRefused: The target stopped answering; ``answers`` holds what it answered of ``x``.
            MalformedAnswer, TargetError: As the target fails.
            ValueError: ``x`` is not a numeric batch.
        """
        x = np.asarray(x)
        if x.dtype.kind not in "biuf" or x.ndim < 1:
            raise ValueError(f"inputs must be a numeric batch of shape (n, ...), got {x.dtype} {x.shape}")
        x = x.astype(np.float32, copy=False)
        self.calls += 1
        n = len(x)
        step = self.batch_size or max(n, 1)
        parts: list[np.ndarray] = []
        for start in range(0, n, step):
            batch = x[start : start + step]
            room = None if self.quota is None else self.quota - self.queries
            if room is not None and room < len(batch):
                if room > 0:
                    self._take(batch[:room], parts)
                raise QueryRefused(f"{self.name}: the quota of {self.quota} rows is used up", answers=_joined(parts))
            self._take(batch, parts)
        if not parts:
            return np.zeros(0, np.int64) if self.outputs == "labels" else np.zeros((0, 0), np.float64)
        return np.concatenate(parts)

    def _take(self, batch: np.ndarray, parts: list[np.ndarray]) -> None:
        """Answer ``batch`` into ``parts``, counting it; a refusal carries everything answered so far."""
        try:
            answers = self._answer(batch)
        except QueryRefused as exc:
            if exc.answers is not None:
                parts.append(exc.answers)
                self.queries += len(exc.answers)
            raise QueryRefused(str(exc), answers=_joined(parts), retry_after=exc.retry_after) from None
        parts.append(answers)
        self.queries += len(batch)

    def _answer(self, x: np.ndarray) -> np.ndarray:
        """Validated answers to one batch; a QueryRefused may carry the answers to a prefix of it."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the target holds (an HTTP connection pool); the default does nothing."""

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _joined(parts: list[np.ndarray]) -> np.ndarray | None:
    return np.concatenate(parts) if parts else None


class LocalTarget(Target):
    """A PyTorch model in this process (or any callable returning labels or probabilities).

    Args:
        model: A ``torch.nn.Module`` giving logits (answered through
            :func:`modelseal.lab.models.predict` / :func:`~modelseal.lab.models.probabilities`), or a
            callable from a batch to answers in the ``outputs`` format.
        outputs: What the target reveals.
        batch_size, quota: As for :class:`Target`.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[np.ndarray], np.ndarray],
        outputs: str = "labels",
        *,
        batch_size: int | None = None,
        quota: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(outputs, name=name or f"local:{type(model).__name__}", batch_size=batch_size, quota=quota)
        self.model = model

    def _answer(self, x: np.ndarray) -> np.ndarray:
        from torch import nn

        from . import models

        if isinstance(self.model, nn.Module):
            if self.outputs == "labels":
                return models.predict(self.model, x)
            return models.probabilities(self.model, x)
        out = self.model(x)
        if self.outputs == "labels":
            return _labels(out, len(x), self.name)
        return _probabilities(out, len(x), self.name)


class OnnxTarget(Target):
    """An ONNX model run with ONNX Runtime: a ``.onnx`` file, or a sealed ``.mseal`` container opened
    in memory with :func:`modelseal.load_onnx` (the plaintext model never touches the disk).

    The model's output is taken as probabilities when its rows are non-negative and sum to 1, and as
    logits (put through a softmax) otherwise, unless ``scores`` says which; labels are its argmax.

    Args:
        source: A path (``.mseal`` in the name: a container; otherwise an ONNX file), the model's
            bytes, or an ``onnxruntime.InferenceSession``.
        outputs: What the target reveals.
        scores: ``"auto"``, ``"probabilities"`` or ``"logits"``: what the model's output is.
        input_name, output_name, providers: As for :class:`modelseal.ownership.OnnxSuspect`.
        batch_size, quota: As for :class:`Target`.
        open_keys: The key arguments of :func:`modelseal.open` for a container (``identity``,
            ``passphrase``, ...).

    Raises:
        ValueError: Key arguments for something that is not a container, an unknown ``scores``.
        TargetError: The model cannot be loaded, or its inputs do not fit.
        WrongKeyError, IntegrityError, ...: Opening the container failed.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | bytes | Any,
        outputs: str = "labels",
        *,
        scores: Literal["auto", "probabilities", "logits"] = "auto",
        input_name: str | None = None,
        output_name: str | None = None,
        providers: Sequence[Any] | None = None,
        batch_size: int | None = 256,
        quota: int | None = None,
        name: str | None = None,
        **open_keys: Unpack[OpenKeys],
    ) -> None:
        from ..ownership.suspect import OnnxSuspect, sealed_suspect

        if scores not in ("auto", "probabilities", "logits"):
            raise ValueError(f"scores must be auto, probabilities or logits, got {scores!r}")
        sealed = isinstance(source, (str, os.PathLike)) and ".mseal" in Path(os.fspath(source)).name.lower()
        if not sealed and any(v is not None for v in open_keys.values()):
            raise ValueError(f"key arguments are for a sealed container, not {source!r}")
        suspect: OnnxSuspect
        try:
            if sealed and isinstance(source, (str, os.PathLike)):
                suspect = sealed_suspect(
                    source,
                    input_name=input_name,
                    output_name=output_name,
                    providers=providers,
                    batch_size=batch_size or 2**31,
                    **open_keys,
                )
            else:
                suspect = OnnxSuspect(
                    source,
                    input_name=input_name,
                    output_name=output_name,
                    providers=providers,
                    batch_size=batch_size or 2**31,
                )
        except SuspectError as exc:
            raise TargetError(str(exc)) from None
        super().__init__(outputs, name=name or suspect.name, batch_size=batch_size, quota=quota)
        self.scores = scores
        self._suspect = suspect

    @property
    def session(self) -> Any:
        """The ``onnxruntime.InferenceSession``."""
        return self._suspect.session

    def _answer(self, x: np.ndarray) -> np.ndarray:
        try:
            raw = self._suspect.predict_scores(x)
        except SuspectError as exc:
            raise MalformedAnswer(f"{self.name}: {exc}") from None
        raw = raw.reshape(len(x), -1)
        if raw.shape[1] < 2:
            raise MalformedAnswer(f"{self.name}: the model gives {raw.shape[1]} score per row; a classifier needs 2+")
        probs = _softmax_unless_probabilities(raw, self.scores)
        if self.outputs == "labels":
            return np.asarray(probs.argmax(axis=1), dtype=np.int64)
        return _probabilities(probs, len(x), self.name)


def _mask(token: str) -> str:
    """A key as it may appear in messages: its public prefix, never the secret."""
    return token[:12] + "..." if len(token) > 12 else token


def _excerpt(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    return text if len(text) <= _EXCERPT_CHARS else text[: _EXCERPT_CHARS - 3] + "..."


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


class HttpTarget(Target):
    """A modelseal gateway: ``POST {url}/v1/predict`` with ``{"inputs": [...]}``, through one or many
    API keys.

    Each request carries at most ``batch_size`` rows (halved whenever the gateway answers 413) and
    one key, as ``Authorization: Bearer <key>``. With ``rotation="round-robin"`` each request goes
    through the next key in turn, spreading the rows evenly over the accounts; with ``"failover"``
    one key is used until it is refused. A key answered 429 (its quota is used up) is set aside until
    its ``Retry-After`` has passed (for good if the gateway gives none); a key answered 401 or 403 is
    set aside for good; the same rows then go through the next key. When every key is set aside the
    target raises :class:`QueryRefused`. Refused requests cost nothing: the gateway charges a request
    whole or not at all.

    Args:
        url: The gateway's base URL, e.g. ``http://127.0.0.1:8760`` (``http://testserver`` for a
            Starlette ``TestClient``).
        api_keys: One or more ``msk_...`` tokens; several are sybil accounts of one thief.
        outputs: ``"labels"`` takes the answer's ``labels``; ``"probabilities"`` its ``scores`` rows
            (whatever the key's policy lets it see).
        batch_size: The most rows per request (the gateway's ``max_batch`` is 256 by default).
        client: An ``httpx.Client`` (or a Starlette ``TestClient``, which is one) to send through;
            it is not closed by :meth:`close`. Without one the target opens its own.
        rotation: ``"round-robin"`` or ``"failover"``.
        timeout: Seconds per request, for a client the target opens itself.
        clock: Monotonic seconds, for deciding when a refused key may be tried again.

    Attributes:
        queries_by_key: Rows answered through each key.
        refused: Each key set aside, with the clock time it may be tried again (``inf``: never) and why.
        policy: The ``policy`` the gateway named in its latest answer.

    Raises:
        ValueError: No keys, duplicate keys, an unknown ``rotation``, a URL that is not http(s).
    """

    def __init__(
        self,
        url: str,
        api_keys: Sequence[str],
        outputs: str = "labels",
        *,
        batch_size: int = 256,
        client: httpx.Client | None = None,
        rotation: Literal["round-robin", "failover"] = "round-robin",
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        name: str | None = None,
    ) -> None:
        keys = list(api_keys)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError("api_keys must be one or more non-empty strings")
        if len(set(keys)) != len(keys):
            raise ValueError("api_keys has duplicates")
        if rotation not in ("round-robin", "failover"):
            raise ValueError(f"rotation must be round-robin or failover, got {rotation!r}")
        if not url.lower().startswith(("http://", "https://")):
            raise ValueError(f"the gateway URL must be http:// or https://, not {url!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        base = url.rstrip("/")
        super().__init__(outputs, name=name or f"http:{base}", batch_size=batch_size)
        import httpx

        self.url = base
        self.api_keys = keys
        self.rotation = rotation
        self.queries_by_key: dict[str, int] = dict.fromkeys(keys, 0)
        self.refused: dict[str, tuple[float, str]] = {}
        self.policy: str | None = None
        self._clock = clock
        self._next = 0
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=timeout, follow_redirects=False)

    def close(self) -> None:
        """Close the connection pool the target opened (an injected client is left open)."""
        if self._owns_client:
            self._client.close()

    def _available(self) -> list[int]:
        """Indices of the keys that may be tried now, starting from the one whose turn it is."""
        now = self._clock()
        order = [(self._next + i) % len(self.api_keys) for i in range(len(self.api_keys))]
        usable = []
        for i in order:
            key = self.api_keys[i]
            if key in self.refused and self.refused[key][0] > now:
                continue
            self.refused.pop(key, None)
            usable.append(i)
        return usable

    def _refusal(self, answered: list[np.ndarray]) -> QueryRefused:
        now = self._clock()
        waits = [until - now for until, _ in self.refused.values()]
        retry = min(waits) if waits and math.isfinite(min(waits)) else None
        reasons = "; ".join(f"{_mask(k)}: {why}" for k, (_, why) in self.refused.items())
        return QueryRefused(
            f"{self.name}: every API key is refused ({reasons})",
            answers=_joined(answered),
            retry_after=None if retry is None else max(retry, 0.0),
        )

    def _answer(self, x: np.ndarray) -> np.ndarray:
        if not np.all(np.isfinite(x)):
            raise ValueError("inputs contain NaN or infinity, which JSON cannot carry")
        parts: list[np.ndarray] = []
        start = 0
        while start < len(x):
            rows = x[start : start + (self.batch_size or len(x))]
            answers = self._request(rows, parts)
            if answers is None:  # 413: the batch size was halved; send a smaller slice
                continue
            parts.append(answers)
            start += len(rows)
        return np.concatenate(parts)

    def _request(self, rows: np.ndarray, answered: list[np.ndarray]) -> np.ndarray | None:
        """Answers to ``rows`` through the first key that accepts them; None after a 413."""
        import httpx

        body = json.dumps({"inputs": rows.tolist()}, allow_nan=False).encode()
        for i in self._available():
            key = self.api_keys[i]
            headers = {
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            }
            try:
                response = self._client.post(f"{self.url}/v1/predict", content=body, headers=headers)
            except httpx.HTTPError as exc:
                raise TargetError(f"{self.name}: the request failed: {exc}") from None
            status = response.status_code
            if status == 200:
                answers = self._parse(response.content, len(rows))
                self.queries_by_key[key] += len(rows)
                self._next = i + 1 if self.rotation == "round-robin" else i
                return answers
            if status == 429:
                wait = _retry_after(response.headers.get("retry-after"))
                until = self._clock() + wait if wait is not None else math.inf
                self.refused[key] = (until, f"HTTP 429 {_excerpt(response.content)}")
                continue
            if status in (401, 403):
                self.refused[key] = (math.inf, f"HTTP {status} {_excerpt(response.content)}")
                continue
            if status == 413 and len(rows) > 1:
                self.batch_size = max(1, len(rows) // 2)
                return None
            raise TargetError(f"{self.name}: HTTP {status}: {_excerpt(response.content)}")
        raise self._refusal(answered)

    def _parse(self, content: bytes, n: int) -> np.ndarray:
        where = f"{self.name} answer"
        try:
            doc = json.loads(content)
        except (ValueError, RecursionError):
            raise MalformedAnswer(f"{where} is not JSON: {_excerpt(content)}") from None
        if not isinstance(doc, dict):
            raise MalformedAnswer(f"{where} is not a JSON object: {_excerpt(content)}")
        field = "labels" if self.outputs == "labels" else "scores"
        if field not in doc:
            raise MalformedAnswer(f"{where} has no {field!r}: {_excerpt(content)}")
        policy = doc.get("policy")
        self.policy = policy if isinstance(policy, str) else None
        if self.outputs == "labels":
            return _labels(doc[field], n, where)
        return _probabilities(doc[field], n, where)
