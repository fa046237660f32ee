"""Prometheus metrics (docs/spec/gateway-v1.md §9): traffic, quotas, alerts and tracing.

With several worker processes, ``modelseal serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the
workers start, and ``/metrics`` aggregates the workers' files (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import os
from typing import Any


class Metrics:
    """The gateway's series. ``per_key=False`` labels every per-key series ``key="*"`` (one series,
    summed over keys), so the number of series does not grow with the number of keys."""

    def __init__(self, *, per_key: bool = True) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self._per_key = per_key

        self._multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry(auto_describe=True)
        reg = None if self._multiprocess else self.registry
        ns = "modelseal_gateway"
        self.requests = Counter(
            f"{ns}_requests", "Prediction requests by tier and status", ["tier", "status"], registry=reg
        )
        self.rows = Counter(f"{ns}_rows", "Input rows answered, per API key", ["key"], registry=reg)
        self.quota_refusals = Counter(
            f"{ns}_quota_refusals", "Requests refused by a quota", ["key", "period"], registry=reg
        )
        self.alerts = Counter(
            f"{ns}_monitor_alerts", "Keys newly flagged by the extraction monitor", ["key", "reason"], registry=reg
        )
        # no per-key label: a client that could read it would learn which of its answers were altered
        self.traced = Counter(f"{ns}_traced_answers", "Answers altered for tracing (all keys)", registry=reg)
        self.traces_dropped = Counter(f"{ns}_traces_dropped", "Altered answers not recorded (queue full)", registry=reg)
        self.misinformed = Counter(
            f"{ns}_misinformed_answers", "Answers misinformed for flagged keys (all keys)", registry=reg
        )
        self.degraded = Counter(f"{ns}_degraded_rows", "Rows answered with a degraded policy", ["key"], registry=reg)
        self.model_errors = Counter(f"{ns}_model_errors", "Inputs the runtime refused after the checks", registry=reg)
        self.latency = Histogram(
            f"{ns}_request_seconds",
            "Time spent in the gateway per prediction request (model included)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=reg,
        )
        self.monitor_dropped = Counter(
            f"{ns}_monitor_dropped_rows", "Rows the monitor could not observe (queue full)", registry=reg
        )
        self.audit_dropped = Gauge(
            f"{ns}_audit_dropped", "Audit records dropped (writer behind)", registry=reg, multiprocess_mode="sum"
        )

    def key(self, key_id: str) -> str:
        """The ``key`` label for ``key_id``."""
        return key_id if self._per_key else "*"

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self._multiprocess:
            from prometheus_client import multiprocess

            registry: Any = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = self.registry
        return generate_latest(registry), CONTENT_TYPE_LATEST
