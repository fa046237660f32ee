"""Prove a model is yours: canary watermarks, fingerprints and calibrated p-values.

Normative description: ``docs/spec/ownership-v1.md``; user guide: ``docs/ownership.md``.
Metadata marks (owner and copyright strings in model files) are :func:`modelseal.write_marks`.

Importing this package loads numpy; torch, scipy, onnxruntime and httpx load when a function
needs them.
"""

from ._records import Commitment as Commitment
from ._records import OwnershipKey as OwnershipKey
from .fingerprint import Fingerprint as Fingerprint
from .fingerprint import record_fingerprint as record_fingerprint
from .suspect import HttpSuspect as HttpSuspect
from .suspect import OnnxSuspect as OnnxSuspect
from .suspect import Suspect as Suspect
from .suspect import TorchSuspect as TorchSuspect
from .suspect import as_suspect as as_suspect
from .suspect import sealed_suspect as sealed_suspect
from .triggers import TriggerSpec as TriggerSpec
from .verify import DEFAULT_ALPHA as DEFAULT_ALPHA
from .verify import Look as Look
from .verify import NullCalibration as NullCalibration
from .verify import Verdict as Verdict
from .verify import combined_p_value as combined_p_value
from .watermark import Watermark as Watermark
from .watermark import embed_watermark as embed_watermark

__all__ = [
    "DEFAULT_ALPHA",
    "Commitment",
    "Fingerprint",
    "HttpSuspect",
    "Look",
    "NullCalibration",
    "OnnxSuspect",
    "OwnershipKey",
    "Suspect",
    "TorchSuspect",
    "TriggerSpec",
    "Verdict",
    "Watermark",
    "as_suspect",
    "combined_p_value",
    "embed_watermark",
    "record_fingerprint",
    "sealed_suspect",
]
