"""Gateway configuration (docs/spec/gateway-v1.md §1, §10): a TOML file, command-line flags on top.

Every setting is validated here, before the model is opened or a port is bound; a bad one is a
:class:`~.errors.ConfigError` naming it (the CLI exits 2 with it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

POLICY_NAMES = ("top_k", "round", "noise", "label_only", "coverage")


class _Strict(BaseModel):
    # infinite thresholds (a statistic switched off) must survive the JSON hand-over to workers
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class TierConfig(_Strict):
    """What a tier of API keys may do and what it sees (§4, §5)."""

    per_minute: int | None = Field(None, ge=1)
    per_day: int | None = Field(None, ge=1)
    total: int | None = Field(None, ge=1)
    max_batch: int | None = Field(None, ge=1)
    policy: list[str] = []
    """Output policies in order: ``top_k:K``, ``round:D``, ``noise:SIGMA``, ``label_only``, ``coverage``."""
    on_alert: Literal["log", "alert", "throttle", "degrade", "misinform"] = "alert"
    """What the monitor's flag does to the key: log it; also count an alert metric; also cut its
    quotas by ``throttle_factor`` (only the limits the tier sets: an unlimited window stays
    unlimited); also switch its answers to ``degraded_policy``; or also answer a keyed share
    ``misinform_rate`` of its rows with a wrong label, recorded as traced answers, without telling
    the key (§6)."""
    throttle_factor: float = Field(0.1, gt=0, le=1)
    degraded_policy: list[str] = ["label_only"]
    misinform_rate: float = Field(1.0, gt=0, le=1)
    trace: bool = True

    @field_validator("policy", "degraded_policy")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_policy(item)
        return value


class MonitorSection(_Strict):
    enabled: bool = True
    reference: Path | None = None
    """A ``.npz`` written by ``Reference.save`` (fitted on benign data); without it the monitor is off."""
    thresholds: dict[str, float] | None = None
    """From calibration on benign traffic; without them the monitor records statistics but never flags."""


class AuditSection(_Strict):
    path: Path | None = None  # default: DATA_DIR/audit.jsonl
    max_bytes: int = Field(16 * 2**20, ge=4096)
    backups: int = Field(4, ge=0, le=100)


class ModelSection(_Strict):
    path: Path
    runtime: Literal["onnx", "torch"] = "onnx"
    arch: str | None = None
    """For ``torch``: ``module:factory`` building the module whose state dict the container holds."""
    input_shape: list[int] | None = None
    """For ``torch``: the shape of one input row (ONNX models declare theirs)."""
    entry: str | None = None
    identity: Path | None = None
    passphrase_env: str | None = None
    keyserver: str | None = None
    licence: str | None = None
    scores: Literal["auto", "probabilities", "logits"] = "auto"
    intra_op_threads: int | None = Field(None, ge=1, le=256)
    """ONNX Runtime's threads per inference (default: its own choice, one per core)."""
    spin: bool = False
    """Let ONNX Runtime's idle threads spin between inferences. Off by default: a gateway runs
    small batches back to back from one event loop, and spinning threads burned half a core here
    while adding nothing to throughput."""


class GatewayConfig(_Strict):
    model: ModelSection
    data_dir: Path = Path("./modelseal-gateway")
    database_url: str | None = None
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8760, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)
    max_body_bytes: int = Field(4 * 2**20, ge=1024, le=2**30)
    max_batch: int = Field(256, ge=1, le=65536)
    key_refresh_s: float = Field(2.0, ge=0)
    """How long a worker trusts its cached copy of the key table (revocation reaches it within this)."""
    trace_rate: float = Field(0.01, ge=0, lt=0.5)
    trace_keep: int = Field(20000, ge=1)
    """Altered answers kept per key for the verifier (oldest dropped first)."""
    metrics_public: bool = False
    """``GET /metrics`` without a key; otherwise it needs a key with the ``metrics`` scope."""
    metrics_per_key: bool = True
    """Per-key series (rows, quota refusals, alerts, degraded rows). Turn off for gateways with very
    many keys: each key is a series in every scrape. The counts are then summed under ``key="*"``."""
    docs: bool = True
    monitor: MonitorSection = Field(default_factory=lambda: MonitorSection.model_validate({}))
    audit: AuditSection = Field(default_factory=lambda: AuditSection.model_validate({}))
    tiers: dict[str, TierConfig] = Field(default_factory=lambda: {"default": TierConfig.model_validate({})})

    @field_validator("tiers")
    @classmethod
    def _has_default(cls, value: dict[str, TierConfig]) -> dict[str, TierConfig]:
        if "default" not in value:
            raise ValueError("a tier named 'default' is required (new keys get it)")
        return value

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'gateway.db'}"

    @property
    def audit_path(self) -> Path:
        return self.audit.path or self.data_dir / "audit.jsonl"


def parse_policy(item: str) -> tuple[str, float | None]:
    """``"round:2"`` as ``("round", 2.0)``; a ValueError names what is wrong."""
    name, _, arg = item.partition(":")
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {item!r} (known: {', '.join(POLICY_NAMES)})")
    if name in ("label_only", "coverage"):
        if arg:
            raise ValueError(f"policy {name!r} takes no argument")
        return name, None
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"policy {item!r} needs a number after ':'") from None
    if name in ("top_k", "round") and (value != int(value) or value < (1 if name == "top_k" else 0)):
        raise ValueError(f"policy {item!r}: {name} takes a {'positive' if name == 'top_k' else 'non-negative'} integer")
    if name == "noise" and not 0 <= value <= 1:
        raise ValueError(f"policy {item!r}: noise takes a sigma in [0, 1]")
    return name, value


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with path.open("rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return data


def load_config(path: Path | None = None, **overrides: Any) -> GatewayConfig:
    """The config in ``path`` (TOML), relative paths resolved against its folder, ``overrides`` on top.

    ``overrides`` are top-level settings (``port=…``) or ``model_path=…``-style keys for the
    ``[model]`` table; ``None`` values are ignored.

    Raises:
        ConfigError: the file cannot be read or a setting is invalid (the message names it).
    """
    data: dict[str, Any] = _read_toml(path) if path is not None else {}
    base = path.parent if path is not None else Path.cwd()
    for name, value in overrides.items():
        if value is None:
            continue
        if name.startswith("model_"):
            data.setdefault("model", {})[name.removeprefix("model_")] = value
        else:
            data[name] = value
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "config"
        raise ConfigError(f"{where}: {first.get('msg', 'invalid')}") from None

    def rel(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    model = config.model.model_copy(update={"path": rel(config.model.path), "identity": rel(config.model.identity)})
    monitor = config.monitor.model_copy(update={"reference": rel(config.monitor.reference)})
    audit = config.audit.model_copy(update={"path": rel(config.audit.path)})
    return config.model_copy(
        update={"model": model, "monitor": monitor, "audit": audit, "data_dir": rel(config.data_dir)}
    )


def passphrase_from_env(model: ModelSection) -> str | None:
    if model.passphrase_env is None:
        return None
    value = os.environ.get(model.passphrase_env)
    if value is None:
        raise ConfigError(f"model.passphrase_env: the environment variable {model.passphrase_env} is not set")
    return value
