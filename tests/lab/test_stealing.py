"""The stealing lab's report (issue 7): the fast subset runs end to end, through the CLI, and its
numbers mean what they say."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from modelseal.cli import app


def test_lab_report_fast(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["lab", "report", "--fast", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    for name in ("report.md", "report.html", "accuracy-vs-queries.png", "utility-vs-protection.png"):
        assert (tmp_path / name).stat().st_size > 0
    runs = report["runs"]
    assert {r["defence"] for r in runs} == {"none", "round:1", "coverage+trace:1%"}
    for r in runs:
        assert r["queries"] <= r["budget"] and 0 <= r["fidelity"] <= 1
    # more queries steal a better copy (undefended copycat)
    base = {r["budget"]: r for r in runs if (r["attack"], r["defence"]) == ("copycat", "none")}
    assert base[500]["fidelity"] > base[100]["fidelity"] > 0.5
    # the policies without tracing never change a benign client's label; tracing changes about its rate
    assert report["benign_cost"]["none"] == 0 and report["benign_cost"]["round:1"] < 0.005
    assert 0.002 < report["benign_cost"]["coverage+trace:1%"] < 0.03
    # the monitor flags natural-data thieves early and no held-out benign client
    assert all(r["first_alarm"] is not None and r["first_alarm"] <= 500 for r in runs if r["attack"] == "copycat")
    assert report["monitor"]["benign_flagged"] == 0
    # the live run went through the gateway with three sybil keys, each within its quota
    live = report["live"]
    assert live["sybil_keys"] == 3 and sum(live["queries_by_key"].values()) == live["queries"]
    assert all(q <= live["per_key_quota"] for q in live["queries_by_key"].values())
    assert {t["target"].split(":")[0] for t in report["targets"]}  # targets are reported, met or not


def test_monitor_driven_defences_cap_a_flagged_thief() -> None:
    import dataclasses

    from modelseal.lab.stealing import FAST, run_stealing

    config = dataclasses.replace(
        FAST,
        attacks=("copycat",),
        outputs=("probabilities",),
        defences=("none", "monitor:degrade", "monitor:throttle"),
        budgets=(500,),
        live=False,
    )
    runs = {r["defence"]: r for r in run_stealing(config)["runs"]}
    # flagged at the first evaluation (100 queries): throttling refuses the rest of the budget
    assert runs["monitor:throttle"]["queries"] <= 150 and runs["monitor:throttle"]["refused"] > 0
    assert runs["monitor:throttle"]["fidelity"] < runs["none"]["fidelity"]
    # degrading answers only labels once flagged: every query answered, the copy no better than undefended
    assert runs["monitor:degrade"]["queries"] == 500 and runs["monitor:degrade"]["fidelity"] <= runs["none"]["fidelity"]
