from __future__ import annotations

import pytest

from modelseal import FormatError
from modelseal._private.paths import check_entry_path, check_entry_set


@pytest.mark.parametrize(
    "path",
    ["model.onnx", "model.onnx.data", "tokenizer/vocab.txt", "group1-shard1of4", "a/b/c/d.bin", "données.bin"],
)
def test_valid_paths(path: str) -> None:
    assert check_entry_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", "./a", "..", "C:\\x", "c:x", "a\\b",
        "a\x00b", "a\nb", "CON", "nul.txt", "a/com1.bin", "trailing.", "trailing ", "x" * 256, "/".join(["a"] * 600),
        "e\u0301.bin",  # NFD: not normalised
    ],
)  # fmt: skip
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(FormatError) as caught:
        check_entry_path(path)
    assert caught.value.rule == "entry-path"


@pytest.mark.parametrize(
    "paths",
    [["a.bin", "a.bin"], ["Model.bin", "model.bin"], ["STRASSE", "straße"], ["a", "a/b"], ["x/y", "X/y/z"]],
)
def test_colliding_sets_are_refused(paths: list[str]) -> None:
    with pytest.raises(FormatError) as caught:
        check_entry_set(paths)
    assert caught.value.rule == "entry-collision"


def test_distinct_set_is_accepted() -> None:
    check_entry_set(["a/b", "a/c", "ab", "b/a"])
