"""The spec's JSON Schemas agree with the parser on the committed vectors, plus review regressions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import modelseal
from modelseal import FormatError, Identity
from modelseal._private import format as fmt
from modelseal._private.encoding import loads_strict
from modelseal._private.io import Source

from .conftest import SMALL_CHUNK, read_all, tree

SPEC = Path(__file__).parent.parent / "docs" / "spec"
VECTORS = Path(__file__).parent / "vectors"
INDEX: list[dict[str, Any]] = json.loads((VECTORS / "index.json").read_text())
SCHEMAS = {
    name: json.loads((SPEC / f"{name}.schema.json").read_text()) for name in ("manifest", "stanzas", "signatures")
}


def _sections(path: Path) -> dict[str, Any]:
    with Source(path) as s:
        h = fmt.parse_header(s.read_at, s.size)
    return {"manifest": h.manifest, "stanzas": h.stanzas, "signatures": h.signatures}


@pytest.mark.parametrize("vector", [v for v in INDEX if "ok" in v["expect"]], ids=lambda v: v["name"])
def test_valid_vectors_match_the_schemas(vector: dict[str, Any]) -> None:
    for name, section in _sections(VECTORS / vector["files"][0]).items():
        jsonschema.validate(section, SCHEMAS[name])


def test_schemas_reject_what_the_parser_rejects_as_schema_errors() -> None:
    base = _sections(VECTORS / "valid-dir-signed.mseal")
    bad_manifests = [
        {**base["manifest"], "extra": 1},
        {**base["manifest"], "chunk_size": 6000},
        {**base["manifest"], "entries": [{"path": "../x", "size": 1}]},
        {**base["manifest"], "metadata": {"Owner": "x"}},
    ]
    for manifest in bad_manifests:
        with pytest.raises(FormatError):
            fmt.validate_manifest(manifest)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(manifest, SCHEMAS["manifest"])
    stanza = {"type": "scrypt", "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "log_n": 30, "body": "A" * 64}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([stanza], SCHEMAS["stanzas"])


def test_huge_json_integer_is_a_format_error() -> None:
    with pytest.raises(FormatError) as caught:
        loads_strict(b'{"size": ' + b"9" * 5000 + b"}", section="manifest")
    assert caught.value.rule == "json"


def test_key_strings_outside_the_alphabet_are_refused() -> None:
    r = str(Identity.generate().recipient)
    for bad in (r[:20] + "+" + r[21:], r[:20] + "/" + r[21:], r + "=", r[:20] + " " + r[20:]):
        with pytest.raises(ValueError):
            modelseal.X25519Recipient.parse(bad)


def test_rewrap_in_place_switching_shard_layout_leaves_no_stale_copy(
    tmp_path: Path, model_dir: Path, identity: Identity, other_identity: Identity
) -> None:
    dst = tmp_path / "m.mseal"
    modelseal.seal(model_dir, dst, recipients=[identity.recipient], chunk_size=SMALL_CHUNK)
    modelseal.rewrap(
        dst, identity=identity, add=[other_identity.recipient], remove=[identity.recipient], shard_size=5000
    )
    assert not dst.exists() and len(list(tmp_path.glob("m.mseal-shard*"))) > 1
    with pytest.raises(modelseal.WrongKeyError):  # the removed recipient finds no old copy to open
        read_all(dst, identity=identity)
    # back to one file: the shards go
    modelseal.rewrap(dst, dst, identity=other_identity, add=[identity.recipient])
    assert sorted(p.name for p in tmp_path.glob("m.mseal*")) == ["m.mseal"]
    assert read_all(dst, identity=identity) == tree(model_dir)
