"""``import modelseal`` must stay light: no ML framework, numpy or web stack at import time."""

import subprocess
import sys

HEAVY = ["torch", "onnxruntime", "onnx", "numpy", "fastapi", "starlette", "uvicorn", "typer", "rich"]


def test_import_pulls_in_no_heavy_module() -> None:
    code = "import sys, modelseal; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert "modelseal" in loaded
    assert not loaded & set(HEAVY), f"import modelseal imported {sorted(loaded & set(HEAVY))}"


def test_public_api_is_explicit() -> None:
    import modelseal

    for name in modelseal.__all__:
        assert hasattr(modelseal, name), name
    assert modelseal.open is modelseal.open_sealed
    assert issubclass(modelseal.IntegrityError, modelseal.ModelSealError)
    assert issubclass(modelseal.SignatureError, modelseal.IntegrityError)
    assert issubclass(modelseal.FormatError, modelseal.ModelSealError)
    assert issubclass(modelseal.WrongKeyError, modelseal.ModelSealError)
