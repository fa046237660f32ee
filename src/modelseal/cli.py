"""The ``modelseal`` command line: a thin layer over the library API.

Library errors are translated to messages and exit codes in one place
(:func:`_translate`); each error class carries its own exit code:

    0 ok · 1 other modelseal error · 2 usage · 3 FormatError · 4 IntegrityError
    5 SignatureError · 6 WrongKeyError · 7 file system error (missing file, permission)
    8 ModelLoadError · 9 UnsafeModelError · 10 key server refused · 11 key server unreachable
    12 OwnershipError · 13 SuspectError · 14 ownership not proven · 15 inconclusive (verify commands)
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from . import container
from .errors import ModelSealError
from .keys import Identity, Recipient, SigningKey, Unwrapper, VerifyKey

EXIT_USAGE = 2
EXIT_OS = 7
PASSPHRASE_ENV = "MODELSEAL_PASSPHRASE"
_PROGRESS_MIN = 32 << 20  # show a bar for anything that may take more than about a second

app = typer.Typer(
    name="modelseal",
    help="Seal ML models into encrypted, signed containers; open them in memory; prove they are yours.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def _translate() -> Iterator[None]:
    """Map library and OS errors to a one-line message and the error's exit code."""
    try:
        yield
    except ModelSealError as exc:
        err.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except OSError as exc:
        err.print(f"[bold red]error:[/] {exc.strerror or exc}: {exc.filename or ''}", highlight=False)
        raise typer.Exit(EXIT_OS) from None
    except (ValueError, KeyError, TypeError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None


def _command(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _translate():
            return fn(*args, **kwargs)

    app.command()(wrapper)
    return fn


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    if total < _PROGRESS_MIN or not err.is_terminal:
        yield None
        return
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(f"[bold]{label}", *columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _passphrase(ask: bool, confirm: bool = False) -> str | None:
    if not ask:
        return None
    from_env = os.environ.get(PASSPHRASE_ENV)
    if from_env:
        return from_env
    if not sys.stdin.isatty():
        raise ValueError(f"--passphrase needs a terminal to prompt, or ${PASSPHRASE_ENV} set")
    value: str = typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
    return value


def _identities(paths: list[Path] | None) -> list[Unwrapper]:
    ids: list[Unwrapper] = [Identity.load(p) for p in paths or []]
    env = os.environ.get("MODELSEAL_IDENTITY")
    if not ids and env:
        ids.append(Identity.load(env))
    if not ids:
        # A device activated with a key server (``modelseal activate``) opens through it.
        from .keyserver.client import KeyServerUnwrapper, activations, state_dir

        if os.environ.get("MODELSEAL_KEYSERVER") or activations(state_dir()):
            ids.append(KeyServerUnwrapper())
    return ids


def _recipients(values: list[str] | None, files: list[Path] | None) -> list[str]:
    found = list(values or [])
    for f in files or []:
        for line in f.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def _keyserver_recipient(url: str, model: str | None, token: str | None, token_file: Path | None) -> Recipient:
    from .keys import _read_secret
    from .keyserver.client import KeyServerRecipient

    if not model:
        raise ValueError("--keyserver needs --model (the key server model's id or name)")
    if token is None and token_file is not None:
        token = _read_secret(token_file, "MSEAL-ADMIN:", "admin token")
    token = token or os.environ.get("MODELSEAL_ADMIN_TOKEN")
    if not token:
        raise ValueError("give an admin token with --admin-token, --admin-token-file or $MODELSEAL_ADMIN_TOKEN")
    return KeyServerRecipient(url, token, model)


def _metadata(pairs: list[str] | None, **named: str | None) -> dict[str, str]:
    meta = {k: v for k, v in named.items() if v is not None}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--meta expects KEY=VALUE, got {pair!r}")
        meta[key.strip()] = value
    return meta


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- commands ----------------------------------------------------------------------------

IdentityOpt = Annotated[
    list[Path] | None,
    typer.Option("--identity", "-i", help="Identity file (repeatable; default $MODELSEAL_IDENTITY)."),
]
PassphraseOpt = Annotated[
    bool, typer.Option("--passphrase", "-p", help=f"Use a passphrase (prompted, or ${PASSPHRASE_ENV}).")
]


@_command
def keygen(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the secret key here (mode 0600).")
    ] = None,
    signing: Annotated[bool, typer.Option("--signing", help="Make a publisher signing key (Ed25519).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing key file.")] = False,
) -> None:
    """Generate a device identity (X25519) or a publisher signing key (Ed25519)."""
    key: Identity | SigningKey = SigningKey.generate() if signing else Identity.generate()
    public = str(key.verify_key) if isinstance(key, SigningKey) else str(key.recipient)
    if output is None:
        sys.stdout.write(f"# public key: {public}\n{key.to_string()}\n")
        return
    key.save(output, overwrite=force)
    err.print(f"wrote {'signing key' if signing else 'identity'} to {output} (mode 0600); public key:")
    print(public)


@_command
def seal(
    src: Annotated[Path, typer.Argument(help="Model file or directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Container to write.")],
    recipient: Annotated[
        list[str] | None, typer.Option("--recipient", "-r", help="mseal-x25519:... (repeatable)")
    ] = None,
    recipients_file: Annotated[
        list[Path] | None, typer.Option("--recipients-file", "-R", help="File of recipients, one per line.")
    ] = None,
    passphrase: PassphraseOpt = False,
    sign: Annotated[Path | None, typer.Option("--sign", "-s", help="Publisher signing key file.")] = None,
    owner: Annotated[str | None, typer.Option(help="Owner (public metadata).")] = None,
    copyright: Annotated[str | None, typer.Option(help="Copyright notice (public metadata).")] = None,  # noqa: A002
    license: Annotated[str | None, typer.Option(help="Licence terms (public metadata).")] = None,  # noqa: A002
    name: Annotated[str | None, typer.Option(help="Model name (public metadata).")] = None,
    model_version: Annotated[str | None, typer.Option("--model-version", help="Model version (metadata).")] = None,
    meta: Annotated[list[str] | None, typer.Option("--meta", help="Extra public metadata KEY=VALUE.")] = None,
    model_format: Annotated[str | None, typer.Option("--format", help="Override the detected model format.")] = None,
    chunk_size: Annotated[int, typer.Option(help="AEAD chunk size in bytes (power of two).")] = 1 << 20,
    shard_size: Annotated[int | None, typer.Option(help="Split into shards of at most this many bytes.")] = None,
    keyserver: Annotated[
        str | None, typer.Option("--keyserver", help="Escrow the key with this key server and add its stanza.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Key server model id or name.")] = None,
    admin_token: Annotated[
        str | None, typer.Option("--admin-token", help="Admin token (default $MODELSEAL_ADMIN_TOKEN).")
    ] = None,
    admin_token_file: Annotated[
        Path | None, typer.Option("--admin-token-file", help="File holding the admin token (0600).")
    ] = None,
) -> None:
    """Encrypt a model (file or directory) for recipients, optionally signed."""
    metadata = _metadata(meta, owner=owner, copyright=copyright, license=license, name=name, version=model_version)
    signer = SigningKey.load(sign) if sign else None
    recipients: list[Recipient | str] = list(_recipients(recipient, recipients_file))
    if keyserver is not None:
        recipients.append(_keyserver_recipient(keyserver, model, admin_token, admin_token_file))
    with _progress(_tree_size(src), "sealing") as progress:
        info = container.seal(
            src,
            output,
            recipients=recipients,
            passphrase=_passphrase(passphrase, confirm=True),
            signer=signer,
            metadata=metadata,
            model_format=model_format,
            chunk_size=chunk_size,
            shard_size=shard_size,
            progress=progress,
        )
    where = ", ".join(str(p) for p in info.paths)
    err.print(f"sealed {len(info.entries)} file(s), {info.plaintext_size:,} bytes -> {where}")


@_command
def open(  # noqa: A001 - the verb users expect
    path: Annotated[Path, typer.Argument(help="Container (or any shard of it).")],
    identity: IdentityOpt = None,
    passphrase: PassphraseOpt = False,
    require_signer: Annotated[
        str | None, typer.Option("--require-signer", help="Refuse unless signed by this mseal-ed25519: key.")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the plaintext here.")] = None,
    file: Annotated[str | None, typer.Option("--file", "-f", help="Only this entry (to stdout or --output).")] = None,
) -> None:
    """Decrypt a container for publishers: to stdout (one file) or to --output."""
    with container.open_sealed(
        path,
        identity=_identities(identity),
        passphrase=_passphrase(passphrase),
        require_signer=require_signer,
    ) as model:
        if output is None:
            if file is None and len(model.files) != 1:
                raise ValueError(f"container holds {len(model.files)} files: pass --output DIR or --file NAME")
            if sys.stdout.isatty():
                raise ValueError("refusing to write model bytes to a terminal; use --output or a pipe")
            with model.open_file(file) as reader:
                while block := reader.read(1 << 20):
                    sys.stdout.buffer.write(block)
            sys.stdout.buffer.flush()
            return
        if file is not None:
            size = model.size(file)
            tmp = output.with_name(f".{output.name}.{os.urandom(6).hex()}.tmp")
            if output.exists():
                raise FileExistsError(17, "refusing to overwrite", str(output))
            try:
                with _progress(size, "opening") as progress, tmp.open("xb") as fh, model.open_file(file) as reader:
                    while block := reader.read(1 << 20):
                        fh.write(block)
                        if progress:
                            progress(len(block))
                os.replace(tmp, output)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            with _progress(model.info.plaintext_size, "opening") as progress:
                model.extract(output, progress=progress)
        err.print(f"wrote {output}")


def _print_info(info: container.ContainerInfo) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("container", ", ".join(str(p) for p in info.paths))
    table.add_row("size", f"{info.size:,} bytes ({len(info.paths)} file(s))")
    table.add_row("format", f"modelseal v{info.version}, AES-256-GCM chunks of {info.chunk_size:,} bytes")
    table.add_row("model format", info.model_format)
    table.add_row("created", info.created.isoformat())
    for key, value in info.metadata.items():
        table.add_row(f"meta.{key}", value)
    for r in info.recipients:
        detail = r.get("kid") or r.get("work_factor") or ""
        table.add_row("recipient", f"{r['type']} {detail}".strip())
    for s in info.signers:
        mark = "[green]verified[/]" if s == info.verified_signer else "[yellow]claimed, not verified[/]"
        table.add_row("signed by", f"{s} ({mark})")
    if not info.signers:
        table.add_row("signed by", "[yellow]nobody (unsigned)[/]")
    out.print(table)
    files = Table("file", "bytes", box=None)
    for e in info.entries:
        files.add_row(e.path, f"{e.size:,}")
    out.print(files)
    if info.verified_signer is None:
        out.print("[dim]Header fields are claims until the container is opened or verified.[/]")


@_command
def inspect(
    path: Annotated[Path, typer.Argument(help="Container (or any shard of it).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a container's public header: files, metadata, recipients, signers. No key needed."""
    info = container.inspect(path)
    if as_json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        _print_info(info)


@_command
def mark(
    path: Annotated[Path, typer.Argument(help="An .onnx or .safetensors file (or a container, to read).")],
    owner: Annotated[str | None, typer.Option(help="Owner.")] = None,
    copyright: Annotated[str | None, typer.Option(help="Copyright notice.")] = None,  # noqa: A002
    license: Annotated[str | None, typer.Option(help="Licence terms.")] = None,  # noqa: A002
    meta: Annotated[list[str] | None, typer.Option("--meta", help="Another mark, KEY=VALUE (repeatable).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of in place.")] = None,
) -> None:
    """Write ownership marks into a model file's own metadata, or show them (no options)."""
    from . import marks

    new = _metadata(meta, owner=owner, copyright=copyright, license=license)
    if new:
        written = marks.write_marks(path, new, output)
        print(f"marked {written}", file=sys.stderr)
        path = written
    print(json.dumps(marks.read_marks(path), indent=2, sort_keys=True, ensure_ascii=False))


@_command
def verify(
    path: Annotated[Path, typer.Argument(help="Container (or any shard of it).")],
    signer: Annotated[str, typer.Option("--signer", help="Publisher's mseal-ed25519:... key.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check who published a container, without a decryption key."""
    size = container.inspect(path).size
    with _progress(size, "verifying") as progress:
        info = container.verify(path, VerifyKey.parse(signer), progress=progress)
    if as_json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        err.print(f"[green]OK[/]: {path} is signed by {info.verified_signer} and unmodified")


@_command
def rewrap(
    path: Annotated[Path, typer.Argument(help="Container to rewrap.")],
    identity: IdentityOpt = None,
    passphrase: PassphraseOpt = False,
    add: Annotated[list[str] | None, typer.Option("--add", "-a", help="Recipient to add (repeatable).")] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", "-d", help="Recipient to remove.")] = None,
    new_passphrase: Annotated[bool, typer.Option("--new-passphrase", help="Set (or replace) the passphrase.")] = False,
    remove_passphrase: Annotated[bool, typer.Option("--remove-passphrase", help="Drop the passphrase.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of in place.")] = None,
) -> None:
    """Add or remove recipients without re-encrypting the model."""
    new = None
    if new_passphrase:
        if not sys.stdin.isatty():
            new = os.environ.get("MODELSEAL_NEW_PASSPHRASE")
            if not new:
                raise ValueError("--new-passphrase needs a terminal, or $MODELSEAL_NEW_PASSPHRASE set")
        else:
            new = typer.prompt("New passphrase", hide_input=True, confirmation_prompt=True, err=True)
    size = container.inspect(path).size
    with _progress(size, "rewrapping") as progress:
        info = container.rewrap(
            path,
            output,
            identity=_identities(identity),
            passphrase=_passphrase(passphrase),
            add=add or [],
            remove=remove or [],
            new_passphrase=new,
            remove_passphrase=remove_passphrase,
            progress=progress,
        )
    err.print(f"rewrapped {', '.join(str(p) for p in info.paths)}: {len(info.recipients)} recipient(s)")


def _load_input(path: Path, dtype: Any) -> Any:
    import numpy as np

    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: expected a .npy file or a JSON array ({exc})") from None
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a numeric array ({exc})") from None


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(float16)": "float16", "tensor(uint8)": "uint8",
               "tensor(int8)": "int8", "tensor(bool)": "bool"}  # fmt: skip


@_command
def run(
    path: Annotated[Path, typer.Argument(help="Sealed ONNX model.")],
    inputs: Annotated[
        list[str], typer.Option("--input", "-x", help="Input as FILE (.npy or JSON) or NAME=FILE; repeatable.")
    ],
    identity: IdentityOpt = None,
    passphrase: PassphraseOpt = False,
    require_signer: Annotated[str | None, typer.Option("--require-signer", help="Required publisher key.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Save outputs to this .npz file.")] = None,
) -> None:
    """Run one inference of a sealed ONNX model, in memory, and print or save the outputs."""
    import numpy as np

    from .loaders import load_onnx

    session = load_onnx(
        path, identity=_identities(identity), passphrase=_passphrase(passphrase), require_signer=require_signer
    )
    meta = {i.name: i for i in session.get_inputs()}
    feed = {}
    for i, spec in enumerate(inputs):
        name, sep, file = spec.partition("=")
        if not sep:
            if i >= len(meta):
                raise ValueError(f"the model takes {len(meta)} input(s); name them as NAME=FILE")
            name, file = list(meta)[i], spec
        if name not in meta:
            raise ValueError(f"the model has no input {name!r} (inputs: {list(meta)})")
        feed[name] = _load_input(Path(file), _ORT_DTYPES.get(meta[name].type, "float32"))
    try:
        results = session.run(None, feed)
    except Exception as exc:  # ORT's pybind exceptions share no base class
        raise ValueError(f"inference failed: {str(exc).splitlines()[0][:300]}") from None
    names = [o.name for o in session.get_outputs()]
    if output is not None:
        np.savez(output, **dict(zip(names, results, strict=True)))
        err.print(f"saved {len(names)} output(s) to {output}")
        return
    for name, value in zip(names, results, strict=True):
        array = np.asarray(value)
        out.print(f"[bold]{name}[/] shape={list(array.shape)} dtype={array.dtype}")
        out.print(np.array2string(array, threshold=50, precision=5), highlight=False)


def _add_keyserver() -> None:
    # keyserver.cli imports only typer at module level; the server stack loads when a command runs.
    from .keyserver.cli import app as keyserver_app

    app.add_typer(keyserver_app, name="keyserver")


_add_keyserver()


def _add_keyserver_client() -> None:
    # keyserver_client imports only typer and the core library at module level; httpx loads when
    # a command talks to a server.
    from .keyserver_client import register

    register(app, _translate)


_add_keyserver_client()


def _add_ownership() -> None:
    # ownership_cli imports only typer at module level; numpy, torch and scipy load when a command runs.
    from .ownership_cli import register

    register(app, _translate)


_add_ownership()


def _add_gateway() -> None:
    # gateway.cli imports only typer at module level; the server stack loads when a command runs.
    from .gateway.cli import register

    register(app, _translate)


_add_gateway()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
