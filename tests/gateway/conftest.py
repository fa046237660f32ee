"""Gateway fixtures: a real Redis server from the Debian package (spec §4), never a mock."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .redisharness import RedisServer, redis_server_bin

if TYPE_CHECKING:
    from modelseal.gateway.service import Gateway
    from modelseal.gateway.settings import GatewayConfig


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One ``redis-server`` for the session; tests call ``flush()`` (or use a flushing fixture) to
    start from an empty store. A missing binary fails rather than skips, so the shared-quota tests
    cannot silently drop out of a run."""
    binary = redis_server_bin()
    if binary is None:
        pytest.fail("redis-server not found: `make sysdeps` installs it (Debian package redis-server)")
    server = RedisServer(binary)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


PASSPHRASE = "gateway-test-passphrase"
PASSPHRASE_ENV = "MODELSEAL_TEST_GATEWAY_PASSPHRASE"


@pytest.fixture(scope="session")
def sealed_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32-input, 10-class MLP (logits) sealed for a device identity (``device.key`` beside it) and
    for a passphrase (slow to derive, so most tests use the identity), with its plaintext beside it."""
    import modelseal

    from ..models import mlp_onnx

    root = tmp_path_factory.mktemp("gateway-model")
    plain = mlp_onnx(root / "mlp.onnx")
    identity = modelseal.Identity.generate()
    identity.save(root / "device.key")
    recipients = [identity.recipient, modelseal.PassphraseRecipient(PASSPHRASE)]
    modelseal.seal(plain, root / "mlp.mseal", recipients=recipients)
    return root / "mlp.mseal"


def make_config(tmp_path: Path, sealed: Path, **overrides: Any) -> GatewayConfig:
    from modelseal.gateway.settings import load_config

    settings: dict[str, Any] = {
        "model_path": str(sealed),
        "model_identity": str(sealed.parent / "device.key"),
        "data_dir": str(tmp_path / "gw"),
        "key_refresh_s": 0,
    }
    settings.update(overrides)
    return load_config(None, **settings)


@pytest.fixture
def gateway_factory(tmp_path: Path, sealed_model: Path) -> Iterator[Callable[..., Gateway]]:
    """Build gateways over the sealed model (closed at the end of the test)."""
    from modelseal.gateway.service import Gateway

    made: list[Gateway] = []

    def make(**overrides: Any) -> Gateway:
        gw = Gateway(make_config(tmp_path, sealed_model, **overrides))
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()
