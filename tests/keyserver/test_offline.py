"""Offline use (spec §10.4, §10.5): cached grants open within the grace period when the server is
unreachable, not after; a clock set back is detected; the cache is encrypted, bound to its slot,
and a tampered entry is ignored."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import modelseal
from modelseal.keyserver import offline
from modelseal.keyserver.client import DeviceKey, KeyServerUnwrapper

from ..models import mlp_onnx
from .live import admin_token, serve
from .test_client_cli import _cli
from .test_e2e_grants import _create_model

HOUR = 3600


def _setup(tmp_path: Path, *policy: str) -> tuple[Path, Path, KeyServerUnwrapper, bytes]:
    """Seal for a live server, activate a device, open once online; then stop the server."""
    home = tmp_path / "device"
    with serve(tmp_path, public_url=True) as base:
        token = admin_token(tmp_path)
        _create_model(base, token, "mlp")
        code, out, err = _cli(
            tmp_path / "pub", base, token, "licence", "create", "--model", "mlp", "--max-devices", "1", *policy
        )
        assert code == 0, err
        plain = mlp_onnx(tmp_path / "m.onnx")
        sealed = tmp_path / "m.mseal"
        modelseal.seal(plain, sealed, recipients=[modelseal.KeyServerRecipient(base, token, "mlp")])
        assert _cli(home, base, token, "activate", "--licence", out.strip())[0] == 0
        unwrapper = KeyServerUnwrapper(home=home)
        with modelseal.open(sealed, identity=unwrapper) as m:
            assert m.read() == plain.read_bytes()
    return home, sealed, unwrapper, plain.read_bytes()


def _open(sealed: Path, home: Path) -> bytes:
    with modelseal.open(sealed, identity=KeyServerUnwrapper(home=home)) as m:
        return m.read()


def _at(monkeypatch: pytest.MonkeyPatch, offset_s: float) -> None:
    monkeypatch.setattr(offline, "local_time", lambda: time.time() + offset_s)


def test_offline_grace_then_expiry_then_rollback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, sealed, _, plain = _setup(tmp_path, "--recheck", "1h", "--offline-grace", "1d", "--grant-ttl", "7d")
    [grant_file] = (home / "grants").rglob("*.grant")
    assert grant_file.read_text().startswith(offline.MAGIC)
    assert grant_file.stat().st_mode & 0o777 == 0o600
    assert b"grant" not in grant_file.read_bytes()  # encrypted, not the JSON of a grant

    # Server down. Before recheck_after: no contact needed.
    assert _open(sealed, home) == plain
    # Past recheck_after, within offline_until (= recheck_after + 1 day): the server is tried,
    # is unreachable, and the cached grant opens.
    _at(monkeypatch, 2 * HOUR)
    assert _open(sealed, home) == plain
    # Past offline_until: only a fresh grant opens.
    _at(monkeypatch, 2 * 24 * HOUR)
    with pytest.raises(modelseal.LicenceError) as info:
        _open(sealed, home)
    assert info.value.code == "offline-expired"
    # Back to the real time: the clock went back by two hours since the last use.
    _at(monkeypatch, 0)
    with pytest.raises(modelseal.LicenceError) as info:
        _open(sealed, home)
    assert info.value.code == "clock-rollback"


def test_no_grace_means_no_offline_use_past_recheck(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, sealed, _, plain = _setup(tmp_path, "--recheck", "1h", "--offline-grace", "0", "--grant-ttl", "1d")
    assert _open(sealed, home) == plain  # within the recheck interval
    _at(monkeypatch, HOUR + 60)
    with pytest.raises(modelseal.LicenceError) as info:
        _open(sealed, home)
    assert info.value.code == "offline-expired"


def test_same_boot_clock_change_and_corrupt_clock_are_rollbacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, sealed, _, plain = _setup(tmp_path, "--recheck", "1h", "--offline-grace", "1d")
    boot_id, boottime = offline.boot()
    # The boot clock moved on three hours while the wall clock did not (someone set it back
    # within the tolerance of the last recorded time, but not of the elapsed time).
    monkeypatch.setattr(offline, "boot", lambda: (boot_id, boottime + 3 * HOUR))
    with pytest.raises(modelseal.LicenceError) as info:
        _open(sealed, home)
    assert info.value.code == "clock-rollback"
    # A reboot (another boot id) is not a rollback by itself.
    monkeypatch.setattr(offline, "boot", lambda: ("another-boot", 5.0))
    assert _open(sealed, home) == plain

    clock_file = home / "clock.state"
    text = clock_file.read_text()
    clock_file.write_text(text[:20] + ("A" if text[20] != "A" else "B") + text[21:])
    with pytest.raises(modelseal.LicenceError) as info:
        _open(sealed, home)
    assert info.value.code == "clock-rollback"
    # Deleting the clock record next to cached grants is the same as setting the clock back.
    clock_file.unlink()
    with pytest.raises(modelseal.LicenceError) as info:
        _open(sealed, home)
    assert info.value.code == "clock-rollback"


def test_tampered_or_moved_cache_entries_are_ignored(tmp_path: Path) -> None:
    home, sealed, _, plain = _setup(tmp_path, "--recheck", "1h", "--offline-grace", "1d")
    [grant_file] = (home / "grants").rglob("*.grant")
    original = grant_file.read_text()

    # A file encrypted for another slot, put in this one: the path is bound into the encryption,
    # so it does not decrypt here, and is removed.
    device = DeviceKey.load(home / "device.key")
    state = offline.State(home, device.identity._key.private_bytes_raw(), device.x25519_public)
    rel = str(grant_file.relative_to(home))
    other_rel = str(Path(rel).with_name("00" * 32 + ".grant"))
    state.write(other_rel, state.read(rel) or {})  # the same valid grant, sealed for the other path
    (home / other_rel).replace(grant_file)
    with pytest.raises(modelseal.KeyServerUnreachable):
        _open(sealed, home)
    assert not grant_file.exists()

    # One changed character anywhere in the body: ignored and removed.
    grant_file.write_text(original[:40] + ("A" if original[40] != "A" else "B") + original[41:])
    with pytest.raises(modelseal.KeyServerUnreachable):
        _open(sealed, home)
    assert not grant_file.exists()

    # Another device's key cannot read this device's cache.
    grant_file.write_text(original)
    assert _open(sealed, home) == plain
    state = offline.State(home, bytes(32), bytes(32))
    with pytest.raises(offline.Corrupt):
        state.read(str(grant_file.relative_to(home)))


@pytest.mark.parametrize(
    ("last_local", "local", "boot_delta", "local_delta", "expected"),
    [
        (1000.0, 1000.0, 0, 0, False),
        (1000.0, 1000.0 - 299, 0, 0, False),  # within the tolerance
        (1000.0, 1000.0 - 301, 0, 0, True),  # set back past it
        (1000.0, 5000.0, 4000, 4000, False),  # both clocks moved together
        (1000.0, 1200.0, 4000, 200, True),  # boot clock ran 4000 s, wall clock 200 s
    ],
)
def test_rollback_rule(last_local: float, local: float, boot_delta: float, local_delta: float, expected: bool) -> None:
    clock = offline.Clock(last_local, 0, 0.0, local - local_delta, "boot", 100.0)
    assert clock.rolled_back(local, "boot", 100.0 + boot_delta) is expected
