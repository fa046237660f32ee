"""The CLI, in-process: each error class has its own exit code, and failures leave no files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelseal import Identity, SigningKey
from modelseal.cli import app
from modelseal.errors import FormatError, IntegrityError, SignatureError, WrongKeyError

runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None, expect: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args], env=env)
    assert result.exit_code == expect, (result.exit_code, result.output, result.exception)
    return result.output


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    device = run("keygen", "-o", tmp_path / "device.key").strip().splitlines()[-1]
    publisher = run("keygen", "--signing", "-o", tmp_path / "pub.key").strip().splitlines()[-1]
    return {
        "device": device,
        "publisher": publisher,
        "id": str(tmp_path / "device.key"),
        "sk": str(tmp_path / "pub.key"),
    }


@pytest.fixture
def sealed(tmp_path: Path, model_dir: Path, keys: dict[str, str]) -> Path:
    out = tmp_path / "m.mseal"
    run("seal", model_dir, "-o", out, "-r", keys["device"], "--sign", keys["sk"], "--owner", "Example",
        "--meta", "build=7", "--chunk-size", "4096")  # fmt: skip
    return out


def test_keygen_writes_private_files(tmp_path: Path, keys: dict[str, str]) -> None:
    assert keys["device"].startswith("mseal-x25519:")
    assert keys["publisher"].startswith("mseal-ed25519:")
    assert oct((tmp_path / "device.key").stat().st_mode & 0o777) == "0o600"
    run("keygen", "-o", tmp_path / "device.key", expect=7)  # exists: refused


def test_seal_inspect_verify_open(tmp_path: Path, sealed: Path, model_dir: Path, keys: dict[str, str]) -> None:
    info = json.loads(run("inspect", sealed, "--json"))
    assert info["metadata"] == {"owner": "Example", "build": "7"}
    assert info["signers"] == [keys["publisher"]]
    assert [e["path"] for e in info["entries"]] == ["config.json", "model.safetensors", "tokenizer/vocab.txt"]
    assert "Example" in run("inspect", sealed)
    assert (
        json.loads(run("verify", sealed, "--signer", keys["publisher"], "--json"))["verified_signer"]
        == keys["publisher"]
    )
    run("open", sealed, "-i", keys["id"], "--require-signer", keys["publisher"], "-o", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    run("open", sealed, "-i", keys["id"], "-f", "config.json", "-o", tmp_path / "config.json")
    assert (tmp_path / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()


def test_open_single_file_to_stdout(tmp_path: Path, keys: dict[str, str]) -> None:
    (tmp_path / "w.bin").write_bytes(b"weights\n")
    run("seal", tmp_path / "w.bin", "-o", tmp_path / "w.mseal", "-r", keys["device"])
    result = runner.invoke(app, ["open", str(tmp_path / "w.mseal"), "-i", keys["id"]])
    assert result.exit_code == 0
    assert result.stdout_bytes == b"weights\n"


def test_passphrase_from_environment(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"pw-protected")
    env = {"MODELSEAL_PASSPHRASE": "s3cret"}
    run("seal", tmp_path / "w.bin", "-o", tmp_path / "w.mseal", "-p", env=env)
    run("open", tmp_path / "w.mseal", "-p", "-o", tmp_path / "w.out", env=env)
    assert (tmp_path / "w.out").read_bytes() == b"pw-protected"
    run("open", tmp_path / "w.mseal", "-p", "-o", tmp_path / "w2.out", env={"MODELSEAL_PASSPHRASE": "no"},
        expect=WrongKeyError.exit_code)  # fmt: skip


def test_each_error_class_has_its_exit_code(tmp_path: Path, sealed: Path, keys: dict[str, str]) -> None:
    codes = {FormatError.exit_code, IntegrityError.exit_code, SignatureError.exit_code, WrongKeyError.exit_code, 2, 7}
    assert len(codes) == 6
    other = tmp_path / "other.key"
    Identity.generate().save(other)
    run("open", sealed, "-i", other, "-o", tmp_path / "x", expect=WrongKeyError.exit_code)
    stranger = str(SigningKey.generate().verify_key)
    run("verify", sealed, "--signer", stranger, expect=SignatureError.exit_code)
    (tmp_path / "junk.mseal").write_bytes(b"not a container at all")
    run("inspect", tmp_path / "junk.mseal", expect=FormatError.exit_code)
    run("inspect", tmp_path / "missing.mseal", expect=7)
    run("verify", sealed, "--signer", "mseal-ed25519:typo", expect=2)
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 1  # inside the encrypted weights
    sealed.write_bytes(data)
    run("open", sealed, "-i", keys["id"], "-o", tmp_path / "x", expect=IntegrityError.exit_code)
    run("verify", sealed, "--signer", keys["publisher"], expect=SignatureError.exit_code)


def test_failed_open_leaves_no_file_behind(tmp_path: Path, sealed: Path, keys: dict[str, str]) -> None:
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 0x10  # damage the payload: the failure comes mid-stream
    sealed.write_bytes(data)
    before = set(tmp_path.iterdir())
    run("open", sealed, "-i", keys["id"], "-o", tmp_path / "out", expect=IntegrityError.exit_code)
    run(
        "open",
        sealed,
        "-i",
        keys["id"],
        "-f",
        "model.safetensors",
        "-o",
        tmp_path / "w",
        expect=IntegrityError.exit_code,
    )
    assert set(tmp_path.iterdir()) == before


def test_rewrap_cli(tmp_path: Path, sealed: Path, keys: dict[str, str]) -> None:
    new = Identity.generate()
    new.save(tmp_path / "new.key")
    run("rewrap", sealed, "-i", keys["id"], "--add", str(new.recipient), "--remove", keys["device"])
    run("open", sealed, "-i", tmp_path / "new.key", "-o", tmp_path / "out")
    run("open", sealed, "-i", keys["id"], "-o", tmp_path / "out2", expect=WrongKeyError.exit_code)
    run("verify", sealed, "--signer", keys["publisher"])


def test_sharded_seal_from_cli(tmp_path: Path, model_dir: Path, keys: dict[str, str]) -> None:
    run(
        "seal",
        model_dir,
        "-o",
        tmp_path / "s.mseal",
        "-r",
        keys["device"],
        "--chunk-size",
        "4096",
        "--shard-size",
        "6000",
    )
    shards = sorted(p.name for p in tmp_path.glob("s.mseal-shard*"))
    assert len(shards) >= 2
    run("open", tmp_path / shards[0], "-i", keys["id"], "-o", tmp_path / "out")


def test_identity_from_environment(tmp_path: Path, sealed: Path, keys: dict[str, str]) -> None:
    run("open", sealed, "-f", "config.json", "-o", tmp_path / "c", env={"MODELSEAL_IDENTITY": keys["id"]})
    run("open", sealed, "-o", tmp_path / "d", expect=2, env={"MODELSEAL_IDENTITY": ""})


def test_no_stdout_of_many_files(sealed: Path, keys: dict[str, str]) -> None:
    assert "--output" in run("open", sealed, "-i", keys["id"], expect=2)
