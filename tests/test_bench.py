"""kvroute bench: memory accounting, a tiny end-to-end run, the files it writes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

import kvroute
from kvroute.hf.compat import cache_kwargs
from kvroute.bench import BASELINE, BenchConfig, run_bench, write_report
from kvroute.calibrate import CalibrationConfig, calibrate
from kvroute.cli import main
from kvroute.hf.cache import SharedKVCache, cache_nbytes
from kvroute.models import save_checkpoint
from kvroute.plan import KVShape

LAYERS = 4
PER_LAYER_TOKEN = 2 * 2 * 8 * 4  # K and V, 2 KV heads, head_dim 8, fp32


@pytest.mark.parametrize("spec", ["full", "every:2", "every:4", "layers:0,3"])
def test_preallocated_cache_holds_exactly_the_owners(spec):
    model = kvroute.apply(tiny_model("llama", layers=LAYERS), plan=spec)
    plan, shape = kvroute.get_router(model).plan, KVShape.from_config(model.config)
    cache = SharedKVCache(plan, shape, max_cache_len=12)
    with torch.inference_mode():
        model(input_ids=torch.randint(3, 97, (2, 10)), **cache_kwargs(cache), use_cache=True)
        model(input_ids=torch.randint(3, 97, (2, 2)), **cache_kwargs(cache), use_cache=True)
    expected = len(plan.owners) * PER_LAYER_TOKEN * 12 * 2
    assert cache_nbytes(cache) == plan.kv_bytes(shape, 12, 2, "float32") == expected
    assert cache.used_bytes() == expected  # 10 + 2 tokens fill the preallocation exactly


def test_dynamic_cache_bytes_match_the_full_plan():
    model = tiny_model("llama", layers=LAYERS)
    cache = __import__("transformers").DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.randint(3, 97, (1, 9)), **cache_kwargs(cache), use_cache=True)
    assert cache_nbytes(cache) == LAYERS * PER_LAYER_TOKEN * 9


@pytest.fixture(scope="module")
def report():
    config = BenchConfig(plans="every:1,2,4", contexts=[8, 16], batches=[1, 2], new_tokens=2, repeats=2,
                         warmup=0, kv_budget=LAYERS * PER_LAYER_TOKEN * 18 * 3)  # full fits batch 3 at ctx 16
    return run_bench(config, model=tiny_model("llama", layers=LAYERS), progress=False)


def test_bench_rows_and_ratios(report):
    rows = {(r["context"], r["batch"], r["plan"]): r for r in report.rows}
    assert len(report.rows) == 2 * 2 * 4  # contexts x batches x (hf + 3 plans)
    for c in (8, 16):
        for b in (1, 2):
            full, hf = rows[(c, b, "every:1")], rows[(c, b, BASELINE)]
            assert full["kv_bytes"] == hf["kv_bytes"] == LAYERS * PER_LAYER_TOKEN * (c + 2) * b
            for spec, owners in (("every:2", 2), ("every:4", 1)):
                r = rows[(c, b, spec)]
                assert r["owners"] == owners
                assert r["kv_bytes"] == r["kv_expected_bytes"]
                assert r["kv_vs_full"] == owners / LAYERS
                assert r["ttft_ms"] > 0 and r["decode_tok_s"] > 0 and len(r["decode_tok_s_all"]) == 2
                assert r["decode_vs_full"] == pytest.approx(r["decode_tok_s"] / full["decode_tok_s"])
    # capacity: L/|S| times the full plan's at a fixed KV budget
    assert rows[(16, 1, "every:1")]["max_batch"] == 3
    assert rows[(16, 1, "every:2")]["max_batch"] == 6
    assert rows[(16, 1, "every:4")]["max_batch"] == 12
    assert rows[(16, 1, "every:4")]["peak_mb"] > 0
    assert not any(r["calibrated"] for r in report.rows)  # a model passed in carries no calibration


def test_bench_meta_records_the_setup(report):
    meta = report.meta
    assert meta["shape"]["layers"] == LAYERS and meta["shape"]["kv_heads"] == 2 and meta["shape"]["head_dim"] == 8
    assert meta["dtype"] == "float32" and meta["threads"] == torch.get_num_threads()
    assert meta["torch"] == torch.__version__ and "OMP_WAIT_POLICY" in meta["env"]
    from kvroute.precision import cpu_has_fast_bf16, cpu_model

    # timings differ several-fold between CPUs with and without native bf16: the report says which
    assert meta["cpu"] == cpu_model() and meta["cpu_fast_bf16"] is cpu_has_fast_bf16()


def test_write_report_files(report, tmp_path):
    paths = write_report(report, tmp_path, command="kvroute bench tiny")
    data = json.loads(paths["json"].read_text())
    assert data["meta"]["command"] == "kvroute bench tiny"
    assert {r["plan"] for r in data["rows"]} == {"hf", "every:1", "every:2", "every:4"}
    assert data["config"]["new_tokens"] == 2
    md = paths["md"].read_text()
    assert "| 16 | 2 | every:4 | 1 |" in md and "0.250x" in md and "max batch @" in md and "Best repeat" in md
    assert f"- CPU {report.meta['cpu']} x " in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_below_one_sequence_is_reported_not_raised():
    config = BenchConfig(plans=["full", "every:4"], contexts=[8], new_tokens=1, repeats=1, warmup=0,
                         kv_budget=10, baseline=False)
    model = tiny_model("llama", layers=LAYERS)
    report = run_bench(config, model=model, progress=False)
    assert not kvroute.is_routed(model)  # the baseline stays the unmodified model
    assert [r["max_batch"] for r in report.rows] == [0, 0]
    assert "0 (batch 1 does not fit)" in report.table()


@pytest.mark.parametrize("kwargs, match", [
    ({"contexts": [0]}, "--context"),
    ({"batches": []}, "--batch"),
    ({"repeats": 0}, "--repeats"),
    ({"kv_budget": -1}, "--kv-budget"),
    ({"kv_budget": "lots"}, "--kv-budget: cannot read memory size 'lots'"),
    ({"contexts": "8,x"}, "--context: expected comma-separated integers"),
    ({"plans": [], "baseline": False}, "nothing to benchmark"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**kwargs)


def test_config_reads_sizes_and_comma_lists():
    config = BenchConfig(plans="full,every:2", contexts="8,16", batches=2, kv_budget="1KiB", kv_quant="none,int8")
    assert (config.plans, config.contexts, config.batches) == (["full", "every:2"], [8, 16], [2])
    assert config.kv_budget == 1024 and config.kv_quant == ["none", "int8"]


def test_bad_plan_for_the_model():
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        run_bench(BenchConfig(plans=["layers:0,9"], contexts=[4]), model=tiny_model("llama"), progress=False)


def test_a_checkpoint_folder_runs_its_calibrated_plans_calibrated(tmp_path):
    model = kvroute.apply(tiny_model("llama", layers=LAYERS))
    data = torch.randint(3, 97, (24, 32), generator=torch.Generator().manual_seed(0))
    calibrate(model, "every:2", data, CalibrationConfig(tokens=1024, chunk_tokens=32, val_fraction=0.25),
              progress=False)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    config = BenchConfig(model=str(ckpt), plans="full,every:2,every:4", contexts=[8], new_tokens=2, repeats=1,
                         warmup=0)
    report = run_bench(config, progress=False)
    assert {r["plan"]: r["calibrated"] for r in report.rows} == {
        BASELINE: False, "full": False, "every:2": True, "every:4": False}
    assert "| 8 | 1 | every:2 (cal) | 2 |" in report.table() and "| 8 | 1 | every:4 | 1 |" in report.table()
    # random weights of the same config: the calibration does not apply
    report = run_bench(BenchConfig(**{**config.__dict__, "random_weights": True}), progress=False)
    assert not any(r["calibrated"] for r in report.rows)


def test_cli_on_a_checkpoint_folder(tmp_path, capsys):
    tiny_model("qwen3", layers=LAYERS).save_pretrained(tmp_path / "ckpt")
    rc = main(["bench", str(tmp_path / "ckpt"), "--plans", "full,every:2", "--context", "8", "--batch", "1",
               "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--kv-budget", "1KiB",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "every:2" in out and "hf" in out
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["meta"]["weights"] == "checkpoint" and data["meta"]["shape"]["model_type"] == "qwen3"
    assert data["meta"]["command"].startswith("kvroute ")


def test_max_overlap_counts_requests_running_at_once():
    from kvroute.serving_bench import max_overlap

    assert max_overlap([]) == 0
    assert max_overlap([(0, 1), (2, 3)]) == 1  # one after the other
    assert max_overlap([(0, 4), (1, 2), (1.5, 5), (4.5, 6)]) == 3
    assert max_overlap([(0, 1), (1, 2)]) == 2  # a request that starts as another ends counts with it


def test_serving_bench_rejects_bad_input_before_any_engine(tmp_path):
    from kvroute.serving_bench import ServingBenchConfig

    with pytest.raises(FileNotFoundError, match="needs a checkpoint folder"):
        ServingBenchConfig(checkpoint=str(tmp_path / "none"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--requests must be positive"):
        ServingBenchConfig(checkpoint=str(tmp_path), requests=0)
    with pytest.raises(ValueError, match="--plans"):
        ServingBenchConfig(checkpoint=str(tmp_path), plans="")
    with pytest.raises(ValueError, match="--kv-cache-memory: cannot read memory size"):
        ServingBenchConfig(checkpoint=str(tmp_path), kv_cache_memory="lots")
    assert ServingBenchConfig(checkpoint=str(tmp_path)).kv_cache_memory == 64 * 2**20


def test_the_library_leaves_threads_alone_and_records_them():
    import torch

    before = torch.get_num_threads()
    config = BenchConfig(plans=["full"], contexts=[8], new_tokens=1, repeats=1, warmup=0, baseline=False,
                         threads=1 if before != 1 else 2)
    report = run_bench(config, model=tiny_model("llama", layers=LAYERS), progress=False)
    assert torch.get_num_threads() == before  # only the command line entry point sets threads
    assert report.meta["threads"] == before  # and the report says what the run had


def test_bench_command_sets_threads_once(monkeypatch):
    import torch

    import kvroute.bench
    from kvroute.cli import main

    seen: list[int] = []

    def fake(config, **_):
        seen.append(torch.get_num_threads())
        raise ValueError("stopped before measuring")

    monkeypatch.setattr(kvroute.bench, "run_bench", fake)
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        assert main(["bench", "--plans", "full", "--threads", str(want)]) == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [want]
