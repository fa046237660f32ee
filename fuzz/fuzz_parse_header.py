"""atheris fuzz target: the container header parser.

Any input must either parse or raise FormatError; any other exception (an
IndexError, a struct.error, a read past the end, a RecursionError...) is a bug.

    python fuzz/fuzz_parse_header.py -max_total_time=60 CORPUS_DIR

Seed the corpus with tests/vectors/*.mseal* (``make fuzz`` does).
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from modelseal._private import format as fmt
    from modelseal.errors import FormatError


def _read_at(data: bytes, size: int):  # type: ignore[no-untyped-def]
    def read_at(offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > size:
            raise AssertionError(f"parser read [{offset}, {offset + n}) outside a {size}-byte input")
        return data[offset : offset + n]

    return read_at


def test_one_input(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        fmt.parse_header(_read_at(data, len(data)), len(data))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
