"""``modelseal serve`` and ``modelseal gateway …`` (docs/spec/gateway-v1.md §10).

Only typer is imported at module level, so ``modelseal --help`` works without the ``gateway``
extra; each command imports the server stack when it runs. Library errors become exit codes in
one place (``translate``, shared with the rest of the ``modelseal`` command line).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from .settings import GatewayConfig
    from .store import KeyStore

CONFIG_ENV = "MODELSEAL_GATEWAY_CONFIG_JSON"  # how `serve` hands the config to its worker processes
EXIT_NOT_NAMED = 14
EXIT_INCONCLUSIVE = 15

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Gateway config file (TOML).")]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Key database, secret and audit log (default ./modelseal-gateway).")
]
DatabaseOpt = Annotated[
    str | None, typer.Option("--database-url", help="SQLAlchemy URL (default: SQLite in the data dir).")
]


def _config(config: Path | None, **overrides: Any) -> GatewayConfig:
    from .settings import load_config

    if config is None and overrides.get("model_path") is None:
        overrides["model_path"] = "unused.mseal"  # admin commands need no model
    return load_config(config, **overrides)


def _store(config: GatewayConfig, *, migrate: bool = True) -> KeyStore:
    from .service import derive, load_secret
    from .store import KeyStore

    store = KeyStore(config.effective_database_url, derive(load_secret(config.data_dir), "api-key pepper"))
    if migrate:
        store.migrate()
    return store


def app_from_env() -> Any:
    """uvicorn factory for ``serve --workers N`` (the config comes from ``serve`` through the environment)."""
    from .app import create_app
    from .service import Gateway
    from .settings import GatewayConfig

    config = GatewayConfig.model_validate_json(os.environ[CONFIG_ENV])
    return create_app(Gateway(config, migrate=False))


def _toml_float(value: float) -> str:
    return "inf" if value == float("inf") else "-inf" if value == float("-inf") else repr(float(value))


def _uvicorn_options() -> dict[str, Any]:
    import importlib.util

    fast = all(importlib.util.find_spec(m) for m in ("uvloop", "httptools"))
    return {
        "log_level": "info",
        "access_log": False,  # every request is in the audit log
        "loop": "uvloop" if fast else "auto",
        "http": "httptools" if fast else "auto",
    }


def register(app: typer.Typer, translate: Callable[[], AbstractContextManager[None]]) -> None:
    """Add ``serve`` and ``gateway …`` to the ``modelseal`` command line."""
    gw_app = typer.Typer(help="Administer the inference gateway: API keys, tracing.", no_args_is_help=True)
    key_app = typer.Typer(help="API keys (direct database access on the gateway host).", no_args_is_help=True)
    trace_app = typer.Typer(help="Name the API key a suspect model was extracted through.", no_args_is_help=True)
    monitor_app = typer.Typer(help="Fit and calibrate the extraction monitor.", no_args_is_help=True)
    app.add_typer(gw_app, name="gateway")
    gw_app.add_typer(key_app, name="key")
    gw_app.add_typer(trace_app, name="trace")
    gw_app.add_typer(monitor_app, name="monitor")

    @monitor_app.command("calibrate")
    def monitor_calibrate(
        data: Annotated[
            Path, typer.Argument(help="Training-distribution sample: an .npz with x (rows) and y (labels).")
        ],
        output: Annotated[Path, typer.Option("--out", "-o", help="Write the monitor's reference (.npz) here.")],
        traffic: Annotated[
            Path | None,
            typer.Option("--traffic", help="Recorded benign traffic: .npz with x (rows) and key (one id per row)."),
        ] = None,
        users: Annotated[int, typer.Option(help="Simulated benign users when no --traffic is given.")] = 200,
        target_fpr: Annotated[
            float, typer.Option("--target-fpr", help="Share of benign keys allowed to be flagged.")
        ] = 0.01,
        seed: Annotated[int, typer.Option(help="Seeds the hyperplanes and the simulation.")] = 0,
    ) -> None:
        """Fit the monitor's reference on DATA and set thresholds on benign traffic; print the [monitor] table."""
        with translate():
            import numpy as np

            from .monitor import Reference, calibrate, simulate_benign

            with np.load(data, allow_pickle=False) as npz:
                x, y = npz["x"], npz["y"]
            reference = Reference.fit(x.reshape(len(x), -1), seed=seed)
            if traffic is not None:
                with np.load(traffic, allow_pickle=False) as npz:
                    rows, keys = npz["x"], npz["key"]
                streams = [rows[keys == k].reshape(int((keys == k).sum()), -1) for k in np.unique(keys)]
                source = f"{len(streams)} recorded benign keys"
            else:
                streams = [
                    simulate_benign(x, y, seed=seed * 100_003 + i).reshape(-1, reference.dim) for i in range(users)
                ]
                source = f"{users} simulated benign users (docs/gateway.md states the simulation's assumptions)"
            thresholds = calibrate(reference, streams, target_fpr=target_fpr)
            reference.save(output)
            print(f"# reference fitted on {len(x)} rows; thresholds from {source}", file=sys.stderr)
            print("[monitor]")
            print(f'reference = "{output}"')
            values = ", ".join(f"{k} = {_toml_float(v)}" for k, v in thresholds.to_dict().items())
            print(f"thresholds = {{ {values} }}")

    @app.command("serve")
    def serve(
        model: Annotated[
            Path | None, typer.Argument(help="The sealed model (.mseal); or model.path in --config.")
        ] = None,
        config: ConfigOpt = None,
        host: Annotated[str | None, typer.Option(help="Listen address (default 127.0.0.1).")] = None,
        port: Annotated[int | None, typer.Option(help="Listen port (default 8760).")] = None,
        workers: Annotated[
            int | None, typer.Option(help="Worker processes (use --redis-url for shared quotas).")
        ] = None,
        data_dir: DataDirOpt = None,
        database_url: DatabaseOpt = None,
        redis_url: Annotated[
            str | None, typer.Option("--redis-url", help="Redis for quotas shared by workers and replicas.")
        ] = None,
        passphrase_env: Annotated[
            str | None, typer.Option("--passphrase-env", help="Environment variable holding the model's passphrase.")
        ] = None,
        identity: Annotated[
            Path | None, typer.Option("--identity", "-i", help="Identity file that opens the model.")
        ] = None,
        keyserver: Annotated[
            str | None, typer.Option("--keyserver", help="Key server URL that grants the model key.")
        ] = None,
        licence: Annotated[str | None, typer.Option("--licence", help="Licence for --keyserver.")] = None,
    ) -> None:
        """Serve a sealed model over HTTP with API keys, quotas, output policies, monitoring and tracing."""
        with translate():
            import uvicorn

            from .app import create_app
            from .service import Gateway
            from .settings import load_config
            from .workers import serve_workers

            cfg = load_config(
                config,
                host=host,
                port=port,
                workers=workers,
                data_dir=str(data_dir) if data_dir else None,
                database_url=database_url,
                redis_url=redis_url,
                model_path=str(model) if model else None,
                model_passphrase_env=passphrase_env,
                model_identity=str(identity) if identity else None,
                model_keyserver=keyserver,
                model_licence=licence,
            )
            if cfg.workers > 1 and not cfg.redis_url:
                print(
                    "warning: each of the workers keeps its own quota counters; use --redis-url to share them",
                    file=sys.stderr,
                )
            _store(cfg).dispose()  # migrate once, before any worker starts
            if cfg.workers == 1:
                gateway = Gateway(cfg, migrate=False)
                print(f"serving {cfg.model.path.name} on http://{cfg.host}:{cfg.port} (docs at /docs)", file=sys.stderr)
                uvicorn.run(create_app(gateway), host=cfg.host, port=cfg.port, **_uvicorn_options())
                return
            Gateway(cfg, migrate=False).close()  # open the model once here: a bad key fails now, not in N workers
            metrics_dir = cfg.data_dir / "metrics"
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir(parents=True, mode=0o700)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
            os.environ[CONFIG_ENV] = cfg.model_dump_json()
            print(
                f"serving {cfg.model.path.name} on http://{cfg.host}:{cfg.port} with {cfg.workers} workers "
                "(docs at /docs)",
                file=sys.stderr,
            )
            serve_workers(
                "modelseal.gateway.cli:app_from_env",
                host=cfg.host,
                port=cfg.port,
                workers=cfg.workers,
                options=_uvicorn_options(),
            )

    @key_app.command("create")
    def key_create(
        name: Annotated[str, typer.Argument(help="Who the key is for (shown in listings and the audit log).")],
        tier: Annotated[str, typer.Option(help="Tier from the config (limits and output policy).")] = "default",
        scope: Annotated[
            list[str] | None, typer.Option("--scope", help="predict (default) and/or metrics; repeatable.")
        ] = None,
        config: ConfigOpt = None,
        data_dir: DataDirOpt = None,
        database_url: DatabaseOpt = None,
    ) -> None:
        """Create an API key and print it once (only its hash is stored)."""
        with translate():
            cfg = _config(config, data_dir=str(data_dir) if data_dir else None, database_url=database_url)
            if tier not in cfg.tiers:
                raise ValueError(f"no tier {tier!r} in the config (tiers: {', '.join(cfg.tiers)})")
            store = _store(cfg)
            try:
                record, token = store.create(name, tier=tier, scopes=scope or ["predict"])
            finally:
                store.dispose()
            print(f"created key {record.id} for {name!r} (tier {tier}); it is shown once:", file=sys.stderr)
            print(token)

    @key_app.command("list")
    def key_list(config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DatabaseOpt = None) -> None:
        """List API keys (never their secrets), as JSON lines."""
        with translate():
            store = _store(_config(config, data_dir=str(data_dir) if data_dir else None, database_url=database_url))
            try:
                for record in store.all_keys():
                    print(json.dumps(record.to_dict()))
            finally:
                store.dispose()

    @key_app.command("revoke")
    def key_revoke(
        key_id: Annotated[str, typer.Argument(help="The key's id (the part after msk_).")],
        config: ConfigOpt = None,
        data_dir: DataDirOpt = None,
        database_url: DatabaseOpt = None,
    ) -> None:
        """Revoke a key (running gateways refuse it within key_refresh_s)."""
        with translate():
            store = _store(_config(config, data_dir=str(data_dir) if data_dir else None, database_url=database_url))
            try:
                record = store.revoke(key_id)
            finally:
                store.dispose()
            print(f"revoked key {record.id} ({record.name})", file=sys.stderr)

    @key_app.command("update")
    def key_update(
        key_id: Annotated[str, typer.Argument(help="The key's id.")],
        tier: Annotated[str | None, typer.Option(help="New tier.")] = None,
        scope: Annotated[list[str] | None, typer.Option("--scope", help="New scopes (repeatable).")] = None,
        config: ConfigOpt = None,
        data_dir: DataDirOpt = None,
        database_url: DatabaseOpt = None,
    ) -> None:
        """Move a key to another tier or change its scopes."""
        with translate():
            cfg = _config(config, data_dir=str(data_dir) if data_dir else None, database_url=database_url)
            if tier is not None and tier not in cfg.tiers:
                raise ValueError(f"no tier {tier!r} in the config (tiers: {', '.join(cfg.tiers)})")
            store = _store(cfg)
            try:
                record = store.update(key_id, tier=tier, scopes=scope)
            finally:
                store.dispose()
            print(json.dumps(record.to_dict()))

    @trace_app.command("verify")
    def trace_verify(
        suspect: Annotated[
            str,
            typer.Argument(help="Suspect model: .onnx, .mseal, .pt/.safetensors with --arch, or an http(s):// URL."),
        ],
        num_classes: Annotated[
            int | None, typer.Option("--num-classes", help="Classes of the served model (default: as recorded).")
        ] = None,
        key: Annotated[
            list[str] | None,
            typer.Option("--key", help="Test only these key ids (default: every key with traced answers)."),
        ] = None,
        alpha: Annotated[float, typer.Option(help="Name a key when its adjusted p-value is at most this.")] = 1e-6,
        max_per_key: Annotated[int, typer.Option("--max-per-key", help="Queries per key at most.")] = 500,
        arch: Annotated[str | None, typer.Option("--arch", help="module:factory for PyTorch weights.")] = None,
        request_template: Annotated[
            str, typer.Option("--request-template", help="JSON body for a URL suspect; $INPUTS is replaced.")
        ] = '{"inputs": "$INPUTS"}',
        response_path: Annotated[
            str, typer.Option("--response-path", help="Where the URL's answer holds the outputs.")
        ] = "outputs",
        json_out: Annotated[Path | None, typer.Option("--json", help="Also write the verdict as JSON here.")] = None,
        config: ConfigOpt = None,
        data_dir: DataDirOpt = None,
        database_url: DatabaseOpt = None,
    ) -> None:
        """Query a suspect with each key's altered answers; name the key it was extracted through.

        Exit 0 when a key is named, 14 when none is, 15 when the suspect could not be queried.
        """
        with translate():
            from ..ownership_cli import _suspect
            from .tracing import trace_suspect

            store = _store(_config(config, data_dir=str(data_dir) if data_dir else None, database_url=database_url))
            target = _suspect(suspect, arch=arch, request_template=request_template, response_path=response_path)
            try:
                with target:
                    verdict = trace_suspect(
                        store, target, num_classes=num_classes, keys=key, alpha=alpha, max_per_key=max_per_key
                    )
            finally:
                store.dispose()
            print(verdict.summary())
            if json_out is not None:
                json_out.write_text(json.dumps(verdict.to_dict(), indent=1) + "\n", encoding="utf-8")
            if verdict.decision == "not-named":
                raise typer.Exit(EXIT_NOT_NAMED)
            if verdict.decision == "inconclusive":
                raise typer.Exit(EXIT_INCONCLUSIVE)
