"""The gateway's service layer (docs/spec/gateway-v1.md): everything a prediction goes through,
with no HTTP in it. Routes parse and translate; this raises :mod:`.errors` and returns answers.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .audit import AuditLog
from .batch import Batch
from .errors import (
    ConfigError,
    Forbidden,
    MalformedRequest,
    ModelRejectedInput,
    PayloadTooLarge,
    QuotaExceeded,
    Unavailable,
)
from .metrics import Metrics
from .policies import CoveragePricer, Policy, chain, label_only, noise, round_scores, top_k
from .quota import Limits, Quota, open_quota
from .runner import Runner, open_runner
from .settings import GatewayConfig, TierConfig, parse_policy
from .store import ApiKey, KeyStore, TraceRecord
from .trace import Tracer

log = logging.getLogger("modelseal.gateway")

SECRET_FILE = "gateway.secret"
_MAX_QUEUED_ROWS = 1 << 18  # rows waiting for the monitor (about 64 MiB of 64-float rows)


@dataclass(frozen=True)
class Answer:
    labels: np.ndarray
    scores: np.ndarray
    policy: str


def load_secret(data_dir: Path) -> bytes:
    """The gateway's 32-byte secret (``DATA_DIR/gateway.secret``, 0600), created on first start.

    Every keyed function derives its own key from it (HKDF-SHA256): the API key pepper, the
    answers secret (tracing and keyed noise) and the coverage hyperplanes' seed. Replicas that share a key database
    must share this file.
    """
    path = data_dir / SECRET_FILE
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raw = path.read_bytes()
        if len(raw) != 32:
            raise ConfigError(f"{path} is not a gateway secret (32 bytes expected, found {len(raw)})") from None
        return raw
    raw = os.urandom(32)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return raw


def derive(secret: bytes, purpose: str) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"modelseal-gateway-v1 " + purpose.encode()).derive(secret)


@dataclass
class _Admitted:
    """A request that passed admission (checked and charged), waiting for its answer."""

    index: int
    key: ApiKey
    tier: _Tier
    x: np.ndarray
    flagged: bool
    started: float
    probs: np.ndarray | None = None


@dataclass
class _Tier:
    name: str
    config: TierConfig
    limits: Limits
    policy: Policy
    degraded: Policy
    policy_name: str
    misinformer: Tracer | None


class Gateway:
    """A served model with its keys, quotas, policies, monitor, tracer, audit log and metrics."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        runner: Runner | None = None,
        quota: Quota | None = None,
        migrate: bool = True,
    ) -> None:
        self.config = config
        secret = load_secret(config.data_dir)
        self.store = KeyStore(
            config.effective_database_url, derive(secret, "api-key pepper"), refresh_s=config.key_refresh_s
        )
        if migrate:
            self.store.migrate()
        self.runner = runner or open_runner(config.model)
        self.quota = quota or open_quota(config.redis_url)
        # one MAC per row serves the tracer (bytes 0-12) and the keyed noise (bytes 16-24)
        answers_secret = derive(secret, "answers")
        self.tracer = Tracer(answers_secret, rate=config.trace_rate)
        self._answers_secret = answers_secret  # also keys the noise and the audit digests
        self._misinform_secret = derive(secret, "misinformation")
        self.monitor = _open_monitor(config)
        dim = int(np.prod([d or 1 for d in self.runner.row_shape]))
        uses_coverage = any(
            parse_policy(p)[0] == "coverage" for t in config.tiers.values() for p in t.policy + t.degraded_policy
        )
        if None in self.runner.row_shape and (self.monitor is not None or uses_coverage):
            raise ConfigError("the monitor and the coverage policy need a model whose input rows have a fixed shape")
        centre = scale = None
        if self.monitor is not None:  # coverage pricing works in the monitor's standardised space
            if self.monitor.reference.dim != dim:
                raise ConfigError(
                    f"monitor.reference: fitted on rows of {self.monitor.reference.dim} values; the model takes {dim}"
                )
            centre, scale = self.monitor.reference.mean, self.monitor.reference.scale
        self.pricer = CoveragePricer(dim, seed=derive(secret, "coverage"), centre=centre, scale=scale)
        self.tiers = {name: self._tier(name, tier) for name, tier in config.tiers.items()}
        self.store.set_meta("num_classes", str(self.runner.num_classes))  # the tracing verifier's null
        self.metrics = Metrics(per_key=config.metrics_per_key)
        self.audit = AuditLog(config.audit_path, max_bytes=config.audit.max_bytes, backups=config.audit.backups)
        self._flagged: dict[str, tuple[str, ...]] = {}
        self._flag_lock = threading.Lock()
        self._traces: queue.Queue[TraceRecord] = queue.Queue(100_000)
        self._trace_thread: threading.Thread | None = None
        # the monitor runs beside the request path: requests queue their rows, one thread observes
        # them in batches (numpy's per-call overhead paid once per batch, not per request)
        self._observations: queue.Queue[tuple[ApiKey, np.ndarray]] = queue.Queue()
        self._queued_rows, self._queued_lock = 0, threading.Lock()
        self._unauth_window, self._unauth_count = 0.0, 0
        self._monitor_thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.audit.start()
        self.store.start_refresher()
        if self._trace_thread is None:
            self._stop.clear()
            self._trace_thread = threading.Thread(target=self._write_traces, name="gateway-traces", daemon=True)
            self._trace_thread.start()
        if self._monitor_thread is None and self.monitor is not None:
            self._monitor_thread = threading.Thread(target=self._watch, name="gateway-monitor", daemon=True)
            self._monitor_thread.start()

    def close(self) -> None:
        self._stop.set()
        for thread in (self._trace_thread, self._monitor_thread):
            if thread is not None:
                thread.join(10)
        self._trace_thread = self._monitor_thread = None
        self.store.stop_refresher()
        self.audit.close()
        self.quota.close()
        self.store.dispose()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until queued trace records and audit lines are written."""
        deadline = time.monotonic() + timeout
        while (self._traces.unfinished_tasks or self._observations.unfinished_tasks) and time.monotonic() < deadline:
            time.sleep(0.005)
        self.audit.flush(max(0.0, deadline - time.monotonic()))

    # -- set-up helpers ---------------------------------------------------------------------------
    def _policy(self, items: list[str]) -> Policy:
        parts: list[Policy] = []
        for item in items:
            name, value = parse_policy(item)
            if name == "top_k":
                parts.append(top_k(int(value or 1)))
            elif name == "round":
                parts.append(round_scores(int(value or 0)))
            elif name == "noise":
                parts.append(noise(float(value or 0.0), self._answers_secret))
            elif name == "label_only":
                parts.append(label_only())
            else:
                parts.append(self._coverage)
        return chain(parts)

    def _coverage(self, batch: Batch, scores: np.ndarray) -> np.ndarray:
        return self.pricer(batch, scores)

    def _tier(self, name: str, tier: TierConfig) -> _Tier:
        return _Tier(
            name,
            tier,
            Limits(tier.per_minute, tier.per_day, tier.total),
            self._policy(tier.policy),
            self._policy(tier.degraded_policy),
            "+".join(tier.policy) or "full",
            Tracer(self._misinform_secret, rate=tier.misinform_rate) if tier.on_alert == "misinform" else None,
        )

    # -- requests -------------------------------------------------------------------------------
    def authenticate(self, token: str | None) -> ApiKey | None:
        """The active key ``token`` names, or None.

        Raises:
            Unavailable: the key database cannot be read (a 503 the client may retry, not a 500).
        """
        if not token:
            return None
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return self.store.authenticate(token)
        except SQLAlchemyError:
            log.exception("the key database cannot be read")
            raise Unavailable("the key database is unavailable; retry shortly", retry_after=1) from None

    def sync_metrics(self) -> None:
        """Copy the state kept outside the metrics (dropped audit records) into them before a scrape."""
        self.metrics.audit_dropped.set(self.audit.dropped)

    def tier_of(self, key: ApiKey) -> _Tier:
        tier = self.tiers.get(key.tier)
        if tier is None:
            raise Forbidden(f"the key's tier {key.tier!r} is not configured on this gateway")
        return tier

    def check_rows(self, x: np.ndarray) -> np.ndarray:
        """``x`` as the model's dtype, checked against its input shape.

        Raises:
            MalformedRequest: wrong rank, shape or kind of numbers, NaN or infinity, empty batch.
        """
        if x.dtype.kind not in "iuf":
            raise MalformedRequest(f"inputs must be numbers, got {x.dtype.kind!r} data")
        shape = self.runner.row_shape
        if x.ndim != 1 + len(shape):
            dims = " x ".join(str(d or "N") for d in shape)
            raise MalformedRequest(
                f"inputs must be a batch of rows of shape [{dims}] (rank {1 + len(shape)}), got rank {x.ndim}"
            )
        if len(x) == 0:
            raise MalformedRequest("the batch is empty")
        for axis, (got, want) in enumerate(zip(x.shape[1:], shape, strict=True), start=1):
            if want is not None and got != want:
                raise MalformedRequest(f"inputs: dimension {axis} must be {want}, got {got}")
        with np.errstate(over="ignore", invalid="ignore"):
            cast = x.astype(self.runner.dtype, copy=False)
        if self.runner.dtype.kind == "f" and not np.isfinite(cast).all():  # one pass on the happy path
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise MalformedRequest("inputs hold NaN or infinity")
            raise MalformedRequest(f"inputs overflow the model's {self.runner.dtype}")
        if self.runner.dtype.kind in "iu":
            info = np.iinfo(self.runner.dtype)
            if x.dtype.kind == "f" and not (np.isfinite(x).all() and (x == np.round(x)).all()):
                raise MalformedRequest(f"the model takes integers ({self.runner.dtype}); inputs hold fractions or NaN")
            if x.min() < info.min or x.max() > info.max:
                raise MalformedRequest(f"inputs overflow the model's {self.runner.dtype}")
        return cast

    def predict(self, key: ApiKey, x: np.ndarray) -> Answer:
        """Answer ``x`` for ``key``: quota, model, tracing, monitor, policy, audit.

        Raises:
            Forbidden, MalformedRequest, PayloadTooLarge, QuotaExceeded, Unavailable, ModelRejectedInput.
        """
        result = self.predict_many([(key, x)])[0]
        if isinstance(result, Answer):
            return result
        raise result

    def predict_many(self, requests: Sequence[tuple[ApiKey, np.ndarray]]) -> list[Answer | Exception]:
        """Answer several requests at once, each exactly as :meth:`predict` would alone.

        Each request is admitted on its own (tier, batch limit, row checks, quota: refused whole or
        charged whole) and gets its own answer or error, in order. The admitted rows go through the
        model in one call per row shape; tracing, misinformation and the policies run once per key,
        over its requests' rows in arrival order. Each of those is a function of (key, row) or of a
        key's rows in order, so coalescing changes no answer: it pays numpy's and the runtime's
        per-call overhead once for many small requests (the app coalesces requests that arrive
        together).
        """
        results: list[Answer | Exception | None] = [None] * len(requests)
        admitted: list[_Admitted] = []
        for i, (key, x) in enumerate(requests):
            try:
                tier = self.tier_of(key)
            except Exception as exc:
                results[i] = exc
                continue
            started = time.perf_counter()
            rows = 0
            try:
                limit = min(self.config.max_batch, tier.config.max_batch or self.config.max_batch)
                if x.ndim >= 1 and len(x) > limit:  # before the per-row checks; a scalar fails those
                    raise PayloadTooLarge(f"the batch has {len(x)} rows; this key may send at most {limit} per request")
                x = self.check_rows(x)
                rows = len(x)
                flagged = key.id in self._flagged
                limits = tier.limits
                if flagged and tier.config.on_alert == "throttle":
                    limits = limits.scaled(tier.config.throttle_factor)
                try:
                    self.quota.charge(key.id, len(x), limits)
                except QuotaExceeded as exc:
                    self.metrics.quota_refusals.labels(self.metrics.key(key.id), exc.period).inc()
                    raise
            except Exception as exc:
                results[i] = self._refused(key, tier, rows, exc, started)
                continue
            admitted.append(_Admitted(i, key, tier, x, flagged, started))
        for adm, error in self._run_model(admitted):
            results[adm.index] = self._refused(adm.key, adm.tier, len(adm.x), error, adm.started)
        groups: dict[tuple[str, str, bool, tuple[int, ...]], list[_Admitted]] = {}
        for adm in admitted:  # a model with a free dimension may get rows of several shapes
            if adm.probs is not None:
                groups.setdefault((adm.key.id, adm.tier.name, adm.flagged, adm.x.shape[1:]), []).append(adm)
        for group in groups.values():
            for adm, answer in zip(group, self._answer(group), strict=True):
                results[adm.index] = answer
        return [r if r is not None else RuntimeError("no answer") for r in results]

    def _run_model(self, admitted: list[_Admitted]) -> list[tuple[_Admitted, Exception]]:
        """Set each request's probabilities, one runtime call per row shape; returns the refused ones."""
        refused: list[tuple[_Admitted, Exception]] = []
        by_shape: dict[tuple[int, ...], list[_Admitted]] = {}
        for adm in admitted:
            by_shape.setdefault(adm.x.shape[1:], []).append(adm)
        for same in by_shape.values():
            try:
                probs = self.runner.probabilities(np.concatenate([a.x for a in same]) if len(same) > 1 else same[0].x)
            except ModelRejectedInput as exc:
                if len(same) == 1:
                    self.metrics.model_errors.inc()
                    refused.append((same[0], exc))
                    continue
                # one request's rows may be what the runtime refused: ask for each on its own
                refused += self._run_model_one_by_one(same)
                continue
            start = 0
            for adm in same:
                adm.probs = probs[start : start + len(adm.x)]
                start += len(adm.x)
        return refused

    def _run_model_one_by_one(self, same: list[_Admitted]) -> list[tuple[_Admitted, Exception]]:
        refused: list[tuple[_Admitted, Exception]] = []
        for adm in same:
            try:
                adm.probs = self.runner.probabilities(adm.x)
            except ModelRejectedInput as exc:
                self.metrics.model_errors.inc()
                refused.append((adm, exc))
        return refused

    def _answer(self, group: list[_Admitted]) -> list[Answer]:
        """Answers for one key's admitted requests (same tier, flag and row shape), in arrival order."""
        key, tier, flagged = group[0].key, group[0].tier, group[0].flagged
        x = np.concatenate([a.x for a in group]) if len(group) > 1 else group[0].x
        probs = np.concatenate([a.probs for a in group if a.probs is not None]) if len(group) > 1 else group[0].probs
        assert probs is not None and len(probs) == len(x)
        batch = Batch(key.id, x)
        original = probs.argmax(axis=1)
        altered = np.zeros(len(x), dtype=bool)
        plan: np.ndarray | None = None
        if tier.config.trace and self.tracer.rate > 0:
            probs, plan = self.tracer.apply(batch, probs)
            traced_rows = np.flatnonzero(plan >= 0)
            if len(traced_rows):
                self._queue_traces(key.id, x, plan, original, traced_rows)
                self.metrics.traced.inc(len(traced_rows))  # no key label: a key must not learn which
        misinformed = np.zeros(len(x), dtype=bool)
        if flagged and tier.misinformer is not None:
            # keyed wrong labels for a flagged key (rows the tracer altered keep their traced label),
            # recorded like traced answers: a model distilled from them names the key
            probs, wrong = tier.misinformer.apply(batch, probs, skip=None if plan is None else plan >= 0)
            wrong_rows = np.flatnonzero(wrong >= 0)
            if len(wrong_rows):
                self._queue_traces(key.id, x, wrong, original, wrong_rows)
                self.metrics.misinformed.inc(len(wrong_rows))  # no key label, as for traced answers
            misinformed = wrong >= 0
        if plan is not None:
            altered = plan >= 0
        labels = probs.argmax(axis=1)
        if self.monitor is not None:
            self._observe_later(key, x)
        degraded = flagged and tier.config.on_alert == "degrade"
        scores = (tier.degraded if degraded else tier.policy)(batch, probs)
        self.metrics.rows.labels(self.metrics.key(key.id)).inc(len(x))
        if degraded:
            self.metrics.degraded.labels(self.metrics.key(key.id)).inc(len(x))
        # a misinformed key is not told: its answers keep the tier's policy name
        policy_name = "degraded" if degraded else tier.policy_name
        digests = batch.keyed(self._answers_secret)
        answers = []
        start = 0
        for adm in group:
            stop = start + len(adm.x)
            self.audit.write(
                "predict",
                key=key.id,
                tier=tier.name,
                rows=stop - start,
                # keyed digests (bytes 20-32 of each row's MAC): the log confirms no guessed input
                inputs=[m[20:32] for m in digests[start:stop]],
                policy=policy_name,
                traced=int(altered[start:stop].sum()),
                misinformed=int(misinformed[start:stop].sum()),
                flagged=flagged,
            )
            answers.append(Answer(labels[start:stop], scores[start:stop], policy_name))
            self.metrics.requests.labels(tier.name, "200").inc()
            self.metrics.latency.observe(time.perf_counter() - adm.started)
            start = stop
        return answers

    def _refused(self, key: ApiKey, tier: _Tier, rows: int, exc: Exception, started: float) -> Exception:
        status = str(getattr(exc, "status", 500))
        self.audit.write(
            "refused",
            key=key.id,
            tier=tier.name,
            rows=rows,
            status=int(status),
            reason=getattr(exc, "code", "internal"),
        )
        self.metrics.requests.labels(tier.name, status).inc()
        self.metrics.latency.observe(time.perf_counter() - started)
        return exc

    def refused_unauthenticated(self, reason: str) -> None:
        self.metrics.requests.labels("", "401").inc()
        # at most 10 audit records per second for requests without a valid key, so a flood of them
        # cannot rotate the real history out of the bounded log (the metric still counts them all)
        now = time.monotonic()
        if now - self._unauth_window >= 1.0:
            self._unauth_window, self._unauth_count = now, 0
        self._unauth_count += 1
        if self._unauth_count > 10:
            return
        self.audit.write("refused", key=None, status=401, reason=reason)

    def _observe_later(self, key: ApiKey, x: np.ndarray) -> None:
        """Queue rows for the monitor; beyond ``_MAX_QUEUED_ROWS`` waiting, drop and count them."""
        with self._queued_lock:
            if self._queued_rows + len(x) > _MAX_QUEUED_ROWS:
                self.metrics.monitor_dropped.inc(len(x))
                return
            self._queued_rows += len(x)
        self._observations.put((key, x))

    def _watch(self) -> None:
        """The monitor thread: observe queued rows per key, in batches; flag keys as they cross."""
        assert self.monitor is not None
        while not self._stop.is_set() or self._observations.unfinished_tasks:
            try:
                first = self._observations.get(timeout=0.2)
            except queue.Empty:
                continue
            # let rows gather for a few milliseconds: one wake-up per burst, not per request (each
            # wake-up costs a GIL hand-off and a context switch on the request path's cores)
            time.sleep(0.05)
            items = [first]
            while len(items) < 4096:
                try:
                    items.append(self._observations.get_nowait())
                except queue.Empty:
                    break
            try:
                by_key: dict[str, tuple[ApiKey, list[np.ndarray]]] = {}
                for key, rows in items:  # each key's rows in arrival order
                    by_key.setdefault(key.id, (key, []))[1].append(rows)
                for key, chunks in by_key.values():
                    try:
                        x = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
                        assessment = self.monitor.observe(key.id, x)
                        if assessment.flagged and key.id not in self._flagged:
                            tier = self.tiers.get(key.tier)
                            if tier is not None:
                                self._flag(key, tier, assessment)
                    except Exception:  # a bug must not stop the monitor for other keys: log it, go on
                        log.exception("the extraction monitor failed on key %s", key.id)
            finally:
                with self._queued_lock:
                    self._queued_rows -= sum(len(rows) for _, rows in items)
                for _ in items:
                    self._observations.task_done()

    def _flag(self, key: ApiKey, tier: _Tier, assessment: Any) -> bool:
        with self._flag_lock:
            if key.id in self._flagged:
                return True
            self._flagged[key.id] = tuple(assessment.reasons)
        action = tier.config.on_alert
        log.warning("extraction monitor flagged key %s (%s): %s", key.id, ", ".join(assessment.reasons), action)
        if action != "log":
            for reason in assessment.reasons or ("unspecified",):
                self.metrics.alerts.labels(self.metrics.key(key.id), reason).inc()
        self.audit.write("alert", key=key.id, tier=tier.name, action=action, monitor=_assessment_dict(assessment))
        return True

    def flagged_keys(self) -> dict[str, tuple[str, ...]]:
        """Keys the monitor has flagged in this process, with the statistics that fired."""
        with self._flag_lock:
            return dict(self._flagged)

    def key_state(self, key: ApiKey) -> dict[str, Any]:
        """What ``GET /v1/model`` tells a key about itself (never about another key)."""
        tier = self.tier_of(key)
        return {
            "key": key.id,
            "tier": tier.name,
            "limits": {
                "per_minute": tier.limits.per_minute,
                "per_day": tier.limits.per_day,
                "total": tier.limits.total,
            },
            "usage": self.quota.usage(key.id),
            "max_batch": min(self.config.max_batch, tier.config.max_batch or self.config.max_batch),
            "policy": tier.policy_name,
        }

    # -- tracing records ------------------------------------------------------------------------
    def _queue_traces(
        self, key_id: str, x: np.ndarray, plan: np.ndarray, original: np.ndarray, rows: np.ndarray
    ) -> None:
        for i in rows:
            record = TraceRecord(key_id, np.array(x[i], copy=True), int(plan[i]), int(original[i]))
            try:
                self._traces.put_nowait(record)
            except queue.Full:
                self.metrics.traces_dropped.inc(len(rows))
                log.warning("trace queue full: %d altered answers for key %s were not recorded", len(rows), key_id)
                return

    def _write_traces(self) -> None:
        while not self._stop.is_set() or self._traces.unfinished_tasks:
            try:
                first = self._traces.get(timeout=0.2)
            except queue.Empty:
                continue
            items = [first]
            while len(items) < 500:
                try:
                    items.append(self._traces.get_nowait())
                except queue.Empty:
                    break
            try:
                self.store.add_traces(items, keep=self.config.trace_keep)
            except Exception:  # the database is busy or gone: the records are lost, say so
                log.exception("could not store %d trace records", len(items))
            finally:
                for _ in items:
                    self._traces.task_done()


def _assessment_dict(a: Any) -> dict[str, Any]:
    return {
        "queries": int(a.queries),
        "flagged": bool(a.flagged),
        "reasons": list(a.reasons),
        "stats": {k: (round(float(v), 6) if math.isfinite(v) else None) for k, v in a.stats.items()},
    }


def _open_monitor(config: GatewayConfig) -> Any:
    section = config.monitor
    if not section.enabled or section.reference is None:
        return None
    from .monitor import Monitor, Reference, Thresholds

    try:
        reference = Reference.load(section.reference)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"monitor.reference: cannot load {section.reference}: {exc}") from None
    try:
        # a statistic left out never flags (TOML can also say so with inf / -inf)
        given = {**Thresholds().to_dict(), **section.thresholds} if section.thresholds else None
        thresholds = Thresholds.from_dict(given) if given else None
    except ValueError as exc:
        raise ConfigError(f"monitor.thresholds: {exc}") from None
    return Monitor(reference, thresholds=thresholds)
