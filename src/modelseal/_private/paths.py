"""Entry path rules (spec section "Entry paths").

An entry path is where a file lands when a container is unpacked, so it must be
safe on every platform: relative, '/'-separated, NFC, no '.'/'..'/empty parts,
no characters or names that Windows or macOS treat specially, and no two paths
that a case-insensitive or normalising file system would merge.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from ..errors import FormatError

MAX_PATH_BYTES = 1024
MAX_COMPONENT_BYTES = 255
_FORBIDDEN_CHARS = frozenset('\\:*?"<>|')
_WINDOWS_RESERVED = frozenset(
    ["con", "prn", "aux", "nul", "conin$", "conout$"]
    + [f"{dev}{i}" for dev in ("com", "lpt") for i in [*range(10), "\u00b9", "\u00b2", "\u00b3"]]
)


def check_entry_path(path: object) -> str:
    """Return ``path`` if it is a valid entry path, else raise FormatError('entry-path')."""
    if not isinstance(path, str) or not path:
        raise FormatError("entry-path", "entry path must be a non-empty string")

    def bad(why: str) -> FormatError:
        return FormatError("entry-path", f"unsafe entry path {path!r}: {why}")

    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise bad(f"longer than {MAX_PATH_BYTES} bytes")
    if unicodedata.normalize("NFC", path) != path:
        raise bad("not in Unicode NFC form")
    if path.startswith("/"):
        raise bad("absolute")
    for ch in path:
        code = ord(ch)
        if code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF:
            raise bad("control or surrogate character")
        if ch in _FORBIDDEN_CHARS:
            raise bad(f"character {ch!r} is not portable")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise bad("empty, '.' or '..' component")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise bad(f"component longer than {MAX_COMPONENT_BYTES} bytes")
        if part[-1] in ". ":
            raise bad("component ends with '.' or ' '")
        if part.split(".", 1)[0].lower() in _WINDOWS_RESERVED:
            raise bad("reserved device name on Windows")
    return path


def _fold(path: str) -> str:
    return unicodedata.normalize("NFC", unicodedata.normalize("NFKD", path).casefold())


def check_entry_set(paths: Iterable[str]) -> None:
    """Reject duplicates, case/normalisation collisions and file-vs-directory clashes."""
    seen: dict[str, str] = {}
    for path in paths:
        folded = _fold(path)
        if folded in seen:
            raise FormatError(
                "entry-collision",
                f"entry paths {seen[folded]!r} and {path!r} collide (duplicate, case or normalisation)",
            )
        seen[folded] = path
    for folded, path in seen.items():
        parts = folded.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in seen:
                raise FormatError(
                    "entry-collision", f"entry {seen[prefix]!r} is both a file and a directory of {path!r}"
                )
