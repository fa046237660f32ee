"""Client side of the key server for S2: device activation and the publisher commands (spec §7.10).

``modelseal activate`` creates the device key file (X25519 + Ed25519 lines, 0600) if missing and
registers it under a licence (spec §7.3, §10.2); ``modelseal licence …`` and ``modelseal device …``
call the admin routes of spec §7.7 with an admin token. Only typer and the core library are imported
at module level; httpx loads when a command talks to a server.
"""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer

from .keys import _read_secret
from .keyserver.client import (
    ACTIVATION_ROUTE,
    TIMEOUT_S,
    Client,
    DeviceKey,
    KeyServerUnreachable,
    LicenceError,
    accept_offline,
    activate,
    activation_body,
    fingerprint,
    offline_request,
    state_dir,
    submit_offline,
)

__all__ = [
    "ACTIVATION_ROUTE",
    "TIMEOUT_S",
    "Client",
    "DeviceKey",
    "KeyServerUnreachable",
    "LicenceError",
    "activate",
    "activation_body",
    "fingerprint",
    "register",
    "state_dir",
]

# --- CLI (registered by modelseal.cli) ----------------------------------------------------------

_DURATION = re.compile(r"^(\d+)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``10m``, ``1h``, ``3d``, ``2w`` as seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 10m, 1h, 3d)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_time(text: str) -> int:
    """An ISO date or date-time (UTC unless it says otherwise), or epoch seconds."""
    if text.strip().isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a date: {text!r} (use YYYY-MM-DD or an ISO date-time)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp())


