"""The errors modelseal raises.

Every error derives from :class:`ModelSealError`. Authentication failures of any
kind (a flipped bit, a truncated payload, a swapped header, a chunk from another
container) raise the single opaque :class:`IntegrityError`, so a caller learns
nothing about *where* a container was tampered with. Malformed input that can be
rejected before any cryptography runs raises :class:`FormatError`, naming the
rule of ``docs/spec/container-v1.md`` it breaks. Caller misuse (a wrong argument
type, an impossible option) raises plain :class:`ValueError` / :class:`TypeError`.

Each class carries the CLI exit code it maps to, so the mapping lives in one place.
"""

from __future__ import annotations

__all__ = [
    "FormatError",
    "IntegrityError",
    "ModelLoadError",
    "ModelSealError",
    "OwnershipError",
    "SignatureError",
    "SuspectError",
    "UnsafeModelError",
    "WrongKeyError",
]


class ModelSealError(Exception):
    """Root of every error raised by modelseal."""

    exit_code: int = 1


class FormatError(ModelSealError):
    """The input is not a well-formed container; ``rule`` names the broken spec rule."""

    exit_code = 3

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{message} [rule: {rule}]")
        self.rule = rule
        self.detail = message


class IntegrityError(ModelSealError):
    """Authentication failed: the container was modified, truncated, extended or spliced.

    Deliberately opaque: the message never says which check failed.
    """

    exit_code = 4

    def __init__(self, message: str = "container failed authentication (tampered or corrupt)") -> None:
        super().__init__(message)


class SignatureError(IntegrityError):
    """The container carries no valid signature by the required publisher key."""

    exit_code = 5


class WrongKeyError(ModelSealError):
    """None of the given identities or passphrases opens this container."""

    exit_code = 6

    def __init__(self, message: str = "no given identity or passphrase opens this container") -> None:
        super().__init__(message)


class ModelLoadError(ModelSealError):
    """An authentic file from a container could not be loaded by its runtime.

    ``entry`` names the file; the message says why (not the claimed format, a
    corrupt graph, missing external data, ...).
    """

    exit_code = 8

    def __init__(self, entry: str, reason: str) -> None:
        super().__init__(f"cannot load {entry!r}: {reason}")
        self.entry = entry
        self.reason = reason


class UnsafeModelError(ModelLoadError):
    """The file would run code when loaded (a pickle with more than tensors): refused."""

    exit_code = 9


class OwnershipError(ModelSealError):
    """Ownership evidence cannot be checked as given: a watermark key that does not match its
    commitment, a commitment whose signature fails, a calibration made for other evidence."""

    exit_code = 12


class SuspectError(ModelSealError):
    """A suspect model could not be queried: an endpoint that errors, times out or answers in a
    shape the mapping does not describe, or a query budget that is spent.

    Verification turns this into an *inconclusive* verdict with the reason, never "not shown".
    """

    exit_code = 13
