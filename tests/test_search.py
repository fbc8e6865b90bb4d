"""Plan search: a valid plan with the requested owners, never worse than every:k, deterministic."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from textkit import make_model_dir, write_corpus
from textkit import write_qa as write_qa_file

import kvroute
from kvroute.cli import main
from kvroute.data.text import read_texts
from kvroute.search import PlanScorer, calibration_chunks, search_plan, uniform_plans
from kvroute.search_run import SearchConfig, search_checkpoint, split_heldout

LAYERS = 8


def _chunks(n: int = 4, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return kvroute.apply(tiny_model("llama", layers=LAYERS, seed=1), plan="every:2")


@pytest.mark.parametrize("owners, uniform", [(2, "every:4"), (4, "every:2")])
def test_search_returns_a_valid_plan_no_worse_than_every_k(model, owners, uniform):
    chunks = _chunks()
    before = kvroute.set_plan(model, "every:2")
    result = search_plan(model, chunks[:2], owners, heldout=chunks[2:], progress=False)
    assert kvroute.get_router(model).plan == before  # the model's plan is restored
    assert result.plan.spec.startswith("layers:")
    assert len(result.plan.owners) == owners and result.plan.owners[0] == 0
    assert kvroute.SharingPlan.from_spec(result.plan.spec, LAYERS) == result.plan
    scorer = PlanScorer(model, chunks[:2])  # a fresh scorer: no shared cache with the search
    every_k = kvroute.SharingPlan.from_spec(uniform, LAYERS)
    assert result.loss == pytest.approx(scorer.loss(result.plan.owners))
    assert result.loss <= scorer.loss(every_k.owners)
    plans = [r["plan"] for r in result.rows]
    assert plans == ["full", uniform, result.plan.spec]
    assert all(r["heldout_loss"] is not None for r in result.rows)
    assert uniform in result.table()


def test_search_is_deterministic(model):
    chunks = _chunks(2, seed=3)
    first = search_plan(model, chunks, 3, progress=False)
    second = search_plan(model, chunks, 3, progress=False)
    assert (first.plan, first.loss, first.evaluations) == (second.plan, second.loss, second.evaluations)


def test_scorer_caches_losses(model):
    scorer = PlanScorer(model, _chunks(2))
    scorer.loss((0, 4))
    scorer.cache[(0, 4)] = -1.0  # a cached loss is not recomputed
    assert scorer.loss([4, 0]) == -1.0


def test_beam_and_shortlist_and_removal(model):
    chunks = _chunks(2)
    exhaustive = search_plan(model, chunks, 6, refine=0, progress=False)  # 6 > 8 // 2: greedy removal
    lazy = search_plan(model, chunks, 6, shortlist=2, refine=0, progress=False)
    beam = search_plan(model, chunks, 2, beam=3, progress=False)
    assert len(exhaustive.plan.owners) == len(lazy.plan.owners) == 6 and len(beam.plan.owners) == 2
    assert lazy.evaluations < exhaustive.evaluations


def test_search_on_an_rcla_model_and_mixed_attention():
    rcla = kvroute.apply(tiny_model("qwen3", layers=4), policy="rcla", plan="full")
    assert len(search_plan(rcla, _chunks(2), 2, progress=False).plan.owners) == 2
    gemma = kvroute.apply(tiny_model("gemma3_text", layers=6))  # layers 0 and 2 start their types
    result = search_plan(gemma, _chunks(2), 3, progress=False)
    assert {0, 2} <= set(result.plan.owners) and len(result.plan.owners) == 3


@pytest.mark.parametrize("owners, match", [(0, "between 1 and 8"), (9, "between 1 and 8")])
def test_bad_owner_count(model, owners, match):
    with pytest.raises(ValueError, match=match):
        search_plan(model, _chunks(2), owners, progress=False)


def test_uniform_plans():
    assert [p.spec for p in uniform_plans(30, 8)] == ["every:4"]
    assert [p.spec for p in uniform_plans(30, 15)] == ["every:2"]
    assert len(uniform_plans(30, 7)[0].owners) == 7


def test_calibration_chunks_are_evenly_spaced(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_model_dir(tmp_path / "m"))
    texts = read_texts([write_corpus(tmp_path / "corpus", docs=4, length=50)])
    assert len(texts) == 4
    all_chunks = calibration_chunks(tok, texts, chunk_tokens=10)
    assert all_chunks.shape == (20, 10)  # 4 x (50 words + eos) = 204 tokens
    some = calibration_chunks(tok, texts, chunk_tokens=10, max_chunks=4)
    assert torch.equal(some, all_chunks[[0, 5, 10, 15]])
    with pytest.raises(ValueError, match="fewer than one chunk"):
        calibration_chunks(tok, ["w1 w2"], chunk_tokens=10)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_texts([tmp_path / "missing.txt"])


def test_cli_search(tmp_path, capsys):
    folder = make_model_dir(tmp_path / "m", layers=4)
    corpus = write_corpus(tmp_path / "corpus", docs=4, length=50)
    rc = main(["plan", "search", str(folder), "--budget", "0.5", "--data", str(corpus), "--chunk-tokens", "16",
               "--max-chunks", "4", "--out", str(tmp_path / "r.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "plan: layers:0," in out and "every:2" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["plan"]["owners"]) == 2 and data["chunks"] == 4
    assert data["rows"][-1]["heldout_loss"] is not None


@pytest.mark.parametrize("budget, match", [("5", "above full"), ("1.5", "at most 1.0"), ("0", "below the sparsest"),
                                           ("0.05", "below 1 owner layer"), ("1MiB", "needs a context")])
def test_cli_search_bad_budget(tmp_path, capsys, budget, match):
    folder = make_model_dir(tmp_path / "m", layers=4)
    corpus = write_corpus(tmp_path / "corpus", docs=2, length=50)
    assert main(["plan", "search", str(folder), "--budget", budget, "--data", str(corpus)]) == 2
    assert match in capsys.readouterr().err


def test_cli_search_needs_weights(capsys):
    assert main(["plan", "search", "smollm2-135m", "--budget", "0.5", "--data", "x.txt"]) == 2
    assert "needs a checkpoint" in capsys.readouterr().err


def test_split_heldout():
    chunks = _chunks(n=4)
    search, held = split_heldout(chunks, 0.5)
    assert torch.equal(search, chunks[:2]) and torch.equal(held, chunks[2:])
    search, held = split_heldout(chunks, 0.0)
    assert torch.equal(search, chunks) and held is None
    search, held = split_heldout(chunks[:1], 0.9)  # at least one chunk is searched on
    assert len(search) == 1 and held is None
    with pytest.raises(ValueError, match="--heldout must be in"):
        split_heldout(chunks, 1.0)


def test_search_checkpoint_reports_and_saves(tmp_path):
    folder = make_model_dir(tmp_path / "m", layers=4)
    corpus = write_corpus(tmp_path / "corpus", docs=4, length=50)
    lines: list[str] = []
    config = SearchConfig(str(folder), "0.5", [str(corpus)], chunk_tokens=16, max_chunks=4)
    run = search_checkpoint(config, progress=False, log=lines.append)
    assert lines == ["searching 2/4 owner layers on 2 chunks of 16 tokens (2 held out)"]
    assert run.chunks == 4 and run.heldout_chunks == 2 and len(run.result.plan.owners) == 2
    report = run.report()
    assert report.startswith(run.result.table()) and report.endswith(f"plan: {run.result.plan.spec}")
    assert f"\n\n{run.result.evaluations} plans evaluated\n" in report
    saved = json.loads(run.save(tmp_path / "r.json").read_text())
    assert saved == json.loads(json.dumps(run.to_dict()))
    assert saved["model"] == str(folder) and saved["budget"] == "0.5" and saved["data"] == [str(corpus)]
    assert saved["chunks"] == 4 and saved["chunk_tokens"] == 16 and saved["plan"]["owners"] == list(
        run.result.plan.owners)
    with pytest.raises(ValueError, match="--heldout"):
        SearchConfig(str(folder), "0.5", [str(corpus)], heldout=-0.1)


def test_search_on_qa_answers(tmp_path):
    """--qa: the loss searched is on the answers of the records, after eval's prompt; held-out records
    score the table; a bf16 search runs under autocast and still returns a plan of the budget."""
    from kvroute.data.qa import answer_batches, read_qa
    from kvroute.models import load, load_tokenizer

    folder = make_model_dir(tmp_path / "m", layers=4)
    qa = write_qa_file(tmp_path / "qa.jsonl", n=12)
    lines: list[str] = []
    run = search_checkpoint(SearchConfig(str(folder), "0.5", qa=[str(qa)], max_records=6, batch_size=4),
                            progress=False, log=lines.append)
    assert lines == ["searching 2/4 owner layers on the answers of 3 QA records (3 held out)"]
    assert run.objective == "qa" and run.chunks == 6 and run.heldout_chunks == 3
    assert "loss on: the answers of 3 QA records (3 held out)" in run.report()
    saved = run.to_dict()
    assert saved["objective"] == "qa" and saved["data"] == [str(qa)] and saved["heldout_chunks"] == 3
    assert saved["chunk_tokens"] is None
    records = read_qa([str(qa)])
    chosen = [records[i] for i in (0, 2, 4)]  # 6 of 12, evenly spaced; the first 3 searched on
    model, tok = load(str(folder)), load_tokenizer(str(folder))
    expected = PlanScorer(model, answer_batches(chosen, tok)).loss(run.result.plan.owners)
    assert run.result.loss == pytest.approx(expected, rel=1e-5)
    held = PlanScorer(model, answer_batches([records[i] for i in (6, 8, 10)], tok))
    assert run.result.rows[-1]["heldout_loss"] == pytest.approx(held.loss(run.result.plan.owners), rel=1e-5)
    everything = search_checkpoint(SearchConfig(str(folder), "0.5", qa=[str(qa)], heldout=0.0), progress=False)
    assert everything.chunks == 12 and everything.heldout_chunks == 0  # --qa reads every record by default
    bf16 = search_checkpoint(SearchConfig(str(folder), "0.5", qa=[str(qa)], max_records=6, precision="bf16"),
                             progress=False)
    assert len(bf16.result.plan.owners) == 2 and bf16.result.loss != run.result.loss


def test_cli_search_on_qa(tmp_path, capsys):
    folder = make_model_dir(tmp_path / "m", layers=4)
    qa = write_qa_file(tmp_path / "qa.jsonl")
    assert main(["plan", "search", str(folder), "--budget", "2", "--qa", str(qa), "--max-records", "4",
                 "--precision", "bf16", "--out", str(tmp_path / "r.json")]) == 0
    assert "loss on: the answers of 2 QA records (2 held out)" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["objective"] == "qa"
    assert main(["plan", "search", str(folder), "--budget", "2", "--qa", str(qa), "--data", str(qa)]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, match", [("beam", 0, "--beam must be at least 1"),
                                                 ("shortlist", 0, "--shortlist must be at least 1"),
                                                 ("refine", -1, "--refine must be >= 0"),
                                                 ("data", [], "--data: give at least one"),
                                                 ("precision", "fp16", "precision"),
                                                 ("max_records", 0, "--max-records must be at least 1"),
                                                 ("max_records", 4, "--max-records applies to --qa")])
def test_search_config_errors_name_the_flag(field, value, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(**{"model": "m", "budget": "0.5", "data": ["d"], field: value})


def test_cli_search_config_file(tmp_path, monkeypatch, capsys):
    import kvroute.search_run

    seen: list[SearchConfig] = []

    def fake(config, **_):
        seen.append(config)
        raise ValueError("stopped before loading")

    monkeypatch.setattr(kvroute.search_run, "search_checkpoint", fake)
    (tmp_path / "s.toml").write_text('budget = "0.25"\ndata = ["a.txt"]\nbeam = 3\nkv_dtype = "fp32"\n')
    assert main(["plan", "search", "m", "--config", str(tmp_path / "s.toml"), "--beam", "2", "--dtype", "int8"]) == 2
    assert seen == [SearchConfig("m", "0.25", ["a.txt"], beam=2, kv_dtype="int8")]  # flags win over the file
    assert main(["plan", "search", "m", "--data", "a.txt"]) == 2
    assert "--budget: required" in capsys.readouterr().err
