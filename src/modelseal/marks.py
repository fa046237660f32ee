"""Ownership marks in model files: owner, copyright and licence strings where tools show them.

A mark is a plain ``key: value`` string in the file's own metadata — ONNX ``metadata_props``,
the safetensors header's ``__metadata__`` — or in a sealed container's public (signed) metadata.
Marks are easy to strip: they are a notice and a first piece of evidence, not a watermark (a copy
that keeps them says where it came from; a copy without them proves nothing).

Keys follow the container's rule (``[a-z0-9][a-z0-9_.-]{0,63}``, at most 64 of them, values up to
8 KiB), so the same marks can travel from a file into the container that seals it. Writing goes
through a temporary file and a rename: a failed write leaves the original as it was.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ._private.format import MAX_METADATA_FIELDS, MAX_METADATA_VALUE, METADATA_KEY
from .errors import ModelLoadError

__all__ = ["read_marks", "write_marks"]

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".safetensors":
        return "safetensors"
    if ".mseal" in path.name:  # a container, or any shard of one
        return "mseal"
    raise ValueError(f"{path}: marks are read from .onnx, .safetensors and .mseal files")


def read_marks(path: str | os.PathLike[str]) -> dict[str, str]:
    """The marks in ``path`` (an ``.onnx``, ``.safetensors`` or ``.mseal`` file).

    Raises:
        ValueError: Another kind of file.
        ModelLoadError: The file is not what its name says.
    """
    path = Path(path)
    kind = _kind(path)
    if kind == "mseal":
        from .container import inspect

        return dict(inspect(path).metadata)
    if kind == "safetensors":
        with open(path, "rb") as fh:
            _, header = _safetensors_header(fh, path)
        marks = header.get("__metadata__") or {}
        return {str(k): str(v) for k, v in marks.items()}
    model = _load_onnx(path)
    return {p.key: p.value for p in model.metadata_props}


def write_marks(
    src: str | os.PathLike[str], marks: Mapping[str, str], dst: str | os.PathLike[str] | None = None
) -> Path:
    """Add or replace ``marks`` in a model file, keeping everything else; returns the written path.

    Args:
        src: An ``.onnx`` or ``.safetensors`` file.
        marks: Keys and values to set.
        dst: Where to write (default: ``src``, replaced atomically). An ONNX model with external
            data must stay in its folder, which its data references.

    Raises:
        ValueError: A key or value the container rules refuse, a container (its metadata is signed
            and set when sealing: ``modelseal seal --owner …``), or another kind of file.
        ModelLoadError: The file is not what its name says.
    """
    src = Path(src)
    out = Path(dst) if dst is not None else src
    _check(marks)
    kind = _kind(src)
    if kind == "mseal":
        raise ValueError("a container's metadata is signed when it is sealed: use `modelseal seal --owner …`")
    if kind != _kind(out):
        raise ValueError(f"{out}: write marks to a file of the same kind as {src}")
    if kind == "safetensors":
        with open(src, "rb") as fh:
            size, header = _safetensors_header(fh, src)
            merged = {**(header.get("__metadata__") or {}), **marks}
            _check(merged)
            header["__metadata__"] = merged
            text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
            fh.seek(8 + size)
            with _replacing(out) as tmp:
                tmp.write(len(text).to_bytes(8, "little") + text)
                shutil.copyfileobj(fh, tmp, 1 << 20)
        return out
    model = _load_onnx(src)
    external = any(
        t.data_location == 1  # TensorProto.EXTERNAL
        for t in model.graph.initializer
    )
    if external and out.resolve().parent != src.resolve().parent:
        raise ValueError("an ONNX model with external data must be marked in its own folder")
    current = {p.key: p.value for p in model.metadata_props}
    merged = {**current, **marks}
    _check(merged)
    del model.metadata_props[:]
    for key, value in merged.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    with _replacing(out) as tmp:
        tmp.write(model.SerializeToString())
    return out


def _check(marks: Mapping[str, str]) -> None:
    if len(marks) > MAX_METADATA_FIELDS:
        raise ValueError(f"at most {MAX_METADATA_FIELDS} marks")
    for key, value in marks.items():
        if not isinstance(key, str) or not METADATA_KEY.fullmatch(key):
            raise ValueError(f"mark key {key!r} must match {METADATA_KEY.pattern}")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            raise ValueError(f"mark {key!r} must be a string of at most {MAX_METADATA_VALUE} characters")


def _safetensors_header(fh: IO[bytes], path: Path) -> tuple[int, dict[str, Any]]:
    raw = fh.read(8)
    size = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if not 2 <= size <= _MAX_SAFETENSORS_HEADER:
        raise ModelLoadError(path.name, "not a safetensors file (bad header length)")
    try:
        header = json.loads(fh.read(size).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ModelLoadError(path.name, "not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise ModelLoadError(path.name, "not a safetensors file (header is not an object)")
    return size, header


def _load_onnx(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except OSError:
        raise
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors share no narrower base
        raise ModelLoadError(path.name, f"not an ONNX model: {exc}") from None


@contextmanager
def _replacing(out: Path) -> Iterator[IO[bytes]]:
    """A temporary file beside ``out`` that replaces it on success and disappears on failure."""
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            if out.exists():
                os.chmod(tmp, out.stat().st_mode & 0o7777)  # keep the file's permissions
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
