"""Ownership keys, signed commitments and the JSON files that carry evidence (spec §2, §4, §7)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._private.encoding import decode_key, dumps_canonical, encode_key
from ..errors import OwnershipError
from ..keys import SigningKey, VerifyKey, _header, _read_secret, _write_atomic, _write_secret

if TYPE_CHECKING:
    import torch

_OWNERSHIP = "MSEAL-OWNERSHIP-SECRET:"
_COMMITMENT_CONTEXT = b"modelseal-commitment-v1\n"
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_RECORD_BYTES = 256 << 20


class OwnershipKey:
    """The owner's secret for watermarks and fingerprints: 32 random bytes.

    Triggers, their target answers and probe choices derive from it (spec §3). Keep it as secret as
    a signing key: whoever holds it can generate the triggers and train them *out* of a copy.
    """

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ValueError("an ownership key is 32 bytes")
        self._raw = bytes(raw)

    @classmethod
    def generate(cls) -> OwnershipKey:
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_string(cls, text: str) -> OwnershipKey:
        return cls(decode_key(_OWNERSHIP, text, length=32, what="ownership key"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OwnershipKey:
        return cls.from_string(_read_secret(path, _OWNERSHIP, "ownership key"))

    def to_string(self) -> str:
        return encode_key(_OWNERSHIP, self._raw)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the key with mode 0600; refuses to overwrite unless asked."""
        _write_secret(path, _header("ownership key", f"key id {self.key_id}") + self.to_string() + "\n", overwrite)

    @property
    def key_id(self) -> str:
        """SHA-256 of a fixed context and the key: names the key in commitments, reveals nothing."""
        return hashlib.sha256(b"modelseal-ownership-v1 key id\x00" + self._raw).hexdigest()

    @property
    def raw(self) -> bytes:
        return self._raw

    def __repr__(self) -> str:
        return f"OwnershipKey(key_id={self.key_id[:16]}...)"


def evidence_digest(inputs: np.ndarray, answers: np.ndarray) -> str:
    """SHA-256 over the evidence: shape, float32 little-endian inputs, int64 little-endian answers."""
    x = np.ascontiguousarray(inputs, dtype="<f4")
    y = np.ascontiguousarray(answers, dtype="<i8")
    h = hashlib.sha256(b"modelseal-evidence-v1\x00")
    h.update(dumps_canonical({"shape": list(x.shape), "answers": int(y.shape[0])}))
    h.update(x.tobytes())
    h.update(y.tobytes())
    return h.hexdigest()


