"""Open sealed models straight into their runtimes, with no plaintext byte on disk.

Every loader takes either a container path plus the same key arguments as
:func:`modelseal.open` (``identity``, ``passphrase``, ``require_signer``,
``keyserver``, ``licence``, ``grant_token``) or an already open
:class:`~modelseal.SealedModel`, and imports its framework only when called.

Where the runtime maps its input (``torch.load(mmap=True)``, safetensors'
``safe_open``), the file is decrypted into an anonymous, sealed in-memory file
(Linux ``memfd``) and the runtime uses those pages in place: no copy, nothing on
disk. ONNX Runtime uses the decrypted external-data buffers as its initializers'
storage; the decrypted graph itself (which it parses into its own structures) is
overwritten as soon as the session exists. See docs/loaders.md for what can and cannot be wiped.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import mmap
import pickle
import posixpath
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

from ._private.memfile import MemFile, memfd_supported
from .container import SealedModel, open_sealed
from .errors import ModelLoadError, UnsafeModelError
from .keys import Unwrapper, VerifyKey

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "SafetensorsFile",
    "load_onnx",
    "load_safetensors",
    "load_torch",
    "load_transformers",
    "open_safetensors",
]


class OpenKeys(TypedDict, total=False):
    """The key arguments of :func:`modelseal.open`, taken by every loader."""

    identity: Unwrapper | Sequence[Unwrapper] | None
    passphrase: str | bytes | None
    require_signer: VerifyKey | str | None
    keyserver: str | None
    licence: str | None
    grant_token: str | None


@contextlib.contextmanager
def _container(source: Any, keys: OpenKeys) -> Iterator[SealedModel]:
    if isinstance(source, SealedModel):
        if any(v is not None for v in keys.values()):
            raise TypeError("key arguments are for a container path, not an already open SealedModel")
        yield source
        return
    with open_sealed(source, **keys) as model:
        yield model


def _pick(model: SealedModel, entry: str | None, suffixes: tuple[str, ...], what: str) -> str:
    if entry is not None:
        if entry not in model.files:
            raise ModelLoadError(entry, f"no such file in the container (files: {model.files[:20]})")
        return entry
    found = [f for f in model.files if f.lower().endswith(suffixes)]
    if len(found) != 1:
        detail = f"found {found[:10]}" if found else f"no file ending in {'/'.join(suffixes)}"
        raise ModelLoadError(
            model.files[0] if len(model.files) == 1 else "<container>", f"expected one {what}: {detail}; pass entry="
        )
    return found[0]


def _wipe_bytes(data: bytes) -> None:
    """Overwrite an immutable ``bytes`` we created and alone hold (CPython; best effort)."""
    if sys.implementation.name == "cpython" and sys.getrefcount(data) <= 3 and data:
        address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
        if address:
            ctypes.memset(address, 0, len(data))


@contextlib.contextmanager
def _decrypted_file(model: SealedModel, entry: str) -> Iterator[MemFile]:
    """The entry decrypted into a sealed in-memory file."""
    mem = _fill(model, entry)
    try:
        yield mem
    finally:
        mem.close()


def _fill(model: SealedModel, entry: str) -> MemFile:
    mem = MemFile(entry.rsplit("/", 1)[-1])
    try:
        model._decrypt_to_fd(entry, mem.fd)
        mem.seal()
    except BaseException:
        mem.close()
        raise
    return mem


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__


# --- ONNX Runtime -----------------------------------------------------------------------


def _external_buffer(model: SealedModel, entry: str, np: Any) -> Any:
    """A read-only numpy view of ``entry`` decrypted: over a sealed in-memory file where there
    is one (filled with ``pwrite``, faster here than faulting in fresh heap pages), else a heap
    array."""
    size = model.size(entry)
    if not memfd_supported() or size == 0:
        buf = np.empty(size, dtype=np.uint8)
        model.read_into(entry, buf)
        return buf
    with _decrypted_file(model, entry) as mem:
        mapped = mmap.mmap(mem.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    populate = getattr(mmap, "MADV_POPULATE_READ", None)
    if populate is not None:
        with contextlib.suppress(OSError):
            mapped.madvise(populate)
    return np.frombuffer(mapped, dtype=np.uint8)


_ORT_USE_BUFFERS_DIRECTLY = "session.use_external_initializer_file_buffers_directly"
# Files beside a graph that are never ONNX external data (configs, tokenizers, docs).
_NOT_EXTERNAL_DATA = (".onnx", ".json", ".txt", ".md", ".model", ".py")


def load_onnx(
    source: Any,
    *,
    entry: str | None = None,
    sess_options: Any = None,
    providers: Sequence[Any] | None = None,
    provider_options: Sequence[dict[Any, Any]] | None = None,
    **keys: Unpack[OpenKeys],
) -> Any:
    """Create an ``onnxruntime.InferenceSession`` from a sealed ONNX model, in memory.

    Models with external data (the >2 GiB case) are supported: every external
    data file the graph references must be in the container, in the graph's
    folder. The folder's other files (configs, tokenizers and docs excepted) are
    decrypted into memory that ONNX Runtime uses as the initializers' storage,
    without a copy; the session keeps that memory alive. ``sess_options`` then
    holds references to it: do not reuse those options for another session.

    Args:
        source: Container path or an open :class:`~modelseal.SealedModel`.
        keys: The key arguments of :func:`modelseal.open` (``identity``, ``passphrase``,
            ``require_signer``, ``keyserver``, ``licence``, ``grant_token``); every loader takes them.
        entry: The ``.onnx`` file, if the container holds more than one.
        sess_options: ``onnxruntime.SessionOptions`` (external data is added to it).
        providers, provider_options: Passed to ``InferenceSession``.

    Raises:
        ModelLoadError: Not an ONNX model, a corrupt graph, missing external data.
        WrongKeyError, IntegrityError, SignatureError, FormatError: As for ``modelseal.open``.
    """
    import numpy as np
    import onnxruntime as ort

    with _container(source, keys) as model:
        path = _pick(model, entry, (".onnx",), "ONNX model")
        base = posixpath.dirname(path)
        graph = model.read(path)
        options = sess_options if sess_options is not None else ort.SessionOptions()
        buffers: list[Any] = []
        try:
            # Every other file in the graph's folder is offered as external data, under the
            # relative name the graph would use; ONNX Runtime copies only what it references.
            names, sizes = [], []
            for f in model.files:
                if posixpath.dirname(f) != base or f.lower().endswith(_NOT_EXTERNAL_DATA):
                    continue
                buf = _external_buffer(model, f, np)
                names.append(posixpath.relpath(f, base or "."))
                buffers.append(buf)
                sizes.append(buf.nbytes)
            if names:
                # ONNX Runtime uses these buffers as the initializers' storage instead of copying
                # them (ORT >= 1.22); the session keeps them alive. Prepacked weights still get
                # ORT's own packed copy, as when loading from a path.
                options.add_external_initializers_from_files_in_memory(names, buffers, sizes)
                options.add_session_config_entry(_ORT_USE_BUFFERS_DIRECTLY, "1")
            model_bytes = bytes(graph)
            try:
                session = ort.InferenceSession(
                    model_bytes, options, providers=providers, provider_options=provider_options
                )
            except Exception as exc:  # ORT raises pybind11 exception types without a common base
                for buf in buffers:  # heap buffers are ours to wipe; a memfd's pages go with its mapping
                    if buf.flags.writeable:
                        buf.fill(0)
                buffers.clear()
                message = _first_line(exc)
                if "external data" in message.lower():
                    message = f"external data missing or invalid: {message}"
                raise ModelLoadError(path, message) from None
            finally:
                _wipe_bytes(model_bytes)
                del model_bytes
            session._modelseal_buffers = buffers  # the initializers live here: as long as the session
            return session
        finally:
            graph[:] = bytes(len(graph))


# --- PyTorch ----------------------------------------------------------------------------


def load_torch(
    source: Any,
    *,
    entry: str | None = None,
    map_location: Any = "cpu",
    **keys: Unpack[OpenKeys],
) -> Any:
    """Load a sealed PyTorch checkpoint (a state dict) with ``torch.load(weights_only=True)``.

    A pickle that would construct anything but tensors and plain containers (and
    so could run code) is refused with :class:`~modelseal.UnsafeModelError`.
    On Linux the tensors are backed directly by the decrypted in-memory file.

    Raises:
        UnsafeModelError: The checkpoint's pickle is not weights-only.
        ModelLoadError: Not a PyTorch checkpoint.
    """
    import torch

    with _container(source, keys) as model:
        path = _pick(model, entry, (".pt", ".pth", ".bin", ".ckpt"), "PyTorch checkpoint")
        try:
            if memfd_supported():
                with _decrypted_file(model, path) as mem:
                    try:
                        return torch.load(mem.path, map_location=map_location, weights_only=True, mmap=True)
                    except RuntimeError as exc:
                        if "mmap" not in str(exc) and "zipfile" not in str(exc):
                            raise
                        # legacy (non-zip) checkpoints can't be mapped: read them from memory instead
                        with open(mem.path, "rb") as fh:
                            data = fh.read()
                        try:
                            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
                        finally:
                            _wipe_bytes(data)
            buffer = model.read(path)
            try:
                return torch.load(io.BytesIO(buffer), map_location=map_location, weights_only=True)
            finally:
                buffer[:] = bytes(len(buffer))
        except pickle.UnpicklingError as exc:
            detail = str(exc).partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
            reason = " ".join(detail.split()) or _first_line(exc)
            raise UnsafeModelError(path, f"pickle refused by torch's weights-only unpickler ({reason})") from None
        except Exception as exc:  # torch.load on untrusted bytes raises anything from KeyError to struct.error
            raise ModelLoadError(path, f"not a loadable PyTorch checkpoint: {_first_line(exc)}") from None


# --- safetensors ------------------------------------------------------------------------


class SafetensorsFile:
    """Lazy per-tensor access to a sealed safetensors file (a ``safe_open`` handle in memory)."""

    def __init__(self, mem: MemFile, entry: str, framework: str, device: str) -> None:
        from safetensors import safe_open

        self._mem = mem
        self.entry = entry
        self._handle: Any
        try:
            self._handle = safe_open(mem.path, framework=framework, device=device)
        except Exception as exc:  # SafetensorError derives from Exception only
            mem.close()
            raise ModelLoadError(entry, f"not a valid safetensors file: {_first_line(exc)}") from None

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def metadata(self) -> dict[str, str] | None:
        meta: dict[str, str] | None = self._handle.metadata()
        return meta

    def get_tensor(self, name: str) -> Any:
        return self._handle.get_tensor(name)

    def get_slice(self, name: str) -> Any:
        return self._handle.get_slice(name)

    def close(self) -> None:
        self._handle = None
        self._mem.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_safetensors(
    source: Any,
    *,
    entry: str | None = None,
    framework: str = "pt",
    device: str = "cpu",
    **keys: Unpack[OpenKeys],
) -> SafetensorsFile:
    """Open one sealed safetensors file for lazy per-tensor access (``framework``: ``pt`` or ``np``)."""
    with _container(source, keys) as model:
        path = _pick(model, entry, (".safetensors",), "safetensors file")
        return SafetensorsFile(_fill(model, path), path, framework, device)


def load_safetensors(
    source: Any,
    *,
    entry: str | None = None,
    framework: str = "pt",
    device: str = "cpu",
    **keys: Unpack[OpenKeys],
) -> dict[str, Any]:
    """Load every tensor of a sealed safetensors file, or of all shards in a sealed folder.

    With ``entry=None`` and several ``.safetensors`` files (a sharded checkpoint),
    the tensors of all of them are returned in one dict.
    """
    with _container(source, keys) as model:
        entries = [entry] if entry else [f for f in model.files if f.lower().endswith(".safetensors")]
        if not entries:
            raise ModelLoadError("<container>", "no .safetensors file in the container")
        tensors: dict[str, Any] = {}
        for path in entries:
            with open_safetensors(model, entry=path, framework=framework, device=device) as f:
                for name in f.keys():  # noqa: SIM118 - safetensors handle, not a dict
                    if name in tensors:
                        raise ModelLoadError(path, f"tensor {name!r} appears in more than one shard")
                    tensors[name] = f.get_tensor(name)
        return tensors


# --- Hugging Face transformers ----------------------------------------------------------


def _read_json(model: SealedModel, path: str) -> dict[str, Any]:
    try:
        value = json.loads(bytes(model.read(path)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(path, f"not valid JSON: {_first_line(exc)}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(path, "expected a JSON object")
    return value


def _tokenizer(model: SealedModel, base: str) -> Any:
    import transformers
    from tokenizers import Tokenizer

    def at(name: str) -> str:
        return posixpath.join(base, name) if base else name

    if at("tokenizer.json") not in model.files:
        return None
    try:
        backend = Tokenizer.from_str(bytes(model.read(at("tokenizer.json"))).decode("utf-8"))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise ModelLoadError(at("tokenizer.json"), f"not a valid tokenizer: {_first_line(exc)}") from None
    kwargs: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if at(name) in model.files:
            kwargs.update(_read_json(model, at(name)))
    for drop in ("tokenizer_class", "auto_map", "tokenizer_file", "name_or_path"):
        kwargs.pop(drop, None)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)  # type: ignore[no-untyped-call]


def load_transformers(
    source: Any,
    *,
    model_class: Any = None,
    subfolder: str = "",
    **keys: Unpack[OpenKeys],
) -> tuple[Any, Any]:
    """Open a sealed Hugging Face model folder into a ``transformers`` model and tokenizer.

    The folder needs ``config.json`` and ``*.safetensors`` (or ``pytorch_model.bin``)
    weights; ``tokenizer.json`` (with its config) gives the tokenizer, else None.
    The model is built without random initialisation and takes the decrypted
    tensors as its parameters directly (no copy). It is returned in eval mode.

    Args:
        model_class: A transformers auto class or model class (default ``AutoModel``).
        subfolder: Folder inside the container holding the model.

    Returns:
        ``(model, tokenizer)``.
    """
    import transformers
    from transformers.initialization import no_init_weights

    with _container(source, keys) as model:
        base = subfolder.strip("/")
        config_path = posixpath.join(base, "config.json") if base else "config.json"
        if config_path not in model.files:
            raise ModelLoadError(config_path, "a Hugging Face model folder needs config.json")
        config_dict = _read_json(model, config_path)
        try:
            config = transformers.AutoConfig.for_model(**config_dict)
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(config_path, f"unsupported model config: {_first_line(exc)}") from None
        in_base = [f for f in model.files if posixpath.dirname(f) == base]
        shards = [f for f in in_base if f.endswith(".safetensors")]
        if shards:
            state = load_safetensors(model, entry=None if len(shards) > 1 else shards[0])
        elif posixpath.join(base, "pytorch_model.bin").lstrip("/") in model.files:
            state = load_torch(model, entry=posixpath.join(base, "pytorch_model.bin").lstrip("/"))
        else:
            raise ModelLoadError(config_path, "no *.safetensors or pytorch_model.bin weights beside config.json")
        cls = model_class or transformers.AutoModel
        with no_init_weights():
            net = cls.from_config(config)
        prefix = getattr(net, "base_model_prefix", "")
        expected = set(net.state_dict())
        if prefix and not (expected & set(state)):
            stripped = {k.removeprefix(prefix + "."): v for k, v in state.items()}
            added = {f"{prefix}.{k}": v for k, v in state.items()}
            state = stripped if expected & set(stripped) else added
        result = net.load_state_dict(state, strict=False, assign=True)
        tied = getattr(net, "_tied_weights_keys", None) or ()
        missing = [k for k in result.missing_keys if k not in tied]
        if missing:
            raise ModelLoadError(config_path, f"weights missing for {missing[:5]} ({len(missing)} tensors)")
        net.tie_weights()
        net.eval()
        return net, _tokenizer(model, base)
