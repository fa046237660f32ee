"""The model-stealing lab: extraction attacks against our own defences, and what each defence buys.

For a victim (digits MLP by default) it runs every (attack, what the victim reveals, defence, query
budget) and measures the stolen copy's accuracy and fidelity (agreement with the undefended victim
on the test set); the defence's cost to legitimate users (simulated benign clients: the share of
their answers whose label differs from the undefended service's); when the extraction monitor first
flags the thief, and how many benign clients it flags; whether traceable answers name the thief's
key; and how many queries a thief needs to reach the undefended copy's 100-query accuracy.

Defences are the gateway's own parts (:mod:`modelseal.gateway.policies`, :mod:`.trace`,
:mod:`.monitor`) wrapped around the model in process, so the grid runs in minutes; one extra run goes
through a live gateway app over HTTP with several sybil API keys. The external reference (IBM ART's
CopycatCNN and KnockoffNets) and the encoder study (seed 003) are added when their modules are
available. ``modelseal lab report`` runs it; :data:`FAST` is the subset the test suite runs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..gateway.batch import Batch
from ..gateway.monitor import Monitor, MonitorConfig, Reference, Thresholds, calibrate, simulate_benign
from ..gateway.policies import CoveragePricer, Policy, chain, label_only, noise, round_scores, top_k
from ..gateway.trace import Tracer
from ..ownership.stats import binomial_tail
from . import extraction, models
from .data import Dataset, load_dataset

__all__ = ["DEFENCES", "FAST", "FULL", "StealingConfig", "run_stealing", "write_stealing_report"]

log = logging.getLogger("modelseal.lab")
Progress = Callable[[str], None]

DEFENCES: dict[str, tuple[tuple[str, ...], float]] = {
    # name: (gateway policy chain, trace rate)
    "none": ((), 0.0),
    "round:1": (("round:1",), 0.0),
    "noise:0.1": (("noise:0.1",), 0.0),
    "top_k:1": (("top_k:1",), 0.0),
    "coverage": (("coverage",), 0.0),
    "trace:1%": ((), 0.01),
    "coverage+trace:1%": (("coverage",), 0.01),
    "monitor:degrade": ((), 0.0),
    "monitor:throttle": ((), 0.0),
    "monitor:misinform": ((), 0.0),
}
ACTIONS = {"monitor:degrade": "degrade", "monitor:throttle": "throttle", "monitor:misinform": "misinform"}
"""Defences driven by the extraction monitor: once it flags the key, answers become labels only
(degrade), the key is refused (throttle: its quota cut to nothing), or every answer carries a keyed
wrong label, recorded for tracing (misinform, ``misinform_rate = 1``), as a gateway tier's
``on_alert`` does. They act between requests, so attacks send 50-row requests."""
ATTACKS = ("copycat", "knockoff-random", "knockoff-adaptive", "jacobian")


@dataclass(frozen=True)
class StealingConfig:
    dataset: str = "digits"
    pool_fraction: float = 0.4  # a larger attacker pool than the 60/20/20 split (720 digits rows)
    victim_arch: str = "mlp"
    victim_epochs: int = 60
    attacks: tuple[str, ...] = ATTACKS
    outputs: tuple[str, ...] = ("labels", "probabilities")
    defences: tuple[str, ...] = tuple(DEFENCES)
    budgets: tuple[int, ...] = (100, 250, 500, 1000)
    student_epochs: int = 100
    benign_calibration: int = 100
    benign_evaluation: int = 100
    # stricter than the 1% the target allows: misinformation harms a flagged benign client, and
    # natural-data thieves pass this threshold at their first evaluation with room to spare
    target_fpr: float = 0.001
    alpha: float = 1e-6
    seed: int = 0
    live: bool = True  # one copycat run through a live gateway app with sybil keys
    art: bool = True  # IBM ART's CopycatCNN / KnockoffNets as an external reference, when installed
    encoders: bool = True  # the encoder study (seed 003), when available


FULL = StealingConfig()
FAST = StealingConfig(
    attacks=("copycat", "jacobian"),
    outputs=("probabilities",),
    defences=("none", "round:1", "coverage+trace:1%"),
    budgets=(100, 500),
    victim_epochs=40,
    student_epochs=60,
    benign_calibration=40,
    benign_evaluation=40,
    art=False,
    encoders=False,
)


def _policy(items: Sequence[str], secret: bytes, pricer: CoveragePricer) -> Policy:
    parts: list[Policy] = []
    for item in items:
        name, _, arg = item.partition(":")
        if name == "round":
            parts.append(round_scores(int(arg)))
        elif name == "noise":
            parts.append(noise(float(arg), secret))
        elif name == "top_k":
            parts.append(top_k(int(arg)))
        elif name == "label_only":
            parts.append(label_only())
        elif name == "coverage":
            parts.append(pricer)
        else:
            raise ValueError(f"unknown policy {item!r}")
    return chain(parts)


class DefendedVictim:
    """The victim as one API key of a gateway sees it: tracing, then the output policy; the monitor
    watches every query. Records the key's altered answers (for the tracing test) and the query at
    which the monitor first flagged it."""

    def __init__(
        self,
        model: torch.nn.Module,
        defence: str,
        *,
        key_id: str,
        outputs: str,
        monitor: Monitor | None,
        reference: Reference,
        secret: bytes,
    ) -> None:
        items, rate = DEFENCES[defence]
        self.model, self.key_id, self.outputs, self.monitor = model, key_id, outputs, monitor
        self.action = ACTIONS.get(defence)
        self.refused = 0
        dim = reference.dim
        self.pricer = CoveragePricer(dim, seed=secret, centre=reference.mean, scale=reference.scale)
        self.policy = _policy(items, secret, self.pricer)
        self.tracer = Tracer(secret, rate=rate) if rate > 0 else None
        self.misinformer = Tracer(b"misinformation " + secret, rate=1.0) if self.action == "misinform" else None
        self.queries = 0
        self.first_alarm: int | None = None
        self.altered_x: list[np.ndarray] = []
        self.altered_label: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.action == "throttle" and self.first_alarm is not None:
            from .targets import QueryRefused

            self.refused += len(x)
            raise QueryRefused(f"key {self.key_id} is throttled: the extraction monitor flagged it")
        batch = Batch(self.key_id, x)
        probs = models.probabilities(self.model, x).astype(np.float64)
        plan: np.ndarray | None = None
        if self.tracer is not None:
            probs, plan = self.tracer.apply(batch, probs)
            self._record(x, plan)
        if self.misinformer is not None and self.first_alarm is not None:
            probs, wrong = self.misinformer.apply(batch, probs, skip=None if plan is None else plan >= 0)
            self._record(x, wrong)  # flagged before this request: keyed wrong labels, recorded
        labels: np.ndarray = probs.argmax(axis=1)
        if self.monitor is not None:
            # one observation per row, as the gateway sees a thief sending rows one request at a time
            assessment = self.monitor.observe(self.key_id, x.reshape(len(x), -1))
            if assessment.flagged and self.first_alarm is None:
                self.first_alarm = int(assessment.flagged_at or assessment.queries)
        self.queries += len(x)
        if self.outputs == "labels":
            return labels
        if self.action == "degrade" and self.first_alarm is not None and self.first_alarm < self.queries:
            onehot: np.ndarray = np.eye(probs.shape[1])[labels]  # flagged before this request: labels only
            return onehot
        scores: np.ndarray = self.policy(batch, probs)
        return scores

    def _record(self, x: np.ndarray, plan: np.ndarray) -> None:
        rows = np.flatnonzero(plan >= 0)
        self.altered_x += [x[i] for i in rows]
        self.altered_label += [int(plan[i]) for i in rows]


def _trace_p(student: torch.nn.Module, victim: DefendedVictim, keys_tested: int) -> tuple[int, int, float]:
    """(altered answers, reproduced, Bonferroni p) for the thief's key; exact null 1/(K-1)."""
    if not victim.altered_x:
        return 0, 0, 1.0
    x = np.stack(victim.altered_x)
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)  # distinct rows only
    x, served = x[np.sort(first)], np.array(victim.altered_label)[np.sort(first)]
    k = int(models.probabilities(student, x[:1]).shape[1])
    matches = int((models.predict(student, x) == served).sum())
    return len(x), matches, min(1.0, binomial_tail(matches, len(x), 1 / (k - 1)) * keys_tested)


