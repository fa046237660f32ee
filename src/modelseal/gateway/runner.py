"""The served model (docs/spec/gateway-v1.md §1): opened in memory through the loaders, and wrapped
so the rest of the gateway sees one thing — rows in, an (n, K) array of class probabilities out.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from ..keys import Identity, Unwrapper
from .errors import ConfigError, ModelRejectedInput
from .settings import ModelSection, passphrase_from_env

_ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class Runner(ABC):
    """A model with one input: ``row_shape`` per row (None for a free dimension) and ``dtype``."""

    row_shape: tuple[int | None, ...]
    dtype: np.dtype[Any]
    num_classes: int
    name: str

    def __init__(self, scores: str) -> None:
        self._scores = scores

    @abstractmethod
    def _raw(self, x: np.ndarray) -> np.ndarray: ...

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """(n, K) float64 probabilities for ``x``.

        Raises:
            ModelRejectedInput: the runtime refused an input that passed the gateway's checks.
        """
        try:
            out = np.asarray(self._raw(x), dtype=np.float64)
        except ModelRejectedInput:
            raise
        except Exception as exc:  # the runtime's own errors are untyped
            raise ModelRejectedInput(f"the model refused the input: {_first_line(exc)}") from None
        out = out.reshape(len(x), -1)
        if out.shape[1] != self.num_classes:
            raise ModelRejectedInput(f"the model answered {out.shape[1]} scores per row, expected {self.num_classes}")
        # "auto": probabilities are non-negative rows summing to 1 (np.allclose's test at atol 1e-3,
        # written out: it costs more than the model on a one-row request)
        if self._scores == "logits" or (
            self._scores == "auto"
            and out.size
            and not (out.min() >= 0 and float(np.abs(out.sum(axis=1) - 1.0).max()) <= 1e-3 + 1e-5)
        ):
            out = out - out.max(axis=1, keepdims=True)  # a new array: the runtime's may be read-only
            np.exp(out, out=out)
            out /= out.sum(axis=1, keepdims=True)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": [None, *self.row_shape],
            "dtype": str(self.dtype),
            "num_classes": self.num_classes,
        }


class OnnxRunner(Runner):
    def __init__(self, session: Any, *, name: str, scores: str = "auto") -> None:
        super().__init__(scores)
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(f"model: the gateway serves models with one input; this one has {len(inputs)}")
        inp = inputs[0]
        if inp.type not in _ONNX_DTYPES:
            raise ConfigError(f"model: input type {inp.type} is not supported")
        self._session, self._input = session, inp.name
        self.dtype = np.dtype(_ONNX_DTYPES[inp.type])
        self.row_shape = tuple(d if isinstance(d, int) and d > 0 else None for d in inp.shape[1:])
        self.name = name
        out_shape = session.get_outputs()[0].shape
        last = out_shape[-1] if out_shape else None
        if isinstance(last, int) and last > 1:
            self.num_classes = last
        else:  # a free output dimension: ask the model once
            probe = np.zeros((1, *[d or 1 for d in self.row_shape]), dtype=self.dtype)
            self.num_classes = int(np.asarray(self._raw(probe)).reshape(1, -1).shape[1])
        if self.num_classes < 2:
            raise ConfigError("model: the gateway serves classifiers with at least two classes")

    def _raw(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._session.run(None, {self._input: x})[0]
        return out


class TorchRunner(Runner):
    def __init__(self, module: Any, *, row_shape: tuple[int, ...], name: str, scores: str = "auto") -> None:
        super().__init__(scores)
        import torch

        self._torch, self._module = torch, module.eval()
        self.row_shape, self.dtype, self.name = tuple(row_shape), np.dtype(np.float32), name
        with torch.inference_mode():
            probe = module(torch.zeros((1, *row_shape)))
        self.num_classes = int(probe.reshape(1, -1).shape[1])
        if self.num_classes < 2:
            raise ConfigError("model: the gateway serves classifiers with at least two classes")

    def _raw(self, x: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            out: np.ndarray = self._module(self._torch.from_numpy(x)).numpy()
        return out


def _unwrappers(model: ModelSection) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    identities: list[Unwrapper] = []
    if model.identity is not None:
        try:
            identities.append(Identity.load(model.identity))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.identity: cannot read {model.identity}: {exc}") from None
    keys["identity"] = identities or None
    keys["passphrase"] = passphrase_from_env(model)
    if model.keyserver is not None:
        keys["keyserver"], keys["licence"] = model.keyserver, model.licence
    return keys


def import_factory(spec: str) -> Callable[[], Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"model.arch: expected module:factory, got {spec!r}")
    try:
        factory: Callable[[], Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model.arch: cannot import {spec}: {exc}") from None
    return factory


def open_runner(model: ModelSection) -> Runner:
    """Open the sealed model of ``model`` in memory (never a plaintext byte on disk).

    Raises:
        ConfigError: the settings do not describe a model the gateway can serve.
        ModelSealError: the container cannot be opened (wrong key, tampered file, ...).
    """
    from .. import loaders

    keys = _unwrappers(model)
    name = model.path.name
    if model.runtime == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if model.intra_op_threads is not None:
            options.intra_op_num_threads = model.intra_op_threads
        if not model.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = loaders.load_onnx(model.path, entry=model.entry, sess_options=options, **keys)
        return OnnxRunner(session, name=name, scores=model.scores)
    if model.arch is None or model.input_shape is None:
        raise ConfigError("model: the torch runtime needs model.arch (module:factory) and model.input_shape")
    module = import_factory(model.arch)()
    state = loaders.load_torch(model.path, entry=model.entry, **keys)
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ConfigError(f"model: the weights do not fit model.arch {model.arch}: {_first_line(exc)}") from None
    return TorchRunner(module, row_shape=tuple(model.input_shape), name=name, scores=model.scores)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:300] + ("..." if len(line) > 300 else "")
