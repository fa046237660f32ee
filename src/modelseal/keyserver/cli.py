"""``modelseal keyserver …``: serve, migrate, admin and audit-verify (spec §7.10, §12.4).

Only typer is imported at module level, so ``modelseal --help`` works without the ``keyserver``
extra; each command imports the server stack when it runs. Errors are translated in one place
(:func:`_translate`): settings refused → exit 2, any other modelseal error → its exit code.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import ModelSealError

if TYPE_CHECKING:
    from .services import KeyServer

EXIT_SETTINGS = 2
EXIT_AUDIT_PROBLEMS = 1

app = typer.Typer(
    name="keyserver",
    help="Run and administer a modelseal key server (needs the `keyserver` extra).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
admin_app = typer.Typer(help="Publishers and admin tokens (direct database access on the server host).")
app.add_typer(admin_app, name="admin")

EnvFile = Annotated[Path | None, typer.Option("--env-file", help="Read MODELSEAL_KS_* settings from this file.")]


def _say(message: str) -> None:
    print(message, file=sys.stderr)


@contextmanager
def _translate() -> Iterator[None]:
    try:
        yield
    except ImportError as exc:
        _say(f"error: the key server needs its extra: pip install 'modelseal[keyserver]' ({exc.name} missing)")
        raise typer.Exit(1) from None
    except ModelSealError as exc:
        _say(f"error: {type(exc).__name__}: {exc}")
        raise typer.Exit(exc.exit_code) from None
    except OSError as exc:
        _say(f"error: {exc.strerror or exc}: {exc.filename or ''}")
        raise typer.Exit(7) from None
    except ValueError as exc:  # a malformed argument or input file
        _say(f"error: {exc}")
        raise typer.Exit(EXIT_SETTINGS) from None


def _open(env_file: Path | None, *, migrate: bool, bootstrap: bool = False, **overrides: object) -> KeyServer:
    from .bootstrap import open_keyserver
    from .settings import load_settings

    return open_keyserver(load_settings(env_file, **overrides), migrate=migrate, bootstrap=bootstrap)


@app.command()
def serve(
    dev: Annotated[bool, typer.Option("--dev", help="Dev mode: dev master key and tokens allowed, marked.")] = False,
    host: Annotated[str | None, typer.Option(help="Listen address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8750).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Worker processes.")] = None,
    no_migrate: Annotated[bool, typer.Option("--no-migrate", help="Do not run migrations first.")] = False,
    env_file: EnvFile = None,
) -> None:
    """Migrate and initialise (one process), then serve HTTP with uvicorn."""
    with _translate():
        import uvicorn

        from .app import create_app
        from .bootstrap import open_keyserver
        from .settings import load_settings

        overrides: dict[str, object] = {"host": host, "port": port, "workers": workers}
        if dev:
            overrides["dev"] = True
        settings = load_settings(env_file, **overrides)
        server = open_keyserver(settings, migrate=not no_migrate)
        if settings.workers == 1:
            app_ = create_app(settings, keyserver=server)
            uvicorn.run(app_, host=settings.host, port=settings.port, **_uvicorn_options(settings))
            return
        server.db.dispose()
        # Workers rebuild the settings from the environment: pass the command-line overrides on.
        for name, value in overrides.items():
            if value is not None:
                os.environ[f"MODELSEAL_KS_{name.upper()}"] = str(value)
        if env_file is not None:
            os.environ.update(_read_env_file(env_file))
        uvicorn.run(
            "modelseal.keyserver.app:app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            **_uvicorn_options(settings),
        )


def _uvicorn_options(settings: Any) -> dict[str, Any]:
    """uvloop and httptools when installed (``modelseal[keyserver]`` installs them), and the
    per-request access log only when asked for (every decision is in the audit log anyway)."""
    import importlib.util

    fast = all(importlib.util.find_spec(m) for m in ("uvloop", "httptools"))
    return {
        "log_level": "info",
        "access_log": settings.access_log,
        "loop": "uvloop" if fast else "auto",
        "http": "httptools" if fast else "auto",
    }


def _read_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            out.setdefault(key.strip(), value.strip().strip("'\""))
    return {k: v for k, v in out.items() if k not in os.environ}


@app.command()
def migrate(env_file: EnvFile = None) -> None:
    """Create or upgrade the database schema and server secrets."""
    with _translate():
        server = _open(env_file, migrate=True, bootstrap=True)
        _say(f"database at migration {server.db.current_revision()}")


@admin_app.command("create-publisher")
def create_publisher(name: Annotated[str, typer.Argument(help="Publisher name.")], env_file: EnvFile = None) -> None:
    """Create a publisher; prints its id."""
    with _translate():
        print(_open(env_file, migrate=False).create_publisher(name))


@admin_app.command("create-token")
def create_token(
    publisher: Annotated[str, typer.Argument(help="Publisher id or name.")],
    label: Annotated[str | None, typer.Option(help="A note on what the token is for.")] = None,
    env_file: EnvFile = None,
) -> None:
    """Create an admin token for a publisher; prints it once (it is stored only as a keyed hash)."""
    with _translate():
        token_id, token = _open(env_file, migrate=False).create_admin_token(publisher, label=label)
        _say(f"admin token {token_id} (shown once):")
        print(token)


@admin_app.command("revoke-token")
def revoke_token(token_id: Annotated[str, typer.Argument(help="adm_… id.")], env_file: EnvFile = None) -> None:
    """Revoke an admin token."""
    with _translate():
        _open(env_file, migrate=False).revoke_admin_token(token_id)
        _say(f"revoked {token_id}")


@app.command("master-key")
def master_key(
    output: Annotated[Path, typer.Argument(help="The file to create (0600; an existing file is never overwritten).")],
) -> None:
    """Generate a master key file for MODELSEAL_KS_MASTER_KEY_FILE (keep a copy offline: losing it
    loses every escrowed content key)."""
    with _translate():
        from .crypto import write_master_key_file

        try:
            write_master_key_file(output)
        except FileExistsError:
            raise ValueError(f"{output} exists; a master key file is never overwritten") from None
        _say(f"wrote a new master key to {output}")


@app.command("audit-verify")
def audit_verify(
    anchor: Annotated[
        list[Path] | None, typer.Option("--anchor", help="Check against an anchor file written earlier (repeatable).")
    ] = None,
    write_anchor: Annotated[
        Path | None,
        typer.Option(
            "--write-anchor", help="If the log verifies, write its current heads here; keep it off the server."
        ),
    ] = None,
    env_file: EnvFile = None,
) -> None:
    """Verify the audit hash chain; print each problem as a JSON line; exit 1 if any.

    The chain shows any edited, inserted, reordered or deleted record, except the newest ones
    deleted together with a rewrite of the head row; an anchor written earlier and kept where
    the server's operator cannot change it shows those too, back to the anchor."""
    with _translate():
        anchors = []
        for path in anchor or []:
            try:
                anchors.append(json.loads(path.read_text(encoding="utf-8")))
            except ValueError:
                raise ValueError(f"{path} is not an audit anchor file") from None
        server = _open(env_file, migrate=False)
        problems, current = server.verify_and_anchor(anchors)
        for p in problems:
            print(json.dumps(p.to_dict(), sort_keys=True))
        if problems:
            _say(f"audit log: {len(problems)} problem(s)")
            raise typer.Exit(EXIT_AUDIT_PROBLEMS)
        _say("audit log: OK")
        if write_anchor is not None:
            write_anchor.write_text(json.dumps(current, indent=2) + "\n", encoding="utf-8")
            _say(f"wrote the audit anchor {write_anchor}")
