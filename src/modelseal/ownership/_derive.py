"""Deterministic, key-derived randomness (docs/spec/ownership-v1.md §3).

Triggers, targets and probe choices must come out bit-identical from the same key on any machine
and with any numpy version, years after embedding. numpy's generators do not promise that, so the
bytes come from ChaCha20 keystreams (``cryptography``) under HKDF-SHA256 subkeys, one per label,
and the conversions to numbers below are fixed by the spec.
"""

from __future__ import annotations

import math

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SALT = b"modelseal-ownership-v1"


def subkey(key: bytes, label: str) -> bytes:
    """HKDF-SHA256(key, salt=SALT, info=label) -> 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=SALT, info=label.encode("utf-8")).derive(key)


def keystream(key: bytes, label: str, nbytes: int) -> bytes:
    """The first ``nbytes`` of ChaCha20(subkey(key, label), counter 0, nonce 0).

    A longer request returns a longer stream with the same prefix, which the rejection sampler
    below relies on.
    """
    encryptor = Cipher(algorithms.ChaCha20(subkey(key, label), bytes(16)), mode=None).encryptor()
    return encryptor.update(bytes(nbytes))


def uniforms(key: bytes, label: str, n: int) -> np.ndarray:
    """``n`` float64 in [0, 1): each from 8 little-endian bytes, top 53 bits, times 2**-53."""
    words = np.frombuffer(keystream(key, label, 8 * n), dtype="<u8")
    return (words >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def centred(key: bytes, label: str, n: int) -> np.ndarray:
    """``n`` float64 with mean 0 and variance 1: (u1 + u2 + u3 + u4 - 2) * sqrt(3) over groups of four
    uniforms (Irwin-Hall). Only additions, one multiplication and a correctly rounded square root,
    so every IEEE 754 machine gets the same bits; a Box-Muller normal would depend on the platform's
    log and cos."""
    u = uniforms(key, label, 4 * n).reshape(n, 4)
    z: np.ndarray = (((u[:, 0] + u[:, 1]) + (u[:, 2] + u[:, 3])) - 2.0) * math.sqrt(3.0)
    return z


def integers(key: bytes, label: str, n: int, k: int) -> np.ndarray:
    """``n`` int64 uniform on [0, k) by rejection: little-endian uint32 words v < 2**32 - (2**32 mod k),
    taken in stream order, each giving v mod k (no modulo bias)."""
    if not 1 <= k <= 2**31:
        raise ValueError(f"k must be in [1, 2**31], not {k}")
    limit = 2**32 - (2**32 % k)
    words_wanted = n + n // 4 + 16
    while True:
        words = np.frombuffer(keystream(key, label, 4 * words_wanted), dtype="<u4").astype(np.int64)
        accepted = words[words < limit]
        if len(accepted) >= n:
            result: np.ndarray = accepted[:n] % k
            return result
        words_wanted *= 2


def permutation(key: bytes, label: str, n: int) -> np.ndarray:
    """A permutation of range(n): indices ordered by ``uniforms(key, label, n)`` (stable sort)."""
    return np.argsort(uniforms(key, label, n), kind="stable")


def sample(key: bytes, label: str, n: int, population: int) -> np.ndarray:
    """``n`` distinct indices of range(population) (n <= population), in permutation order."""
    if n > population:
        raise ValueError(f"cannot take {n} distinct items from {population}")
    return permutation(key, label, population)[:n]