ServerOpt = Annotated[str | None, typer.Option("--server", help="Key server URL (default $MODELSEAL_KEYSERVER).")]
TokenOpt = Annotated[str | None, typer.Option("--admin-token", help="Admin token (default $MODELSEAL_ADMIN_TOKEN).")]
TokenFileOpt = Annotated[Path | None, typer.Option("--admin-token-file", help="File holding the admin token (0600).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _server(server: str | None) -> str:
    url = server or os.environ.get("MODELSEAL_KEYSERVER")
    if not url:
        raise ValueError("name the key server with --server or $MODELSEAL_KEYSERVER")
    return url


def _admin_client(server: str | None, token: str | None, token_file: Path | None) -> Client:
    if token is None and token_file is not None:
        token = _read_secret(token_file, "MSEAL-ADMIN:", "admin token")
    token = token or os.environ.get("MODELSEAL_ADMIN_TOKEN")
    if not token:
        raise ValueError("give an admin token with --admin-token, --admin-token-file or $MODELSEAL_ADMIN_TOKEN")
    return Client(_server(server), token)


LicenceOpt = Annotated[str | None, typer.Option("--licence", help="Licence key (or $MODELSEAL_LICENCE).")]


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _model_ids(client: Client, refs: list[str]) -> list[str]:
    """Model ids for ids or names (``not-found`` for an unknown name)."""
    if all(r.startswith("mdl_") for r in refs):
        return list(refs)
    by_name = {m["name"]: m["id"] for m in client.items("/v1/admin/models", {})}
    ids = [r if r.startswith("mdl_") else by_name.get(r, "") for r in refs]
    missing = [r for r, i in zip(refs, ids, strict=True) if not i]
    if missing:
        raise LicenceError("not-found", f"no model named {missing[0]!r}")
    return ids


def register(app: typer.Typer, translate: Any) -> None:
    """Add ``activate``, ``licence …`` and ``device …`` to the ``modelseal`` command line."""
    licence_app = typer.Typer(
        help="Create, list and revoke licences on a key server (admin token).", no_args_is_help=True
    )
    device_app = typer.Typer(
        help="List and revoke activated devices on a key server (admin token).", no_args_is_help=True
    )
    app.add_typer(licence_app, name="licence")
    app.add_typer(device_app, name="device")
    model_app = typer.Typer(help="Create and list models on a key server (admin token).", no_args_is_help=True)
    app.add_typer(model_app, name="model")

    @model_app.command("create")
    def model_create(
        name: Annotated[str, typer.Argument(help="A name, unique for this publisher.")],
        server: ServerOpt = None,
        admin_token: TokenOpt = None,
        admin_token_file: TokenFileOpt = None,
    ) -> None:
        """Create a model; prints its id (mdl_…)."""
        with translate(), _admin_client(server, admin_token, admin_token_file) as client:
            _, result = client.request("POST", "/v1/admin/models", json={"name": name})
            print(result["id"])

    @model_app.command("list")
    def model_list(
        server: ServerOpt = None,
        admin_token: TokenOpt = None,
        admin_token_file: TokenFileOpt = None,
    ) -> None:
        """List this publisher's models (JSON)."""
        with translate(), _admin_client(server, admin_token, admin_token_file) as client:
            _print(client.items("/v1/admin/models", {}))

    offline_app = typer.Typer(
        help="Air-gapped activation and renewal through request and response files.", no_args_is_help=True
    )
    app.add_typer(offline_app, name="offline")
    token_app = typer.Typer(
        help="One-time grant tokens (publishers): a token opens one model once.", no_args_is_help=True
    )
    app.add_typer(token_app, name="grant-token")

    @app.command("activate")
    def activate_cmd(
        server: Annotated[
            str | None, typer.Option("--server", help="Key server URL (default $MODELSEAL_KEYSERVER).")
        ] = None,
        licence: Annotated[
            str | None, typer.Option("--licence", help="Licence key (default $MODELSEAL_LICENCE).")
        ] = None,
        label: Annotated[str | None, typer.Option("--label", help="A name for this device.")] = None,
    ) -> None:
        """Register this device under a licence (creates the device key, 0600, if missing)."""
        with translate():
            key = licence or os.environ.get("MODELSEAL_LICENCE")
            if not key:
                raise ValueError("give the licence key with --licence or $MODELSEAL_LICENCE")
            result, created = activate(_server(server), key, label=label)
            what = "activated" if created else "already activated"
            print(
                f"{what}: device {result['device_id']} under licence {result['licence_id']}",
                file=sys.stderr,
            )
            _print({k: result[k] for k in ("device_id", "licence_id", "activated_at", "policy")})

    @licence_app.command("create")
    def licence_create(
        model: Annotated[list[str], typer.Option("--model", help="Model id or name (repeatable).")],
        max_devices: Annotated[int, typer.Option("--max-devices", help="Devices that may activate.")],
        expires: Annotated[str | None, typer.Option("--expires", help="Expiry date (YYYY-MM-DD or ISO).")] = None,
        opens_per_day: Annotated[int | None, typer.Option("--opens-per-day", help="Grants per UTC day.")] = None,
        offline_grace: Annotated[str, typer.Option("--offline-grace", help="Offline grace, e.g. 3d.")] = "0",
        recheck: Annotated[str, typer.Option("--recheck", help="Recheck interval, e.g. 1h.")] = "1h",
        grant_ttl: Annotated[str, typer.Option("--grant-ttl", help="Grant lifetime, e.g. 1d.")] = "1d",
        label: Annotated[str | None, typer.Option("--label", help="A note on who the licence is for.")] = None,
        server: ServerOpt = None,
        admin_token: TokenOpt = None,
        admin_token_file: TokenFileOpt = None,
    ) -> None:
        """Create a licence; prints its key once (the server keeps only a keyed hash)."""
        with translate(), _admin_client(server, admin_token, admin_token_file) as client:
            ids = _model_ids(client, model)
            policy: dict[str, Any] = {
                "models": ids,
                "max_devices": max_devices,
                "expires_at": parse_time(expires) if expires else None,
                "opens_per_day": opens_per_day,
                "offline_grace_s": parse_duration(offline_grace),
                "recheck_interval_s": parse_duration(recheck),
                "grant_ttl_s": parse_duration(grant_ttl),
            }
            body: dict[str, Any] = {"policy": policy} | ({"label": label} if label else {})
            _, result = client.request("POST", "/v1/admin/licences", json=body)
            print(f"licence {result['licence']['id']}; its key (shown once):", file=sys.stderr)
            print(result["licence_key"])

    @licence_app.command("update")
    def licence_update(
        licence_id: Annotated[str, typer.Argument(help="lic_… id.")],
        model: Annotated[list[str] | None, typer.Option("--model", help="Replace the models (repeatable).")] = None,
        max_devices: Annotated[int | None, typer.Option("--max-devices", help="Devices that may activate.")] = None,
        expires: Annotated[str | None, typer.Option("--expires", help="Expiry date, or 'never'.")] = None,
        opens_per_day: Annotated[
            str | None, typer.Option("--opens-per-day", help="Grants per UTC day, or 'unlimited'.")
        ] = None,
        offline_grace: Annotated[str | None, typer.Option("--offline-grace", help="Offline grace, e.g. 3d.")] = None,
        recheck: Annotated[str | None, typer.Option("--recheck", help="Recheck interval, e.g. 1h.")] = None,
        grant_ttl: Annotated[str | None, typer.Option("--grant-ttl", help="Grant lifetime, e.g. 1d.")] = None,
        label: Annotated[str | None, typer.Option("--label", help="A note on who the licence is for.")] = None,
        server: ServerOpt = None,
        admin_token: TokenOpt = None,
        admin_token_file: TokenFileOpt = None,
    ) -> None:
        """Change a licence in place (its key, devices and grants stay); prints the licence (JSON)."""
        with translate(), _admin_client(server, admin_token, admin_token_file) as client:
            policy: dict[str, Any] = {}
            if model:
                policy["models"] = _model_ids(client, model)
            if max_devices is not None:
                policy["max_devices"] = max_devices
            if expires is not None:
                policy["expires_at"] = None if expires == "never" else parse_time(expires)
            if opens_per_day is not None:
                policy["opens_per_day"] = None if opens_per_day == "unlimited" else int(opens_per_day)
            durations = {"offline_grace_s": offline_grace, "recheck_interval_s": recheck, "grant_ttl_s": grant_ttl}
            policy |= {key: parse_duration(value) for key, value in durations.items() if value is not None}
            body: dict[str, Any] = {"policy": policy} | ({"label": label} if label else {})
            _, result = client.request("PATCH", f"/v1/admin/licences/{licence_id}", json=body)
            _print(result)

    @licence_app.command("list")
    def licence_list(
        status: Annotated[str, typer.Option("--status", help="active, revoked, expired or all.")] = "all",
        model: Annotated[str | None, typer.Option("--model", help="Only licences for this model id.")] = None,
        server: ServerOpt = None,
        admin_token: TokenOpt = None,
        admin_token_file: TokenFileOpt = None,
    ) -> None:
        """List licences (JSON)."""
        with translate(), _admin_client(server, admin_token, admin_token_file) as client:
            _print(client.items("/v1/admin/licences", {"status": status, "model_id": model}))

    @licence_app.command("revoke")
    def licence_revoke(
        licence_id: Annotated[str, typer.Argument(help="lic_… id.")],
        reason: Annotated[str, typer.Option("--reason", help="Why (kept in the audit log).")],
        server: ServerOpt = None,
        admin_token: TokenOpt = None,
        admin_token_file: TokenFileOpt = None,
    ) -> None:
        """Revoke a licence: later activations and grants under it are refused."""
        with translate(), _admin_client(server, admin_token, admin_token_file) as client:
            _, result = client.request("POST", f"/v1/admin/licences/{licence_id}/revoke", json={"reason": reason})
            print(f"revoked {result['id']}", file=sys.stderr)

    @device_app.command("list")
    def device_list(
        licence: Annotated[str | None, typer.Option("--licence", help="Only devices of this licence id.")] = None,
        status: Annotated[str, typer.Option("--status", help="active, revoked or all.")] = "all",
        server: ServerOpt = None,
        admin_token: TokenOpt = None,
        admin_token_file: TokenFileOpt = None,
    ) -> None:
        """List activated devices (JSON)."""
        with translate(), _admin_client(server, admin_token, admin_token_file) as client:
            _print(client.items("/v1/admin/devices", {"licence_id": licence, "status": status}))

    @device_app.command("revoke")
    def device_revoke(
        device_id: Annotated[str, typer.Argument(help="dev_… id.")],
        reason: Annotated[str, typer.Option("--reason", help="Why (kept in the audit log).")],
        server: ServerOpt = None,
        admin_token: TokenOpt = None,
        admin_token_file: TokenFileOpt = None,
    ) -> None:
        """Revoke a device and free its slot."""
        with translate(), _admin_client(server, admin_token, admin_token_file) as client:
            _, result = client.request("POST", f"/v1/admin/devices/{device_id}/revoke", json={"reason": reason})
            print(f"revoked {result['id']}", file=sys.stderr)

    @token_app.command("create")
    def grant_token_create(
        licence: Annotated[str, typer.Option("--licence", help="lic_… id the token draws on.")],
        model: Annotated[str, typer.Option("--model", help="Model id or name.")],
        device: Annotated[str | None, typer.Option("--device", help="Bind to this dev_… device.")] = None,
        expires: Annotated[str, typer.Option("--expires", help="Redeemable for, e.g. 1d.")] = "1d",
        grant_ttl: Annotated[str, typer.Option("--grant-ttl", help="Lifetime of the grant, e.g. 1h.")] = "1h",
        server: ServerOpt = None,
        admin_token: TokenOpt = None,
        admin_token_file: TokenFileOpt = None,
    ) -> None:
        """Create a one-time grant token; prints it once (hand it over in a request body, never a URL)."""
        with translate(), _admin_client(server, admin_token, admin_token_file) as client:
            [model_id] = _model_ids(client, [model])
            body: dict[str, Any] = {
                "licence_id": licence,
                "model_id": model_id,
                "expires_in_s": parse_duration(expires),
                "grant_ttl_s": parse_duration(grant_ttl),
            } | ({"device_id": device} if device else {})
            _, result = client.request("POST", "/v1/admin/grant-tokens", json=body)
            print(f"grant token {result['id']}, redeemable until {result['expires_at']} (shown once):", file=sys.stderr)
            print(result["token"])

    def _licence(value: str | None) -> str:
        key = value or os.environ.get("MODELSEAL_LICENCE")
        if not key:
            raise ValueError("give the licence key with --licence or $MODELSEAL_LICENCE")
        return key

    def _read(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise ValueError(f"{path} is not a JSON file") from None

    def _write(path: Path, data: Any) -> None:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @offline_app.command("server-info")
    def offline_server_info(
        output: Annotated[Path, typer.Option("--output", "-o", help="Write the server-info file here.")],
        server: ServerOpt = None,
        licence: LicenceOpt = None,
    ) -> None:
        """Connected machine: save the server's public keys for an air-gapped device."""
        with translate(), Client(_server(server), _licence(licence)) as client:
            _, info = client.request("GET", "/v1/server-info")
            _write(output, info | {"public_url": info.get("public_url") or _server(server)})

    @offline_app.command("request")
    def offline_request_cmd(
        server_info: Annotated[Path, typer.Option("--server-info", help="File from `offline server-info`.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Write the request file here.")],
        containers: Annotated[
            list[Path] | None, typer.Option("--for", help="A container to get a grant for (repeatable).")
        ] = None,
        licence: LicenceOpt = None,
        label: Annotated[str | None, typer.Option("--label", help="A name for this device.")] = None,
    ) -> None:
        """Air-gapped device: write an activation/renewal request file (holds no secret)."""
        with translate():
            request = offline_request(_read(server_info), _licence(licence), list(containers or []), label=label)
            _write(output, request)
            print(f"wrote {output}; submit it from a connected machine", file=sys.stderr)

    @offline_app.command("submit")
    def offline_submit(
        request: Annotated[Path, typer.Argument(help="The device's request file.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Write the response file here.")],
        server: ServerOpt = None,
        licence: LicenceOpt = None,
    ) -> None:
        """Connected machine: submit a request file and save the signed response file."""
        with translate():
            _write(output, submit_offline(_server(server), _licence(licence), _read(request)))

    @offline_app.command("accept")
    def offline_accept(response: Annotated[Path, typer.Argument(help="The response file.")]) -> None:
        """Air-gapped device: verify the response, store the activation and cache its grants."""
        with translate():
            _print(accept_offline(_read(response)))
