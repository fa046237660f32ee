"""Worked example for docs/spec/container-v1.md.

Seals a 17-byte file with fixed keys, injected randomness and a fixed clock, so every
byte is reproducible; then takes the container apart again using only the primitives
the spec names (struct, HKDF/HMAC-SHA256, X25519, AES-256-GCM, BLAKE3, Ed25519) and
not modelseal's own parser. Every derived value is checked against the container.

    .venv/bin/python docs/spec/worked_example.py

The keys below are public test keys: never use them for anything real.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import blake3
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import modelseal
from modelseal import Identity, SigningKey
from modelseal.container import _seal

PLAINTEXT = b"hello, modelseal\n"
NOW = 1_790_000_000  # 2026-09-21T14:13:20Z
IDENTITY = Identity(X25519PrivateKey.from_private_bytes(bytes(range(1, 33))))  # 01 02 .. 20
SIGNER = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes(range(65, 97))))  # 41 42 .. 60
SEED = "modelseal/v1 worked example"
LABEL = b"modelseal/v1/"


def random_bytes_from(seed: str, log: list[bytes]) -> Callable[[int], bytes]:
    """Deterministic stand-in for os.urandom: SHA-256(seed "/" counter), concatenated."""
    counter = 0

    def random_bytes(n: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < n:
            out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
            counter += 1
        log.append(out[:n])
        return out[:n]

    return random_bytes


def b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def hkdf(ikm: bytes, salt: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=LABEL + label).derive(ikm)


def hexdump(data: bytes, base: int) -> None:
    for i in range(0, len(data), 16):
        row = data[i : i + 16]
        hx = " ".join(f"{b:02x}" for b in row)
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        print(f"  {base + i:08x}  {hx:<47}  |{text}|")


def main() -> None:
    draws: list[bytes] = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "hello.txt"
        src.write_bytes(PLAINTEXT)
        dst = Path(tmp) / "hello.mseal"
        _seal(
            src,
            dst,
            recipients=[IDENTITY.recipient],
            passphrase=None,
            signer=SIGNER,
            metadata={"owner": "Example Corp"},
            model_format=None,
            chunk_size=4096,
            shard_size=None,
            scrypt_log_n=18,
            progress=None,
            random_bytes=random_bytes_from(SEED, draws),
            now=NOW,
        )
        blob = dst.read_bytes()
        with modelseal.open(dst, identity=IDENTITY, require_signer=SIGNER.verify_key) as model:
            assert model.read("hello.txt") == PLAINTEXT  # the library agrees

    print("# Inputs")
    print(f"plaintext           {PLAINTEXT!r} ({len(PLAINTEXT)} bytes) as hello.txt, chunk_size 4096, created {NOW}")
    print(f"identity (secret)   {IDENTITY.to_string()}")
    print(f"recipient           {IDENTITY.recipient}")
    print(f"signing key         {SIGNER.to_string()}")
    print(f"verify key          {SIGNER.verify_key}")
    print("random draws, in the order the writer makes them:")
    for name, value in zip(["content key", "manifest salt", "ephemeral X25519 secret"], draws, strict=True):
        print(f"  {name:<24}{value.hex()}")
    assert len(draws) == 3

    # --- parse the byte layout (spec: "Byte layout") ---------------------------------------
    sections: list[tuple[str, int, bytes]] = []
    pos = 0

    def take(name: str, n: int) -> bytes:
        nonlocal pos
        chunk = blob[pos : pos + n]
        assert len(chunk) == n
        sections.append((name, pos, chunk))
        pos += n
        return chunk

    take("magic", 8)
    (version,) = struct.unpack(">H", take("version (u16)", 2))
    (flags,) = struct.unpack(">H", take("flags (u16)", 2))
    (mlen,) = struct.unpack(">I", take("manifest_len (u32)", 4))
    manifest_bytes = take("manifest (JSON)", mlen)
    (slen,) = struct.unpack(">I", take("stanzas_len (u32)", 4))
    stanzas_bytes = take("stanzas (JSON)", slen)
    header_mac = take("header_mac (HMAC-SHA256)", 32)
    manifest = json.loads(manifest_bytes)
    stanzas = json.loads(stanzas_bytes)
    chunk_size = manifest["chunk_size"]
    (entry,) = manifest["entries"]
    n_chunks = max(1, -(-entry["size"] // chunk_size))
    assert n_chunks == 1
    chunk = take("payload: entry 0, chunk 0 (ciphertext || tag)", entry["size"] + 16)
    table = take("chunk table (BLAKE3 of each chunk)", 32 * n_chunks)
    (siglen,) = struct.unpack(">I", take("signatures_len (u32)", 4))
    signatures_bytes = take("signatures (JSON)", siglen)
    trailer_mac = take("trailer_mac (HMAC-SHA256)", 32)
    assert pos == len(blob) and version == 1 and flags == 0

    print()
    print(f"# Container: {len(blob)} bytes")
    for name, offset, data in sections:
        print(f"{name} @ {offset} (0x{offset:x}), {len(data)} bytes")
        hexdump(data, offset)
    print()
    print("manifest text:  ", manifest_bytes.decode("ascii"))
    print("stanzas text:   ", stanzas_bytes.decode("ascii"))
    print("signatures text:", signatures_bytes.decode("ascii"))

    # --- unwrap the x25519 stanza (spec: "x25519 stanzas") -----------------------------------
    (stanza,) = stanzas
    identity_secret = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    public = identity_secret.public_key().public_bytes_raw()
    kid = hashlib.sha256(LABEL + b"kid" + public).digest()[:8]
    epk = b64(stanza["epk"])
    shared = identity_secret.exchange(X25519PublicKey.from_public_bytes(epk))
    wrap_key = hkdf(shared, epk + public, b"x25519")
    content_key = AESGCM(wrap_key).decrypt(bytes(12), b64(stanza["body"]), None)
    assert b64(stanza["kid"]) == kid
    assert epk == X25519PrivateKey.from_private_bytes(draws[2]).public_key().public_bytes_raw()
    assert content_key == draws[0]

    # --- key schedule and checks (spec: "Key schedule", "Header MAC", "Trailer MAC") ----------
    salt = b64(manifest["salt"])
    assert salt == draws[1]
    commitment = hkdf(content_key, salt, b"key-commitment")
    header_mac_key = hkdf(content_key, salt, b"header-mac")
    trailer_mac_key = hkdf(content_key, salt, b"trailer-mac")
    entry_key = hkdf(content_key, salt, b"entry" + struct.pack(">I", 0))
    assert commitment == b64(manifest["key_commitment"])
    preamble = blob[: 8 + 2 + 2 + 4 + mlen + 4 + slen]  # magic through the stanzas section
    assert hmac.new(header_mac_key, preamble, hashlib.sha256).digest() == header_mac
    trailer_input = header_mac + table + struct.pack(">I", siglen) + signatures_bytes
    assert hmac.new(trailer_mac_key, trailer_input, hashlib.sha256).digest() == trailer_mac

    nonce = (0).to_bytes(11, "big") + b"\x01"  # chunk 0 is also the last chunk
    plaintext = AESGCM(entry_key).decrypt(nonce, chunk, None)
    assert plaintext == PLAINTEXT
    assert blake3.blake3(chunk).digest() == table

    # --- publisher signature (spec: "Publisher signatures") ----------------------------------
    (sig,) = json.loads(signatures_bytes)
    root = blake3.blake3(LABEL + b"chunk-table\x00" + table).digest()
    message = LABEL + b"signature\x00" + struct.pack(">I", mlen) + manifest_bytes + root
    verify_key = Ed25519PrivateKey.from_private_bytes(bytes(range(65, 97))).public_key()
    verify_key.verify(b64(sig["signature"]), message)  # raises if invalid
    assert b64(sig["public_key"]) == verify_key.public_bytes_raw()

    print()
    print("# Derived values (all checked against the container above)")
    rows = [
        ("recipient key id (kid)", kid),
        ("X25519 shared secret", shared),
        ("wrap key", wrap_key),
        ("content key (unwrapped)", content_key),
        ("key commitment", commitment),
        ("header-mac key", header_mac_key),
        ("trailer-mac key", trailer_mac_key),
        ("entry 0 key", entry_key),
        ("chunk 0 nonce", nonce),
        ("chunk 0 ciphertext", chunk[:-16]),
        ("chunk 0 tag", chunk[-16:]),
        ("chunk table root", root),
        ("preamble length", str(len(preamble)).encode()),
        ("signed message length", str(len(message)).encode()),
    ]
    for name, value in rows:
        shown = value.decode() if name.endswith("length") else value.hex()
        print(f"{name:<26}{shown}")
    print(f"{'decrypted chunk 0':<26}{plaintext!r}")


if __name__ == "__main__":
    main()
