"""The README's main job (`make demo`) runs to the end from a clean directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_demo_runs(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, str(QUICKSTART)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo complete" in done.stdout
    assert "refused: token-already-redeemed" in done.stdout
    assert "audit log: OK" in done.stdout
    # nothing outside the demo's folder: no plaintext model anywhere else, no stray state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-output"]
