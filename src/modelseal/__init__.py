"""modelseal: ship models people can run but not copy, and prove they are yours.

The public API is what this module exports; everything under ``modelseal._private``
may change without notice. ``import modelseal`` stays light: no numpy, torch,
onnxruntime or web framework is imported until a feature that needs it is used.
"""

import os as _os

# ONNX Runtime 1.2x+ on Linux records process and error events in a local database under
# ~/.cache/Microsoft/DeveloperTools unless told not to; it reads this once, when it loads.
# A library whose point is to keep model details off disk turns it off unless the user chose.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from .container import ContainerInfo as ContainerInfo
from .container import EntryInfo as EntryInfo
from .container import SealedModel as SealedModel
from .container import inspect as inspect
from .container import open_sealed as open_sealed
from .container import rewrap as rewrap
from .container import seal as seal
from .container import verify as verify
from .errors import FormatError as FormatError
from .errors import IntegrityError as IntegrityError
from .errors import ModelLoadError as ModelLoadError
from .errors import ModelSealError as ModelSealError
from .errors import SignatureError as SignatureError
from .errors import UnsafeModelError as UnsafeModelError
from .errors import WrongKeyError as WrongKeyError
from .keys import Identity as Identity
from .keys import PassphraseRecipient as PassphraseRecipient
from .keys import Recipient as Recipient
from .keys import SigningKey as SigningKey
from .keys import Unwrapper as Unwrapper
from .keys import VerifyKey as VerifyKey
from .keys import X25519Recipient as X25519Recipient
from .loaders import load_onnx as load_onnx
from .loaders import load_safetensors as load_safetensors
from .loaders import load_torch as load_torch
from .loaders import load_transformers as load_transformers
from .loaders import open_safetensors as open_safetensors
from .marks import read_marks as read_marks
from .marks import write_marks as write_marks

open = open_sealed  # noqa: A001 - ``modelseal.open`` is the documented name

__version__ = "0.1.0"

_KEYSERVER_NAMES = ("KeyServer", "KeyServerRecipient", "KeyServerUnreachable", "KeyServerUnwrapper", "LicenceError")


def __getattr__(name: str) -> object:
    # The key server client loads on first use (it is light, but most users never need it).
    if name in _KEYSERVER_NAMES:
        from .keyserver import client

        return getattr(client, name)
    raise AttributeError(f"module 'modelseal' has no attribute {name!r}")


__all__ = [
    "ContainerInfo",
    "EntryInfo",
    "FormatError",
    "Identity",
    "IntegrityError",
    "KeyServer",
    "KeyServerRecipient",
    "KeyServerUnreachable",
    "KeyServerUnwrapper",
    "LicenceError",
    "ModelLoadError",
    "ModelSealError",
    "PassphraseRecipient",
    "Recipient",
    "SealedModel",
    "SignatureError",
    "SigningKey",
    "UnsafeModelError",
    "Unwrapper",
    "VerifyKey",
    "WrongKeyError",
    "X25519Recipient",
    "inspect",
    "load_onnx",
    "load_safetensors",
    "load_torch",
    "load_transformers",
    "open",
    "open_safetensors",
    "open_sealed",
    "read_marks",
    "rewrap",
    "seal",
    "verify",
    "write_marks",
]
