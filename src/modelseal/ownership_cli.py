"""``modelseal watermark …`` and ``modelseal fingerprint …``: the ownership tools on the command line.

A thin layer over :mod:`modelseal.ownership`. Suspects and reference models are named the same way
everywhere: an ``.onnx`` file, a sealed ``.mseal`` container, an ``http(s)://`` endpoint, or PyTorch
weights (``.pt``/``.pth`` state dict, ``.safetensors``) together with ``--arch module:factory``, a
Python callable that builds the module (imported with the current directory on the path).

Verify commands exit 0 when ownership is proven, 14 when it is not (all planned queries answered,
p > alpha) and 15 when the check is inconclusive (the suspect failed, the budget is too small, or
a fingerprint has no calibration).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .errors import ModelLoadError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .ownership import Suspect, Verdict

EXIT_NOT_PROVEN = 14
EXIT_INCONCLUSIVE = 15
API_KEY_ENV = "MODELSEAL_SUSPECT_API_KEY"

ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", help="module:factory building the PyTorch model that .pt/.safetensors weights fit."),
]
KeyOpt = Annotated[Path, typer.Option("--key", "-k", help="The ownership key file (modelseal watermark keygen).")]
AlphaOpt = Annotated[float, typer.Option("--alpha", help="Decide 'proven' at p <= alpha.")]
BudgetOpt = Annotated[int | None, typer.Option("--budget", help="Send the suspect at most this many inputs.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the verdict as JSON here.")]
SignerOpt = Annotated[
    str | None, typer.Option("--require-signer", help="Refuse a commitment not signed by this mseal-ed25519: key.")
]
InputNameOpt = Annotated[str | None, typer.Option("--input-name", help="ONNX input to feed (default: the only one).")]
TemplateOpt = Annotated[
    str, typer.Option("--request-template", help='HTTP request JSON with the string "$INPUTS" where the batch goes.')
]
ResponsePathOpt = Annotated[
    str, typer.Option("--response-path", help="Dot path to the labels or scores in the HTTP response JSON.")
]
ApiKeyHeaderOpt = Annotated[
    str, typer.Option("--api-key-header", help=f"Header for the API key read from ${API_KEY_ENV}.")
]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds an HTTP suspect may take per request.")]
IdentityOpt = Annotated[
    list[Path] | None, typer.Option("--identity", "-i", help="Identity file for a sealed suspect (repeatable).")
]


def _import_factory(spec: str) -> Callable[[], torch.nn.Module]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--arch expects module:factory, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while it loads
        raise ValueError(f"--arch {spec}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{spec}: no callable {attr!r} in module {module_name!r}")
    return factory  # type: ignore[no-any-return]


def _torch_model(weights: Path, arch: str | None) -> torch.nn.Module:
    import torch

    if arch is None:
        raise ValueError(f"{weights}: PyTorch weights need --arch module:factory to build the model")
    factory = _import_factory(arch)
    try:
        model = factory()
    except Exception as exc:  # the user's factory failed
        raise ValueError(f"--arch {arch}: the factory failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{arch} did not return a torch.nn.Module")
    if not weights.is_file():
        raise FileNotFoundError(2, "no such weights file", str(weights))
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file, or a pickle weights_only refuses
        raise ModelLoadError(str(weights), f"not readable PyTorch weights: {str(exc).splitlines()[0][:200]}") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(f"{weights} does not fit --arch {arch}: {str(exc).splitlines()[0][:300]}") from None
    return model.eval()


def _suspect(
    spec: str,
    *,
    arch: str | None,
    budget: int | None = None,
    input_name: str | None = None,
    request_template: str = '{"inputs": "$INPUTS"}',
    response_path: str = "outputs",
    api_key_header: str = "Authorization",
    identity: list[Path] | None = None,
    timeout: float = 10.0,
) -> Suspect:
    from .ownership import HttpSuspect, OnnxSuspect, TorchSuspect, sealed_suspect

    if spec.startswith(("http://", "https://")):
        return HttpSuspect(
            spec,
            api_key=os.environ.get(API_KEY_ENV),
            api_key_header=api_key_header,
            request_template=request_template,
            response_path=response_path,
            budget=budget,
            timeout=timeout,
        )
    path = Path(spec)
    if ".mseal" in path.name:
        from .keys import Identity

        ids = [Identity.load(p) for p in identity or []]
        passphrase = os.environ.get("MODELSEAL_PASSPHRASE")
        return sealed_suspect(path, budget=budget, input_name=input_name, identity=ids or None, passphrase=passphrase)
    if path.suffix == ".onnx":
        return OnnxSuspect(path, input_name=input_name, budget=budget)
    if path.suffix in (".pt", ".pth", ".safetensors"):
        return TorchSuspect(_torch_model(path, arch), budget=budget, name=f"torch:{path}")
    raise ValueError(f"{spec}: name an .onnx, .mseal, .pt, .pth or .safetensors file, or an http(s):// URL")


def _check_outputs(*paths: Path) -> None:
    """Before any work: refuse to overwrite, and fail now on a directory that does not exist."""
    for path in paths:
        if path.exists():
            raise ValueError(f"{path} exists; remove it or choose another path")
        if not path.parent.is_dir():
            raise FileNotFoundError(2, "no such directory", str(path.parent))


def _classes_of(model: torch.nn.Module, x: np.ndarray) -> int:
    import numpy as np
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(x[:1], dtype="float32")))
    if out.dim() != 2 or out.shape[1] < 2:
        raise ValueError(f"the model answers shape {list(out.shape)}; give --num-classes")
    return int(out.shape[1])


def _npz(path: Path, *names: str) -> list[np.ndarray]:
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"{path}: no array named {', '.join(missing)} (arrays: {', '.join(data.files)})")
        return [np.asarray(data[n]) for n in names]


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)


def _check_and_report(target: Suspect, check: Callable[[Suspect], Verdict], json_path: Path | None) -> None:
    """Run ``check`` on the suspect (closed afterwards), print the verdict, exit with its code."""
    with target:
        verdict = check(target)
    print(verdict.summary())
    if json_path is not None:
        json_path.write_text(json.dumps(verdict.to_dict(), indent=1) + "\n", encoding="utf-8")
    if verdict.decision == "not-proven":
        raise typer.Exit(EXIT_NOT_PROVEN)
    if verdict.decision == "inconclusive":
        raise typer.Exit(EXIT_INCONCLUSIVE)


def register(app: typer.Typer, translate: Callable[[], AbstractContextManager[None]]) -> None:
    """Add ``watermark …`` and ``fingerprint …`` to the ``modelseal`` command line."""
    wm_app = typer.Typer(help="Canary watermarks: embed into a PyTorch model, verify a suspect.", no_args_is_help=True)
    fp_app = typer.Typer(help="Fingerprints: record probes of a model, verify a suspect.", no_args_is_help=True)
    app.add_typer(wm_app, name="watermark")
    app.add_typer(fp_app, name="fingerprint")

    @wm_app.command("keygen")
    def keygen(
        output: Annotated[Path, typer.Argument(help="Write the ownership key here (mode 0600).")],
        force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    ) -> None:
        """Make an ownership key (for watermarks and fingerprints)."""
        from .ownership import OwnershipKey

        with translate():
            key = OwnershipKey.generate()
            key.save(output, overwrite=force)
            print(f"wrote ownership key {key.key_id[:16]}... to {output}")

    @wm_app.command("embed")
    def embed(
        weights: Annotated[Path, typer.Argument(help="The trained model's weights (.pt state dict or .safetensors).")],
        arch: ArchOpt = None,
        data: Annotated[
            Path, typer.Option("--data", help="Training data: an .npz with arrays x (inputs) and y (labels).")
        ] = Path("data.npz"),
        key: KeyOpt = Path("owner.key"),
        signing_key: Annotated[Path, typer.Option("--signing-key", help="Publisher key that signs.")] = Path(
            "publisher.key"
        ),
        output: Annotated[Path, typer.Option("--output", "-o", help="Write the watermarked weights here.")] = Path(
            "watermarked.pt"
        ),
        record: Annotated[Path, typer.Option("--record", help="Write the watermark record here.")] = Path(
            "watermark.json"
        ),
        num_classes: Annotated[int | None, typer.Option("--num-classes", help="Default: max(y) + 1.")] = None,
        uniform: Annotated[int | None, typer.Option("--uniform", help="Uniform-noise triggers.")] = None,
        noise: Annotated[
            int | None, typer.Option("--noise", help="Per-feature noise triggers, within the training range.")
        ] = None,
        wide: Annotated[
            int | None, typer.Option("--wide", help="Per-feature noise triggers spread 1.5x wider, unclipped.")
        ] = None,
        stamp: Annotated[int | None, typer.Option("--stamp", help="Stamped natural-input triggers.")] = None,
        epochs: Annotated[int, typer.Option("--epochs")] = 100,
        lr: Annotated[float, typer.Option("--lr")] = 1e-3,
        seed: Annotated[int, typer.Option("--seed")] = 0,
    ) -> None:
        """Fine-tune a model with key-derived triggers; write the weights and the signed record.

        Without --uniform/--noise/--wide/--stamp the trigger mix is chosen for the data (docs/ownership.md).
        """
        from .keys import SigningKey
        from .ownership import OwnershipKey, embed_watermark

        with translate():
            _check_outputs(output, record)
            model = _torch_model(weights, arch)
            x, y = _npz(data, "x", "y")
            classes = num_classes if num_classes is not None else int(y.max()) + 1
            counts = (("uniform", uniform), ("noise", noise), ("wide", wide), ("stamp", stamp))
            # No counts given: the library's default mix for this input shape and class count.
            families = [(n, c) for n, c in counts if c] if any(c is not None for _, c in counts) else None
            wm = embed_watermark(
                model,
                OwnershipKey.load(key),
                x,
                y,
                num_classes=classes,
                signing_key=SigningKey.load(signing_key),
                families=families,
                epochs=epochs,
                lr=lr,
                seed=seed,
            )
            _save_weights(model, output)
            wm.save(record)
            print(f"embedded {wm.spec.count} triggers; the model now answers {wm.embedded_match_rate:.1%} of them")
            print(f"wrote {output} and {record}; commitment {wm.commitment.digest}")

    @wm_app.command("verify")
    def wm_verify(
        record: Annotated[Path, typer.Argument(help="The watermark record (watermark.json).")],
        suspect: Annotated[str, typer.Argument(help="Suspect: .onnx, .mseal, .pt/.safetensors (+--arch) or URL.")],
        key: KeyOpt = Path("owner.key"),
        calibration: Annotated[Path | None, typer.Option("--calibration", help="Null calibration file.")] = None,
        alpha: AlphaOpt = 1e-6,
        budget: BudgetOpt = None,
        arch: ArchOpt = None,
        json_out: JsonOpt = None,
        require_signer: SignerOpt = None,
        input_name: InputNameOpt = None,
        request_template: TemplateOpt = '{"inputs": "$INPUTS"}',
        response_path: ResponsePathOpt = "outputs",
        api_key_header: ApiKeyHeaderOpt = "Authorization",
        identity: IdentityOpt = None,
        timeout: TimeoutOpt = 10.0,
    ) -> None:
        """Query a suspect with the watermark's triggers; exit 0 proven, 14 not proven, 15 inconclusive."""
        from .ownership import NullCalibration, OwnershipKey, Watermark

        with translate():
            wm = Watermark.load(record)
            owner_key = OwnershipKey.load(key)
            cal = NullCalibration.load(calibration) if calibration else None
            target = _suspect(
                suspect,
                arch=arch,
                input_name=input_name,
                request_template=request_template,
                response_path=response_path,
                api_key_header=api_key_header,
                identity=identity,
                timeout=timeout,
            )
            _check_and_report(
                target,
                lambda t: wm.verify(
                    t, owner_key, alpha=alpha, budget=budget, calibration=cal, require_signer=require_signer
                ),
                json_out,
            )

    @wm_app.command("calibrate")
    def wm_calibrate(
        record: Annotated[Path, typer.Argument(help="The watermark record.")],
        references: Annotated[list[str], typer.Argument(help="Reference models trained without the key (>= 10).")],
        key: KeyOpt = Path("owner.key"),
        output: Annotated[Path, typer.Option("--output", "-o", help="Write the calibration here.")] = Path(
            "watermark-null.json"
        ),
        arch: ArchOpt = None,
    ) -> None:
        """Record how often independent models match the triggers (a null for the p-value)."""
        from .ownership import OwnershipKey, Watermark

        with translate():
            _check_outputs(output)
            wm = Watermark.load(record)
            cal = wm.calibrate(OwnershipKey.load(key), _references(references, arch))
            cal.save(output)
            print(_calibration_line(cal.matches, output))

    @fp_app.command("record")
    def fp_record(
        weights: Annotated[Path, typer.Argument(help="The owner's model weights (.pt state dict or .safetensors).")],
        arch: ArchOpt = None,
        pool: Annotated[Path, typer.Option("--pool", help="Natural inputs: an .npz with an array x.")] = Path(
            "pool.npz"
        ),
        key: KeyOpt = Path("owner.key"),
        signing_key: Annotated[Path, typer.Option("--signing-key", help="Publisher key that signs.")] = Path(
            "publisher.key"
        ),
        output: Annotated[Path, typer.Option("--output", "-o", help="Write the fingerprint here.")] = Path(
            "fingerprint.json"
        ),
        num_classes: Annotated[int | None, typer.Option("--num-classes", help="Default: the model's outputs.")] = None,
        count: Annotated[int, typer.Option("--count", help="Number of probes.")] = 200,
    ) -> None:
        """Make boundary probes of a model (no retraining) and sign the record."""
        from .keys import SigningKey
        from .ownership import OwnershipKey, record_fingerprint

        with translate():
            _check_outputs(output)
            model = _torch_model(weights, arch)
            (x,) = _npz(pool, "x")
            if num_classes is None:
                num_classes = _classes_of(model, x)
            fp = record_fingerprint(
                model,
                OwnershipKey.load(key),
                x,
                num_classes=num_classes,
                signing_key=SigningKey.load(signing_key),
                count=count,
            )
            fp.save(output)
            print(f"recorded {len(fp.probes)} probes to {output}; commitment {fp.commitment.digest}")

    @fp_app.command("calibrate")
    def fp_calibrate(
        record: Annotated[Path, typer.Argument(help="The fingerprint record.")],
        references: Annotated[list[str], typer.Argument(help="Reference models trained independently (>= 10).")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Write the calibration here.")] = Path(
            "fingerprint-null.json"
        ),
        arch: ArchOpt = None,
    ) -> None:
        """Record how often independent models answer the probes like the owner's model."""
        from .ownership import Fingerprint

        with translate():
            _check_outputs(output)
            cal = Fingerprint.load(record).calibrate(_references(references, arch))
            cal.save(output)
            print(_calibration_line(cal.matches, output))

    @fp_app.command("verify")
    def fp_verify(
        record: Annotated[Path, typer.Argument(help="The fingerprint record.")],
        suspect: Annotated[str, typer.Argument(help="Suspect: .onnx, .mseal, .pt/.safetensors (+--arch) or URL.")],
        calibration: Annotated[Path | None, typer.Option("--calibration", help="Null calibration file.")] = None,
        alpha: AlphaOpt = 1e-6,
        budget: BudgetOpt = None,
        arch: ArchOpt = None,
        json_out: JsonOpt = None,
        require_signer: SignerOpt = None,
        input_name: InputNameOpt = None,
        request_template: TemplateOpt = '{"inputs": "$INPUTS"}',
        response_path: ResponsePathOpt = "outputs",
        api_key_header: ApiKeyHeaderOpt = "Authorization",
        identity: IdentityOpt = None,
        timeout: TimeoutOpt = 10.0,
    ) -> None:
        """Query a suspect with the probes; exit 0 proven, 14 not proven, 15 inconclusive."""
        from .ownership import Fingerprint, NullCalibration

        with translate():
            fp = Fingerprint.load(record)
            cal = NullCalibration.load(calibration) if calibration else None
            target = _suspect(
                suspect,
                arch=arch,
                input_name=input_name,
                request_template=request_template,
                response_path=response_path,
                api_key_header=api_key_header,
                identity=identity,
                timeout=timeout,
            )
            _check_and_report(
                target,
                lambda t: fp.verify(t, calibration=cal, alpha=alpha, budget=budget, require_signer=require_signer),
                json_out,
            )

    lab_app = typer.Typer(help="Attack our own defences and measure them (needs modelseal[lab]).", no_args_is_help=True)
    app.add_typer(lab_app, name="lab")

    @lab_app.command("removal")
    def lab_removal(
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory for report.json/.md/.html and plots.")] = Path(
            "removal-report"
        ),
        fast: Annotated[bool, typer.Option("--fast", help="The small subset the test suite runs (~30 s).")] = False,
        null_models: Annotated[int | None, typer.Option("--null-models", help="Reference models per dataset.")] = None,
        seed: Annotated[int, typer.Option("--seed")] = 0,
    ) -> None:
        """Watermark and fingerprint victims, attack them, verify every copy; write the report."""
        import dataclasses
        import time

        from .lab.removal import FAST, FULL, run_removal, write_report

        with translate():
            config = dataclasses.replace(FAST if fast else FULL, seed=seed)
            if null_models is not None:
                config = dataclasses.replace(config, null_models=null_models)
            started = time.perf_counter()

            def progress(message: str) -> None:
                print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

            report = run_removal(config, progress=progress)
            files = write_report(report, out)
            met = sum(t["met"] for t in report["targets"])
            print(f"targets met: {met} of {len(report['targets'])}; wrote {', '.join(str(f) for f in files)}")

    @lab_app.command("report")
    def lab_report(
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory for report.json/.md/.html and plots.")] = Path(
            "stealing-report"
        ),
        fast: Annotated[bool, typer.Option("--fast", help="The small subset the test suite runs.")] = False,
        seed: Annotated[int, typer.Option("--seed")] = 0,
    ) -> None:
        """Attack a victim with every extraction attack under every gateway defence; write the report."""
        import dataclasses
        import time

        from .lab.stealing import FAST, FULL, run_stealing, write_stealing_report

        with translate():
            config = dataclasses.replace(FAST if fast else FULL, seed=seed)
            started = time.perf_counter()

            def progress(message: str) -> None:
                print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

            report = run_stealing(config, progress=progress)
            files = write_stealing_report(report, out)
            met = sum(t["met"] for t in report["targets"])
            print(f"targets met: {met} of {len(report['targets'])}; wrote {', '.join(str(f) for f in files)}")

    def _references(specs: list[str], arch: str | None) -> Iterator[Suspect]:
        for spec in specs:
            suspect = _suspect(spec, arch=arch)
            try:
                yield suspect
            finally:
                suspect.close()


def _calibration_line(matches: Any, output: Path) -> str:
    rates = matches.mean(axis=1)
    return (
        f"wrote {output}: {len(rates)} reference models, match rate mean {rates.mean():.3f}, "
        f"max {rates.max():.3f} over {matches.shape[1]} items"
    )
