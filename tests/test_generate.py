"""kvroute.generate: the continuation's distinct-2 and whether its plan ran calibrated."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from textkit import greedy_without_cache, make_tokenizer

import kvroute
from kvroute.calibrate import CalibrationConfig, calibrate
from kvroute.generate import generate
from kvroute.metrics import distinct_n

FAST = CalibrationConfig(tokens=1024, chunk_tokens=32, val_fraction=0.25, batch_size=8)
PROMPT = "w3 w4 w5"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok")))


def test_distinct2_and_calibrated_per_plan(tokenizer):
    model = kvroute.apply(tiny_model("llama", layers=4, seed=2))
    data = torch.randint(3, 97, (24, 32), generator=torch.Generator().manual_seed(0))
    calibrate(model, "every:2", data, FAST, progress=False)
    prompt = tokenizer(PROMPT)["input_ids"]
    for plan, calibrated in (("full", False), ("every:2", True), ("every:4", False)):
        result = generate(model, tokenizer, PROMPT, plan=plan, max_new_tokens=12)
        kvroute.set_plan(model, plan)
        expected = greedy_without_cache(model, prompt, 12, tokenizer.eos_token_id)
        assert result.new_tokens == len(expected) >= 4, plan
        assert result.distinct2 == distinct_n(expected, 2), plan  # the continuation only, not the prompt
        assert result.calibrated is calibrated, plan
        summary = result.summary()
        assert f"distinct-2 {result.distinct2:.2f}" in summary and f"plan {plan}:" in summary
        assert summary.endswith(", calibrated") is calibrated, summary


def test_a_degenerate_loop_has_low_distinct2(tokenizer):
    model = kvroute.apply(tiny_model("llama", layers=4))
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0: greedy repeats token 0 forever
    result = generate(model, tokenizer, PROMPT, plan="every:2", max_new_tokens=9)
    assert result.new_tokens == 9 and result.distinct2 == pytest.approx(1 / 8)
    assert "distinct-2 0.12" in result.summary() and not result.calibrated