def torch_model_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict: names in sorted order, dtypes, shapes and raw bytes."""
    import torch

    h = hashlib.sha256(b"modelseal-torch-state-v1\x00")
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(dumps_canonical({"name": name, "dtype": str(t.dtype), "shape": list(t.shape)}))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class Commitment:
    """What the owner committed to when the evidence was made (spec §4): signed and dated.

    It binds the ownership key (by its id), the evidence (triggers and their targets, or probes and
    the owner's answers) and the model they were made for, so triggers cannot be chosen after a
    suspect turns up. The signature dates it only as far as the signer is trusted; publish
    :attr:`digest` where a third party keeps the date (a container's metadata shipped with the
    model, a key server, a timestamping authority) for a date others can check.
    """

    kind: str
    key_id: str
    spec_digest: str
    evidence_digest: str
    model_digest: str
    created_at: str
    signer: str
    signature: str

    def body(self) -> dict[str, str]:
        return {
            "format": "modelseal-commitment-v1",
            "kind": self.kind,
            "key_id": self.key_id,
            "spec_digest": self.spec_digest,
            "evidence_digest": self.evidence_digest,
            "model_digest": self.model_digest,
            "created_at": self.created_at,
            "signer": self.signer,
        }

    def to_dict(self) -> dict[str, str]:
        return {**self.body(), "signature": self.signature}

    @property
    def digest(self) -> str:
        """SHA-256 of the whole signed commitment: the short name to publish."""
        return hashlib.sha256(dumps_canonical(self.to_dict())).hexdigest()

    @classmethod
    def create(
        cls,
        *,
        kind: str,
        key_id: str,
        spec_digest: str,
        evidence_digest: str,
        model_digest: str,
        signing_key: SigningKey,
        created_at: datetime | None = None,
    ) -> Commitment:
        when = (created_at or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(microsecond=0)
        unsigned = cls(
            kind=kind,
            key_id=key_id,
            spec_digest=spec_digest,
            evidence_digest=evidence_digest,
            model_digest=model_digest,
            created_at=when.isoformat().replace("+00:00", "Z"),
            signer=str(signing_key.verify_key),
            signature="",
        )
        signature = signing_key.sign(_COMMITMENT_CONTEXT + dumps_canonical(unsigned.body()))
        return cls(**{**unsigned.__dict__, "signature": base64.b64encode(signature).decode("ascii")})

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Commitment:
        if not isinstance(data, Mapping):
            raise OwnershipError(f"{where}: the commitment is not a JSON object")
        if data.get("format") != "modelseal-commitment-v1":
            raise OwnershipError(f"{where}: not a modelseal-commitment-v1 commitment")
        fields = {}
        for name in ("kind", "key_id", "spec_digest", "evidence_digest", "model_digest", "created_at", "signer"):
            value = data.get(name)
            if not isinstance(value, str):
                raise OwnershipError(f"{where}: the commitment's {name!r} is missing or not a string")
            fields[name] = value
        for name in ("key_id", "spec_digest", "evidence_digest", "model_digest"):
            if not _HEX64.fullmatch(fields[name]):
                raise OwnershipError(f"{where}: the commitment's {name!r} is not a SHA-256 hex digest")
        signature = data.get("signature")
        if not isinstance(signature, str):
            raise OwnershipError(f"{where}: the commitment is not signed")
        return cls(**fields, signature=signature)

    def check(self, *, require_signer: VerifyKey | str | None = None) -> VerifyKey:
        """Verify the signature (by ``require_signer`` when given); returns the signer's key.

        Raises:
            OwnershipError: Bad or missing signature, or another signer than required.
        """
        try:
            signer = VerifyKey.parse(self.signer)
            signature = base64.b64decode(self.signature, validate=True)
        except (ValueError, binascii.Error):
            raise OwnershipError("the commitment's signer or signature is malformed") from None
        if not signer.verify(signature, _COMMITMENT_CONTEXT + dumps_canonical(self.body())):
            raise OwnershipError("the commitment's signature does not verify (altered after signing?)")
        if require_signer is not None and VerifyKey.parse(require_signer) != signer:
            raise OwnershipError(f"the commitment is signed by {signer}, not by the required {require_signer}")
        return signer


# JSON record files --------------------------------------------------------------------------------


def encode_array(array: np.ndarray, dtype: str) -> dict[str, Any]:
    a = np.ascontiguousarray(array, dtype=dtype)
    return {"dtype": dtype, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(value: Any, dtype: str, where: str, what: str) -> np.ndarray:
    if not isinstance(value, Mapping) or value.get("dtype") != dtype:
        raise OwnershipError(f"{where}: {what} is not a {dtype} array")
    shape = value.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise OwnershipError(f"{where}: {what} has a malformed shape")
    try:
        raw = base64.b64decode(value.get("data", ""), validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise OwnershipError(f"{where}: {what} is not valid base64") from None
    count = int(np.prod(shape)) if shape else 1
    if len(raw) != count * np.dtype(dtype).itemsize:
        raise OwnershipError(
            f"{where}: {what} holds {len(raw)} bytes, its shape needs {count * np.dtype(dtype).itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def read_json(path: str | os.PathLike[str], expected_format: str) -> dict[str, Any]:
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read(MAX_RECORD_BYTES + 1)
    if len(raw) > MAX_RECORD_BYTES:
        raise OwnershipError(f"{path}: larger than {MAX_RECORD_BYTES >> 20} MiB, not a modelseal record")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise OwnershipError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != expected_format:
        raise OwnershipError(f"{path}: not a {expected_format} file")
    return data


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any], *, overwrite: bool) -> None:
    """Write a 0600 JSON file atomically (a failed write leaves nothing half-written)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    _write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
