"""FileSink: large outputs stream with O_DIRECT where the file system allows, byte-identical either way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelseal._private import sink as sink_module
from modelseal._private.sink import FileSink


@pytest.mark.parametrize("direct", ["1", "0"])
@pytest.mark.parametrize("size", [0, 100, (8 << 20) + 12345, 12 << 20])
def test_sink_writes_exactly_what_it_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: str, size: int
) -> None:
    monkeypatch.setenv("MODELSEAL_DIRECT_IO", direct)
    data = os.urandom(size)
    sink = FileSink(tmp_path / "out", size_hint=size)
    assert sink._direct == (direct == "1" and size >= 8 << 20 and bool(sink_module._DIRECT))
    pieces = [data[i : i + 1_000_003] for i in range(0, size, 1_000_003)]  # odd sizes, unaligned
    for piece in pieces:
        sink.write(piece)
    sink.close()
    assert (tmp_path / "out").read_bytes() == data


def test_sink_refuses_to_overwrite_and_abort_drops_the_tail(tmp_path: Path) -> None:
    (tmp_path / "exists").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        FileSink(tmp_path / "exists")
    sink = FileSink(tmp_path / "partial", size_hint=10)
    sink.write(b"staged but never flushed")
    sink.abort()
    assert (tmp_path / "partial").read_bytes() == b""
