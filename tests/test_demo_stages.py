"""The demo's stages (scripts/demo.py): their order and needs, and what each worker runs, with the
training, calibration and evaluation calls recorded instead of run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kvroute.pairs import PAIRS_FILE

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# loaded from their files: scripts/ is not a package
DEMO = _load("kvroute_demo_script_stages", ROOT / "scripts" / "demo.py")
JOBS = _load("kvroute_script_jobs_stages", ROOT / "scripts" / "jobs.py")


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """The demo module writing into tmp_path, with two years of fake State of the Union text, and a list
    that records each finetune / calibrated / evaluate call."""
    sotu = tmp_path / "sotu"
    sotu.mkdir()
    for year in (1990, 2006, 2007):
        (sotu / f"{year}_someone.txt").write_text("text")
    monkeypatch.setattr(DEMO, "SOTU", sotu)
    monkeypatch.setattr(DEMO, "OUT", tmp_path / "out")
    monkeypatch.setattr(DEMO, "TEXT_STEPS", 80)  # whatever DEMO_TEXT_STEPS says
    calls = []
    monkeypatch.setattr(DEMO, "finetune", lambda name, model, data, **kw: calls.append(("finetune", name, Path(model),
                                                                                         len(data), kw)))
    monkeypatch.setattr(DEMO, "calibrated", lambda name, ckpt, files, pairs=False: calls.append(
        ("calibrated", name, Path(ckpt), pairs)))
    import kvroute.evaluate

    monkeypatch.setattr(kvroute.evaluate, "evaluate", lambda config: calls.append(
        ("evaluate", [Path(c) for c in config.checkpoints], config.plans, Path(config.out))))
    return DEMO, calls


@pytest.mark.parametrize("text_steps", [80, 0])
def test_the_stages_form_a_valid_schedule(monkeypatch, text_steps):
    monkeypatch.setattr(DEMO, "TEXT_STEPS", text_steps)
    plan = DEMO.stages()
    JOBS._check_needs(list(plan), {n: need for n, (need, _) in plan.items()})  # each need is a stage listed before
    assert [n for n, (_, alone) in plan.items() if alone] == ["pairs"]
    assert ("text" in plan) == bool(text_steps)
    assert plan["eval-rcla"][0] == (("text",) if text_steps else ("mix",))


def test_each_stage_runs_from_what_the_stage_it_needs_wrote(demo, tmp_path):
    module, calls = demo
    out = tmp_path / "out"
    final = out / "rcla-mix-text" / "final"  # as the text stage leaves it
    final.mkdir(parents=True)
    for name in ("model.safetensors", PAIRS_FILE):
        (final / name).write_text(name)
    runner = module.Demo()
    for stage in module.stages():
        runner.run(stage)
    by_stage = dict(zip(module.stages(), calls[:6]))
    assert by_stage["pairs"] == ("calibrated", "base", module.MODEL, True)
    assert by_stage["mix"][:4] == ("finetune", "rcla-mix", out / "base-pairs", 3)  # SOTU 1990, 2006 + QA records
    assert by_stage["text"][:4] == ("finetune", "rcla-mix-text", out / "rcla-mix" / "final", 2)  # SOTU alone
    assert by_stage["standard"][:3] == ("finetune", "standard", module.MODEL)
    assert by_stage["cal-base"] == ("calibrated", "base", module.MODEL, False)
    assert by_stage["cal-standard"] == ("calibrated", "standard", out / "standard" / "final", False)
    evals = calls[6:]
    assert len(evals) == 9  # three models x (every plan, full-cache QA and continuations, calibrated plans)
    rcla = [e for e in evals if e[3].parent.name == "rcla"]
    assert [e[1] for e in rcla] == [[out / "rcla-mix-text-nomaps"]] * 2 + [[out / "rcla-mix-text" / "final"]]
    # the same weights without the pairwise maps, linked for the evaluation
    assert sorted(f.name for f in (out / "rcla-mix-text-nomaps").iterdir()) == ["model.safetensors"]
    assert [e[1] for e in evals if e[3].parent.name == "standard"][2] == [out / "standard-cal"]
    # the report reads the rows back from exactly these folders
    assert sorted(str(e[3].relative_to(out)) for e in evals) == sorted(
        f"eval/{m}/{k}" for m in ("base", "standard", "rcla") for k in ("plans", "full", "calibrated"))


def test_an_unknown_stage_is_refused(demo):
    module, calls = demo
    with pytest.raises(SystemExit, match="unknown stage 'train'"):
        module.Demo().run("train")
    assert calls == []


def test_the_report_reads_every_row_and_every_plan_that_failed(demo, tmp_path):
    import json

    module, _ = demo
    runner = module.Demo()
    for model in ("base", "standard", "rcla"):
        for kind in ("plans", "full", "calibrated"):  # results.json as kvroute.results.ResultWriter writes it
            checkpoint = runner.checkpoints[{"base": "base", "standard": "standard+cal", "rcla": "rcla-mix+pairs"}[model]]
            errors = ([{"checkpoint": checkpoint, "plan": "every:4", "error": "RuntimeError: boom"}]
                      if (model, kind) == ("rcla", "calibrated") else [])
            folder = tmp_path / "out" / "eval" / model / kind
            folder.mkdir(parents=True)
            (folder / "results.json").write_text(json.dumps(
                {"rows": [{"checkpoint": checkpoint, "plan": "every:2", "metric": "loss", "value": 1.0}],
                 "errors": errors}))
    rows, errors = runner.results()
    assert len(rows) == 9 and {r["checkpoint"] for r in rows} == {"base", "standard+cal", "rcla-mix+pairs"}
    assert errors == [{"checkpoint": "rcla-mix+pairs", "plan": "every:4", "error": "RuntimeError: boom"}]