def _attack(
    name: str,
    victim: DefendedVictim,
    ds: Dataset,
    *,
    budget: int,
    outputs: str,
    epochs: int,
    seed: int,
) -> extraction.ExtractionResult:
    student = models.build("mlp", ds.input_shape, ds.num_classes, seed=seed + 1)
    common: dict[str, Any] = {
        "student": student,
        "budget": budget,
        "outputs": outputs,
        "epochs": epochs,
        "seed": seed,
        "batch_size": 50,  # requests of 50 rows, as through an API: the monitor can act between them
    }
    if name == "copycat":
        return extraction.copycat(victim, ds.x_pool, **common)
    if name == "knockoff-random":
        return extraction.knockoff_random(
            victim, ds.x_pool, feature_low=ds.feature_low, feature_high=ds.feature_high, **common
        )
    if name == "knockoff-adaptive":
        return extraction.knockoff_adaptive(
            victim, ds.x_pool, feature_low=ds.feature_low, feature_high=ds.feature_high, **common
        )
    if name == "jacobian":
        rng = np.random.default_rng(seed)
        seed_set = ds.x_pool[rng.choice(len(ds.x_pool), size=min(50, budget // 2), replace=False)]
        return extraction.jacobian_augmentation(
            victim, seed_set, feature_low=ds.feature_low, feature_high=ds.feature_high, **common
        )
    raise ValueError(f"unknown attack {name!r} (known: {', '.join(ATTACKS)})")


def _benign(
    model: torch.nn.Module,
    defence: str,
    streams: Sequence[np.ndarray],
    reference: Reference,
    secret: bytes,
    thresholds: Thresholds,
) -> float:
    """Share of benign clients' answers whose label differs from the undefended service's (a refused
    answer counts as changed; a degraded one as changed only if its label is)."""
    from .targets import QueryRefused

    changed = total = 0
    for i, stream in enumerate(streams):
        v = DefendedVictim(
            model,
            defence,
            key_id=f"benign-{i}",
            outputs="probabilities",
            monitor=Monitor(reference, thresholds=thresholds) if defence in ACTIONS else None,
            reference=reference,
            secret=secret,
        )
        expected = models.predict(model, stream)
        for s in range(0, len(stream), 50):
            try:
                answered = v(stream[s : s + 50])
            except QueryRefused:
                changed += len(stream[s : s + 50])
                continue
            changed += int((answered.argmax(axis=1) != expected[s : s + 50]).sum())
        total += len(stream)
    return changed / total


def run_stealing(config: StealingConfig = FULL, *, progress: Progress | None = None) -> dict[str, Any]:
    """Run the grid of :class:`StealingConfig`; returns the report as a JSON-ready dict."""
    say = progress or (lambda _m: None)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    ds = load_dataset(config.dataset, seed=config.seed, pool_fraction=config.pool_fraction)
    victim_model = models.train(
        models.build(config.victim_arch, ds.input_shape, ds.num_classes, seed=config.seed),
        ds.x_train,
        ds.y_train,
        epochs=config.victim_epochs,
        seed=config.seed,
    )
    victim_acc = models.accuracy(victim_model, ds.x_test, ds.y_test)
    victim_test_labels = models.predict(victim_model, ds.x_test)
    say(f"victim {config.dataset}/{config.victim_arch}: accuracy {victim_acc:.4f}; pool {len(ds.x_pool)} rows")

    flat = ds.x_train.reshape(len(ds.x_train), -1)
    reference = Reference.fit(flat, seed=config.seed)

    def streams(n: int, offset: int) -> list[np.ndarray]:
        return [
            simulate_benign(
                ds.x_test, ds.y_test, seed=offset + i, feature_low=ds.feature_low, feature_high=ds.feature_high
            )
            for i in range(n)
        ]

    calibration = streams(config.benign_calibration, 10_000)
    evaluation = streams(config.benign_evaluation, 20_000)
    thresholds = calibrate(reference, [s.reshape(len(s), -1) for s in calibration], target_fpr=config.target_fpr)
    probe = Monitor(reference, thresholds=thresholds)
    false_alarms = 0
    for i, s in enumerate(evaluation):
        false_alarms += bool(probe.observe(f"benign-{i}", s.reshape(len(s), -1)).flagged)
    say(f"monitor: {false_alarms} of {len(evaluation)} held-out benign clients flagged")
    secret = b"modelseal-lab-stealing-secret-" + config.seed.to_bytes(4, "little")
    keys_tested = config.benign_evaluation + 1  # the verifier tests every key that has traced answers

    benign_cost = {d: _benign(victim_model, d, evaluation, reference, secret, thresholds) for d in config.defences}
    runs: list[dict[str, Any]] = []
    for attack in config.attacks:
        for outputs in config.outputs:
            for defence in config.defences:
                for budget in config.budgets:
                    t0 = time.perf_counter()
                    victim = DefendedVictim(
                        victim_model,
                        defence,
                        key_id="thief",
                        outputs=outputs,
                        monitor=Monitor(reference, thresholds=thresholds),
                        reference=reference,
                        secret=secret,
                    )
                    result = _attack(
                        attack,
                        victim,
                        ds,
                        budget=budget,
                        outputs=outputs,
                        epochs=config.student_epochs,
                        seed=config.seed,
                    )
                    stolen = result.student
                    altered, reproduced, p_trace = _trace_p(stolen, victim, keys_tested)
                    row = {
                        "attack": attack,
                        "outputs": outputs,
                        "defence": defence,
                        "budget": budget,
                        "queries": int(result.queries),
                        "accuracy": models.accuracy(stolen, ds.x_test, ds.y_test),
                        "fidelity": float((models.predict(stolen, ds.x_test) == victim_test_labels).mean()),
                        "first_alarm": victim.first_alarm,
                        "refused": victim.refused,
                        "traced_answers": altered,
                        "trace_reproduced": reproduced,
                        "trace_p": p_trace,
                        "named": p_trace <= config.alpha,
                        "seconds": round(time.perf_counter() - t0, 2),
                    }
                    runs.append(row)
                    say(
                        f"{attack:17} {outputs:13} {defence:18} {budget:5}: acc {row['accuracy']:.3f} "
                        f"fid {row['fidelity']:.3f} alarm {row['first_alarm']} trace p {p_trace:.2g}"
                    )
    report: dict[str, Any] = {
        "config": asdict(config),
        "victim": {"dataset": config.dataset, "arch": config.victim_arch, "accuracy": victim_acc},
        "pool_rows": len(ds.x_pool),
        "train_rows": len(ds.x_train),
        "monitor": {
            "thresholds": thresholds.to_dict(),
            "benign_flagged": false_alarms,
            "benign_clients": len(evaluation),
        },
        "benign_cost": benign_cost,
        "runs": runs,
        "torch_threads": torch.get_num_threads(),
    }
    report["queries_to_match"] = _queries_to_match(runs)
    if config.live:
        report["live"] = _live(victim_model, ds, config, say, reference=reference, thresholds=thresholds)
    if config.art:
        report["art"] = _art_rows(victim_model, ds, config, say)
    if config.encoders:
        report["encoders"] = _encoder_study(config, say)
    report["targets"] = _targets(report, config)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _queries_to_match(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (attack, outputs, defence): the smallest budget reaching the undefended 100-query accuracy."""
    out = []
    keys = sorted({(r["attack"], r["outputs"]) for r in runs})
    for attack, outputs in keys:
        base = [r for r in runs if (r["attack"], r["outputs"], r["defence"]) == (attack, outputs, "none")]
        first = min(base, key=lambda r: r["budget"], default=None)
        if first is None:
            continue
        for defence in sorted({r["defence"] for r in runs}):
            rows = sorted(
                (r for r in runs if (r["attack"], r["outputs"], r["defence"]) == (attack, outputs, defence)),
                key=lambda r: r["budget"],
            )
            reach = next((r["budget"] for r in rows if r["accuracy"] >= first["accuracy"]), None)
            out.append(
                {
                    "attack": attack,
                    "outputs": outputs,
                    "defence": defence,
                    "reference_budget": first["budget"],
                    "reference_accuracy": first["accuracy"],
                    "budget_needed": reach,
                    "factor": None if reach is None else reach / first["budget"],
                }
            )
    return out


LIVE_SCENARIOS = ("sybils", "sybils+misinform", "wary-sybils+misinform")
"""Copycat runs through a live gateway: three sybil keys sharing the budget on a gateway with quotas
and tracing only; the same against a tier that misinforms keys the monitor flags; and a wary thief
whose many keys each stop at the monitor's first evaluation."""


def _live(
    model: torch.nn.Module,
    ds: Dataset,
    config: StealingConfig,
    say: Progress,
    *,
    reference: Reference,
    thresholds: Thresholds,
) -> dict[str, Any]:
    import tempfile

    from .. import seal
    from ..keys import Identity

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        identity = Identity.generate()
        identity.save(root / "device.key")
        torch.onnx.export(
            model, (torch.zeros((1, *ds.input_shape)),), str(root / "victim.onnx"), input_names=["x"],
            output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False,
        )  # fmt: skip
        seal(root / "victim.onnx", root / "victim.mseal", recipients=[identity.recipient])
        (root / "victim.onnx").unlink()
        reference.save(root / "reference.npz")
        runs = [
            _live_run(model, ds, config, say, root=root / name, scenario=name, thresholds=thresholds)
            for name in LIVE_SCENARIOS
        ]
    return {"runs": runs}


def _live_run(
    model: torch.nn.Module,
    ds: Dataset,
    config: StealingConfig,
    say: Progress,
    *,
    root: Path,
    scenario: str,
    thresholds: Thresholds,
) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from ..gateway.app import create_app
    from ..gateway.service import Gateway
    from ..gateway.settings import load_config
    from ..gateway.tracing import trace_suspect
    from ..ownership import TorchSuspect
    from .targets import HttpTarget

    budget = min(max(config.budgets), len(ds.x_pool))  # copycat asks each pool row once
    request = 50  # rows per request; a request over a key's remaining quota is refused whole
    if scenario.startswith("wary"):
        # stop each key at the monitor's first evaluation (MonitorConfig.min_queries): a flag raised
        # there acts only on the key's later requests, and there are none
        per_key = MonitorConfig().min_queries
        n_keys = -(-budget // per_key)
    else:
        n_keys = 3
        per_key = -(-budget // (n_keys * request)) * request
    tier: dict[str, Any] = {"per_minute": per_key}
    settings: dict[str, Any] = {}
    if scenario.endswith("misinform"):
        tier["on_alert"] = "misinform"
        settings["monitor"] = {"reference": str(root.parent / "reference.npz"), "thresholds": thresholds.to_dict()}
    gw_config = load_config(
        None,
        model_path=str(root.parent / "victim.mseal"),
        model_identity=str(root.parent / "device.key"),
        data_dir=str(root / "gw"),
        trace_rate=0.01,
        tiers={"default": tier},
        **settings,
    )
    gateway = Gateway(gw_config)
    try:
        tokens = [gateway.store.create(f"sybil-{i}")[1] for i in range(n_keys)]
        with TestClient(create_app(gateway)) as client:
            target = HttpTarget("http://testserver", tokens, outputs="probabilities", batch_size=request, client=client)  # type: ignore[arg-type]  # Starlette's TestClient speaks httpx's API
            student = models.build("mlp", ds.input_shape, ds.num_classes, seed=config.seed + 1)
            result = extraction.copycat(
                target, ds.x_pool, student=student, budget=budget, outputs="probabilities",
                epochs=config.student_epochs, seed=config.seed,
            )  # fmt: skip
            gateway.flush()
        flagged = len(gateway.flagged_keys())
        verdict = trace_suspect(gateway.store, TorchSuspect(result.student, name="stolen"), num_classes=ds.num_classes)
    finally:
        gateway.close()
    victim_labels = models.predict(model, ds.x_test)
    row = {
        "scenario": scenario,
        "attack": "copycat",
        "outputs": "probabilities",
        "sybil_keys": n_keys,
        "per_key_quota": per_key,
        "on_alert": tier.get("on_alert", "alert"),
        "queries": int(result.queries),
        "queries_by_key": {k[:20]: int(v) for k, v in target.queries_by_key.items()},
        "keys_flagged": flagged,
        "accuracy": models.accuracy(result.student, ds.x_test, ds.y_test),
        "fidelity": float((models.predict(result.student, ds.x_test) == victim_labels).mean()),
        "trace": verdict.to_dict(),
    }
    say(
        f"live gateway, {scenario}: {n_keys} keys, {row['queries']} queries, {flagged} flagged, "
        f"accuracy {row['accuracy']:.3f}, trace {verdict.decision}"
    )
    return row


def _art_rows(model: torch.nn.Module, ds: Dataset, config: StealingConfig, say: Progress) -> dict[str, Any]:
    try:
        from . import art_reference
    except ImportError as exc:
        return {"skipped": f"IBM ART is not installed ({exc})"}
    rows = []
    # ART's knockoff "random" is its copycat code (a sample without replacement), so it is not repeated;
    # its adaptive strategy needs the pool's true labels and trains on top-1 labels only (ART's design).
    for attack in ("copycat", "knockoff-adaptive"):
        for outputs in config.outputs if attack == "copycat" else ("labels",):
            for budget in config.budgets:
                r = art_reference.art_extract(
                    model, ds, attack=attack, budget=budget, outputs=outputs, seed=config.seed
                )
                rows.append({"attack": attack, "outputs": outputs, "budget": budget, **r})
                say(f"ART {attack} {outputs} {budget}: acc {r['accuracy']:.3f} fid {r['fidelity']:.3f}")
    # ART 1.20.1's ClassLabels postprocessor marks every class predicted anywhere in a batch (upstream
    # PR #2824), which leaves a thief at chance for the wrong reason: it is left out of the table.
    kept = [p for p in art_reference.POSTPROCESSORS if p != "class_labels"]
    table = art_reference.art_postprocessor_table(
        model, ds, budgets=tuple(b for b in config.budgets if b <= 500), seed=config.seed, postprocessors=(None, *kept)
    )
    say("ART postprocessor table done")
    return {"rows": rows, "postprocessors": art_reference.format_postprocessor_table(table)}


def _encoder_study(config: StealingConfig, say: Progress) -> dict[str, Any]:
    try:
        from . import encoders
    except ImportError as exc:
        return {"skipped": f"encoder study unavailable ({exc})"}
    study: dict[str, Any] = encoders.run_encoder_study(fast=False, seed=config.seed)
    study["table"] = encoders.format_study(study)
    say("encoder study done")
    return study


def _targets(report: dict[str, Any], config: StealingConfig) -> list[dict[str, Any]]:
    runs = report["runs"]
    out: list[dict[str, Any]] = []
    at500 = [r for r in runs if r["budget"] == 500]
    for defence in config.defences:
        if defence == "none":
            continue
        cost = report["benign_cost"][defence]
        rows = [r for r in at500 if r["defence"] == defence]
        if not rows:
            continue
        worst = max(rows, key=lambda r: r["fidelity"])
        out.append(
            {
                "target": f"{defence}: stolen fidelity <= 0.80 at 500 queries with <= 1 point benign loss",
                "met": worst["fidelity"] <= 0.80 and cost <= 0.01,
                "value": f"worst fidelity {worst['fidelity']:.3f} ({worst['attack']}, {worst['outputs']}); "
                f"benign loss {100 * cost:.2f} points",
            }
        )
    for defence in config.defences:
        if defence == "none":
            continue
        rows = [q for q in report["queries_to_match"] if q["defence"] == defence]
        if not rows:
            continue
        slow = [q for q in rows if q["factor"] is None or q["factor"] >= 5]
        out.append(
            {
                "target": f"{defence}: the thief needs >= 5x the queries to reach the undefended 100-query accuracy",
                "met": len(slow) == len(rows),
                "value": f"{len(slow)} of {len(rows)} (attack, output) pairs need >= 5x or never reach it "
                f"within {max(config.budgets)} queries",
            }
        )
    thieves = [r for r in runs if r["attack"] in ("copycat", "knockoff-random") and r["budget"] >= 500]
    flagged = [r for r in thieves if r["first_alarm"] is not None and r["first_alarm"] <= 500]
    mon = report["monitor"]
    out.append(
        {
            "target": "natural-data thieves flagged within 500 queries at <= 1% false positives "
            "over >= 100 benign users",
            "met": bool(thieves)
            and len(flagged) == len(thieves)
            and mon["benign_flagged"] <= 0.01 * mon["benign_clients"]
            and mon["benign_clients"] >= 100,
            "value": f"{len(flagged)}/{len(thieves)} natural-data runs flagged within 500; "
            f"{mon['benign_flagged']}/{mon['benign_clients']} benign flagged",
        }
    )
    for defence in config.defences:  # every defence whose altered answers are recorded for tracing
        if DEFENCES[defence][1] == 0 and ACTIONS.get(defence) != "misinform":
            continue
        traced = [r for r in runs if r["defence"] == defence and r["budget"] == max(config.budgets)]
        out.append(
            {
                "target": f"{defence}: the key a stolen model was extracted through named at p <= 1e-6",
                "met": bool(traced) and all(r["named"] for r in traced),
                "value": f"{sum(r['named'] for r in traced)}/{len(traced)} runs at {max(config.budgets)} queries named",
            }
        )
    return out


def write_stealing_report(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``report.json``, ``report.md``, ``report.html`` and the plots into ``out_dir``."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    runs = report["runs"]
    combos = sorted({(r["attack"], r["outputs"]) for r in runs})
    defences = list(dict.fromkeys(r["defence"] for r in runs))
    cols = min(4, len(combos))
    rows_n = math.ceil(len(combos) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    for ax, (attack, outputs) in zip(axes.flat, combos, strict=False):
        for defence in defences:
            pts = sorted(
                (r["budget"], r["accuracy"])
                for r in runs
                if (r["attack"], r["outputs"], r["defence"]) == (attack, outputs, defence)
            )
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=defence, markersize=3)
        ax.axhline(100 * report["victim"]["accuracy"], color="black", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{attack} ({outputs})", fontsize=9)
        ax.set_xlabel("queries")
        ax.set_ylabel("stolen accuracy (%)")
    for ax in list(axes.flat)[len(combos) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    curves = out / "accuracy-vs-queries.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    budget = 500 if any(r["budget"] == 500 for r in runs) else max(r["budget"] for r in runs)
    for defence in defences:
        at = [r for r in runs if r["defence"] == defence and r["budget"] == budget]
        if at:
            worst = max(r["fidelity"] for r in at)
            ax.scatter(100 * report["benign_cost"][defence], 100 * worst, label=defence)
            ax.annotate(defence, (100 * report["benign_cost"][defence], 100 * worst), fontsize=7)
    ax.axhline(80, color="red", linestyle=":", label="target fidelity 80%")
    ax.axvline(1, color="red", linestyle="--", label="1 point benign loss")
    ax.set_xlabel("benign clients' answers changed (points)")
    ax.set_ylabel(f"worst stolen fidelity at {budget} queries (%)")
    ax.set_title("utility vs protection")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tradeoff = out / "utility-vs-protection.png"
    fig.savefig(tradeoff, dpi=110)
    plt.close(fig)
    md = _markdown(report)
    (out / "report.md").write_text(md, encoding="utf-8")
    images = [curves, tradeoff]
    body = "\n".join(f'<p><img src="{p.name}" alt="{p.stem}"></p>' for p in images)
    import html

    (out / "report.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>Model-stealing lab</title>{body}<pre>{html.escape(md)}</pre>\n",
        encoding="utf-8",
    )
    return [out / "report.json", out / "report.md", out / "report.html", *images]


def _markdown(report: dict[str, Any]) -> str:
    v, mon = report["victim"], report["monitor"]
    lines = [
        "# Model-stealing lab",
        "",
        f"Victim {v['dataset']}/{v['arch']}, test accuracy {v['accuracy']:.4f}; attacker pool "
        f"{report['pool_rows']} natural rows disjoint from the {report['train_rows']} training rows; "
        f"ran in {report.get('seconds', 0):.0f} s on {report['torch_threads']} torch threads.",
        "",
        "## Targets",
        "",
        "| target | met | value |",
        "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {'yes' if t['met'] else '**no**'} | {t['value']} |" for t in report["targets"]]
    lines += [
        "",
        "## Cost to legitimate users",
        "",
        f"Simulated benign clients ({mon['benign_clients']}); share of their answers whose label differs "
        "from the undefended service's:",
        "",
        "| defence | benign answers changed |",
        "|---|---|",
    ]
    lines += [f"| {d} | {100 * c:.2f}% |" for d, c in report["benign_cost"].items()]
    lines += [
        "",
        f"Extraction monitor: {mon['benign_flagged']} of {mon['benign_clients']} held-out benign clients flagged "
        f"(thresholds {mon['thresholds']}).",
        "",
        "## Every run",
        "",
        "| attack | reveals | defence | budget | queries | accuracy | fidelity | first alarm "
        "| traced | reproduced | trace p |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['attack']} | {r['outputs']} | {r['defence']} | {r['budget']} | {r['queries']} | "
            f"{r['accuracy']:.3f} | {r['fidelity']:.3f} | "
            f"{r['first_alarm'] if r['first_alarm'] is not None else '-'} | "
            f"{r['traced_answers']} | {r['trace_reproduced']} | {r['trace_p']:.2g} |"
        )
    lines += [
        "",
        "## Queries needed to reach the undefended 100-query accuracy",
        "",
        "| attack | reveals | defence | budget needed | factor |",
        "|---|---|---|---|---|",
    ]
    for q in report["queries_to_match"]:
        factor = "not reached" if q["factor"] is None else f"{q['factor']:.1f}x"
        lines.append(f"| {q['attack']} | {q['outputs']} | {q['defence']} | {q['budget_needed'] or '-'} | {factor} |")
    if "live" in report:
        lines += [
            "",
            "## Through a live gateway with sybil keys",
            "",
            "Copycat with probabilities through `modelseal serve` (HTTP, in process), its budget spread over "
            "several API keys with a per-key quota; tracing at 1%; where the tier misinforms, the monitor "
            "calibrated as above.",
            "",
            "| scenario | keys x quota | queries | keys flagged | accuracy | fidelity | tracing |",
            "|---|---|---|---|---|---|---|",
        ]
        for live in report["live"]["runs"]:
            trace = live["trace"]
            named = f"named {len(trace['named'])} of {len(trace['keys'])} keys" if trace["named"] else trace["decision"]
            lines.append(
                f"| {live['scenario']} | {live['sybil_keys']} x {live['per_key_quota']} | {live['queries']} | "
                f"{live['keys_flagged']} | {live['accuracy']:.3f} | {live['fidelity']:.3f} | {named} |"
            )
    if "art" in report:
        lines += ["", "## IBM ART reference (same victim, same pool)", ""]
        if "rows" in report["art"]:
            lines += ["| attack | reveals | budget | accuracy | fidelity |", "|---|---|---|---|---|"]
            lines += [
                f"| {r['attack']} | {r['outputs']} | {r['budget']} | {r['accuracy']:.3f} | {r['fidelity']:.3f} |"
                for r in report["art"]["rows"]
            ]
            lines += [
                "",
                "ART's output postprocessors against a copycat thief (accuracy; ClassLabels left out: in ART "
                "1.20.1 it marks every class predicted anywhere in a batch, upstream PR #2824):",
                "",
                report["art"]["postprocessors"],
            ]
        else:
            lines.append(str(report["art"]))
    if "encoders" in report:
        lines += ["", "## Encoder extraction (seed 003)", "", "```", report["encoders"].get("table", ""), "```"]
    return "\n".join(lines) + "\n"
