"""Generate the container test vectors under tests/vectors/.

Every vector is produced through the deterministic seam ``modelseal.container._seal``
(injected randomness and clock), so the files are exact. ``index.json`` lists each
vector with the keys to open it and what opening must do: succeed with given
plaintext digests, or raise a named error (and, for FormatError, a named rule).

    python tests/vectors/generate.py            # check the committed files still match
    python tests/vectors/generate.py --regenerate

A difference in check mode means the format changed: that needs a new format
version, not new vectors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from modelseal import Identity, SigningKey
from modelseal._private import format as fmt
from modelseal._private.encoding import dumps_canonical
from modelseal.container import _seal

HERE = Path(__file__).resolve().parent
NOW = 1_790_000_000  # 2026-09-21T14:13:20Z

# Fixed keys. Test-only: never use these for anything real.
IDENTITY = Identity(X25519PrivateKey.from_private_bytes(bytes(range(1, 33))))
OTHER_IDENTITY = Identity(X25519PrivateKey.from_private_bytes(bytes(range(33, 65))))
SIGNER = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes(range(65, 97))))
OTHER_SIGNER = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes(range(97, 129))))
PASSPHRASE = "correct horse battery staple"


def drbg(seed: str) -> Callable[[int], bytes]:
    """Deterministic 'random' bytes: SHA-256 in counter mode over a seed (tests only)."""
    state = {"counter": 0}

    def random_bytes(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(f"{seed}/{state['counter']}".encode()).digest()
            state["counter"] += 1
        return out[:n]

    return random_bytes


def _model_dir(root: Path) -> Path:
    d = root / "model"
    (d / "tokenizer").mkdir(parents=True)
    (d / "config.json").write_text('{"hidden_size": 8}\n')
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 40)  # 10240 bytes: 3 chunks of 4 KiB
    (d / "tokenizer" / "vocab.txt").write_bytes(b"")  # empty entry: one empty chunk
    return d


def _seal_vector(name: str, src: Path, out: Path, **kw: Any) -> list[Path]:
    dst = out / f"{name}.mseal"
    options: dict[str, Any] = {
        "recipients": [IDENTITY.recipient],
        "passphrase": None,
        "signer": None,
        "metadata": None,
        "model_format": None,
        "chunk_size": 4096,
        "shard_size": None,
        "scrypt_log_n": 10,
        "progress": None,
    }
    options.update(kw)
    info = _seal(src, dst, random_bytes=drbg(name), now=NOW, **options)
    return list(info.paths)


def _sections(data: bytes) -> fmt.Header:
    return fmt.parse_header(lambda o, n: data[o : o + n], len(data))


def _replace(data: bytes, *, manifest: bytes | None = None, stanzas: bytes | None = None) -> bytes:
    """Swap a JSON section and keep every other byte (MACs included) as it was."""
    h = _sections(data)
    pre = fmt.build_preamble(manifest or h.manifest_bytes, stanzas or h.stanzas_bytes)
    return pre + data[len(h.signed_prefix) :]


def _edit_manifest(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    m = json.loads(_sections(data).manifest_bytes)
    edit(m)
    return _replace(data, manifest=dumps_canonical(m))


def _edit_stanzas(data: bytes, edit: Callable[[list[dict[str, Any]]], None]) -> bytes:
    s = json.loads(_sections(data).stanzas_bytes)
    edit(s)
    return _replace(data, stanzas=dumps_canonical(s))


def _chunk_span(data: bytes, chunk: int) -> slice:
    h = _sections(data)
    e = h.entries[1]  # model.safetensors: three chunks of 4 KiB
    start = e.chunk_offset(chunk, h.chunk_size)
    return slice(start, start + h.chunk_size + fmt.TAG_LEN)


def _swap_chunks(data: bytes, a: int, b: int) -> bytes:
    buf = bytearray(data)
    sa, sb = _chunk_span(data, a), _chunk_span(data, b)
    buf[sa], buf[sb] = data[sb], data[sa]
    return bytes(buf)


def _put_chunk(data: bytes, chunk: int, source: bytes, source_chunk: int) -> bytes:
    buf = bytearray(data)
    buf[_chunk_span(data, chunk)] = source[_chunk_span(source, source_chunk)]
    return bytes(buf)


def build(out: Path) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp())
    try:
        return _build(out, work)
    finally:
        shutil.rmtree(work)


def _digests(src: Path) -> dict[str, str]:
    if src.is_file():
        return {src.name: hashlib.sha256(src.read_bytes()).hexdigest()}
    return {
        p.relative_to(src).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in src.rglob("*") if p.is_file()
    }


def _build(out: Path, work: Path) -> list[dict[str, Any]]:
    hello = work / "hello.txt"
    hello.write_bytes(b"hello, modelseal\n")
    model = _model_dir(work)
    ident = {"identity": IDENTITY.to_string()}
    vectors: list[dict[str, Any]] = []

    def ok(name: str, paths: list[Path], src: Path, **open_kw: Any) -> None:
        vectors.append(
            {"name": name, "files": [p.name for p in paths], "open": open_kw or ident, "expect": {"ok": _digests(src)}}
        )

    def bad(name: str, data: bytes, error: str, rule: str | None = None, **open_kw: Any) -> None:
        path = out / f"{name}.mseal"
        path.write_bytes(data)
        expect: dict[str, Any] = {"error": error}
        if rule:
            expect["rule"] = rule
        vectors.append({"name": name, "files": [path.name], "open": open_kw or ident, "expect": expect})

    ok("valid-single", _seal_vector("valid-single", hello, out), hello)
    signed_meta = {"owner": "Example Corp", "copyright": "(c) 2026 Example Corp", "license": "test vectors only"}
    ok(
        "valid-dir-signed",
        _seal_vector("valid-dir-signed", model, out, signer=SIGNER, metadata=signed_meta),
        model,
        identity=IDENTITY.to_string(),
        require_signer=str(SIGNER.verify_key),
    )
    ok(
        "valid-passphrase",
        _seal_vector("valid-passphrase", hello, out, recipients=[], passphrase=PASSPHRASE),
        hello,
        passphrase=PASSPHRASE,
    )
    two = _seal_vector("valid-two-recipients", model, out, recipients=[OTHER_IDENTITY.recipient, IDENTITY.recipient])
    ok("valid-two-recipients", two, model)
    ok("valid-sharded", _seal_vector("valid-sharded", model, out, shard_size=4096), model)

    base = (out / "valid-dir-signed.mseal").read_bytes()
    single = (out / "valid-single.mseal").read_bytes()
    h = _sections(base)

    # structural rules (FormatError, before any key is used)
    bad("bad-magic", b"\x89MSEAX\r\n" + base[8:], "FormatError", "magic")
    bad("bad-version", base[:8] + b"\x00\x02" + base[10:], "FormatError", "version")
    bad("bad-flags", base[:10] + b"\x00\x01" + base[12:], "FormatError", "flags")
    bad(
        "bad-manifest-length",
        base[:12] + struct.pack(">I", fmt.MAX_MANIFEST_LEN + 1) + base[16:],
        "FormatError",
        "section-size",
    )
    bad("truncated-header", base[:40], "FormatError", "truncated")
    bad("truncated-payload", base[: h.table_offset - 5], "FormatError", "truncated")
    bad("truncated-trailer", base[:-1], "FormatError", "truncated")
    bad("trailing-data", base + b"\x00", "FormatError", "trailing-data")
    bad(
        "manifest-duplicate-key",
        _replace(base, manifest=h.manifest_bytes[:-1] + b',"version":1}'),
        "FormatError",
        "json",
    )
    bad(
        "manifest-float",
        _replace(base, manifest=h.manifest_bytes.replace(b'"version":1', b'"version":1.0')),
        "FormatError",
        "json",
    )
    bad("manifest-unknown-field", _edit_manifest(base, lambda m: m.update(extra=1)), "FormatError", "schema")
    bad("manifest-bad-base64", _edit_manifest(base, lambda m: m.update(salt="not*base64")), "FormatError", "base64")
    bad(
        "chunk-size-not-power-of-two",
        _edit_manifest(base, lambda m: m.update(chunk_size=6000)),
        "FormatError",
        "chunk-size",
    )
    bad(
        "entry-path-traversal",
        _edit_manifest(base, lambda m: m["entries"][0].update(path="../config.json")),
        "FormatError",
        "entry-path",
    )
    bad(
        "entry-path-absolute",
        _edit_manifest(base, lambda m: m["entries"][0].update(path="/etc/passwd")),
        "FormatError",
        "entry-path",
    )
    bad(
        "entry-case-collision",
        _edit_manifest(base, lambda m: m["entries"][0].update(path="MODEL.safetensors")),
        "FormatError",
        "entry-collision",
    )
    bad(
        "entry-too-large",
        _edit_manifest(base, lambda m: m["entries"][0].update(size=fmt.MAX_ENTRY_SIZE + 1)),
        "FormatError",
        "limits",
    )
    bad(
        "two-passphrase-stanzas",
        _edit_stanzas((out / "valid-passphrase.mseal").read_bytes(), lambda s: s.append(dict(s[0]))),
        "FormatError",
        "recipients",
        passphrase=PASSPHRASE,
    )
    bad(
        "scrypt-work-factor-too-high",
        _edit_stanzas((out / "valid-passphrase.mseal").read_bytes(), lambda s: s[0].update(log_n=30)),
        "FormatError",
        "scrypt-work-factor",
        passphrase=PASSPHRASE,
    )
    bad("no-stanzas", _replace(base, stanzas=b"[]"), "FormatError", "recipients")

    # authentication (IntegrityError: one opaque error whatever was touched)
    def flip(data: bytes, at: int) -> bytes:
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]

    bad("flipped-payload-bit", flip(base, h.entries[1].offset + 100), "IntegrityError")
    bad("flipped-header-mac", flip(base, h.header_end - 1), "IntegrityError")
    bad("flipped-chunk-table", flip(base, h.table_offset), "IntegrityError")
    bad("flipped-trailer-mac", flip(base, len(base) - 1), "IntegrityError")
    bad("edited-metadata", _edit_manifest(base, lambda m: m["metadata"].update(owner="Mallory Inc")), "IntegrityError")
    bad("reordered-chunks", _swap_chunks(base, 0, 1), "IntegrityError")
    bad("duplicated-chunk", _put_chunk(base, 1, base, 0), "IntegrityError")
    other = (out / "valid-two-recipients.mseal").read_bytes()
    stolen = _sections(other).stanzas_bytes
    bad("stanza-from-other-container", _replace(base, stanzas=stolen), "WrongKeyError")
    # a chunk from another container with the same layout, at the same position
    bad("spliced-chunk-from-other-container", _put_chunk(base, 0, other, 0), "IntegrityError")
    # the whole payload and trailer of another container under this header
    bad("spliced-payload", base[: h.header_end] + other[_sections(other).header_end :], "IntegrityError")

    # keys and signatures
    bad("wrong-identity", single, "WrongKeyError", identity=OTHER_IDENTITY.to_string())
    bad("wrong-passphrase", (out / "valid-passphrase.mseal").read_bytes(), "WrongKeyError", passphrase="Tr0ub4dor&3")
    bad(
        "unsigned-but-signer-required",
        single,
        "SignatureError",
        identity=IDENTITY.to_string(),
        require_signer=str(SIGNER.verify_key),
    )
    bad(
        "wrong-signer",
        base,
        "SignatureError",
        identity=IDENTITY.to_string(),
        require_signer=str(OTHER_SIGNER.verify_key),
    )
    return vectors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regenerate", action="store_true", help="rewrite the committed vectors")
    args = parser.parse_args(argv)
    if args.regenerate:
        for p in HERE.glob("*.mseal*"):
            p.unlink()
        index = build(HERE)
        (HERE / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        print(f"wrote {len(index)} vectors to {HERE}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        index = build(Path(tmp))
        mismatched = [
            f
            for v in index
            for f in v["files"]
            if not (HERE / f).exists() or (HERE / f).read_bytes() != (Path(tmp) / f).read_bytes()
        ]
        if json.loads((HERE / "index.json").read_text()) != index:
            mismatched.append("index.json")
    if mismatched:
        print("vectors differ from the committed ones:", *mismatched, sep="\n  ", file=sys.stderr)
        return 1
    print(f"{len(index)} vectors match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
