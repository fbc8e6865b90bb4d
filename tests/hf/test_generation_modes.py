"""Every generation mode under every family and plan: decoding through kvroute's cache gives what the
same mode gives with no cache at all (a full forward per step), or what plain greedy gives."""

from __future__ import annotations

import pytest
import torch

import kvroute
from conftest import FAMILIES, tiny_model
from kvroute.hf.compat import CACHE_ARG

PLANS = ["full", "every:2", "layers:0,1,2,4"]  # the last: uneven groups (6 layers; Gemma3 keeps layer 2)
PROMPT = 12  # past Gemma3's sliding window of 8
NEW = 8


def prompt_ids(batch: int = 1, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 97, (batch, PROMPT // 2), generator=torch.Generator().manual_seed(seed))
    return torch.cat([ids, ids], dim=1)  # repeats, so prompt lookup finds drafts


@pytest.fixture(scope="module", params=[(f, p) for f in FAMILIES for p in PLANS], ids=lambda fp: f"{fp[0]}-{fp[1]}")
def model(request):
    family, plan = request.param
    return kvroute.apply(tiny_model(family, layers=6), plan=plan)


def generate(model, ids, cached: bool = True, seed: int | None = None, **kwargs) -> torch.Tensor:
    if seed is not None:
        torch.manual_seed(seed)
    defaults = dict(max_new_tokens=NEW, pad_token_id=0, do_sample=False, use_cache=cached)
    return model.generate(ids, attention_mask=kwargs.pop("attention_mask", torch.ones_like(ids)),
                          **{**defaults, **kwargs})


MODES = {
    "greedy": {},
    "sampling with a seed": dict(do_sample=True, top_k=20, temperature=0.9, seed=7),
    "beam search": dict(num_beams=3),
    "several sequences": dict(do_sample=True, num_return_sequences=3, seed=3),
    "beam search, several sequences": dict(num_beams=3, num_return_sequences=2),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mode_equals_no_cache(model, mode):
    kwargs = MODES[mode]
    ids = prompt_ids()
    assert torch.equal(generate(model, ids, **kwargs), generate(model, ids, cached=False, **kwargs))


@pytest.mark.parametrize("mode", ["assisted", "prompt lookup"])
def test_draft_modes_equal_greedy(model, mode):
    ids = prompt_ids()
    extra = {"prompt_lookup_num_tokens": 3} if mode == "prompt lookup" else {
        "assistant_model": kvroute.apply(tiny_model(model.config.model_type, layers=6, seed=1),
                                         plan=kvroute.get_router(model).plan.spec)}
    assert torch.equal(generate(model, ids, **extra), generate(model, ids))


def test_left_padded_batch_equals_each_row_alone(model):
    short, long = prompt_ids(seed=1)[:, 2:], prompt_ids(seed=2)
    batch = torch.zeros(2, PROMPT, dtype=torch.long)
    mask = torch.zeros_like(batch)
    batch[0, 2:], mask[0, 2:] = short[0], 1
    batch[1], mask[1] = long[0], 1
    out = generate(model, batch, attention_mask=mask)
    for row, start, alone in ((0, 2, generate(model, short)[0]), (1, 0, generate(model, long)[0])):
        got = out[row, start:]
        assert torch.equal(got[: len(alone)], alone)  # a row that met EOS alone is padded in the batch
        assert (got[len(alone):] == 0).all()


def test_reusing_a_returned_cache_continues_like_one_call(model):
    """As ``continue_final_message`` chat reuse does: generate, append a user turn, go on with the cache."""
    ids = prompt_ids()
    first = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                           pad_token_id=0, return_dict_in_generate=True)
    cache = getattr(first, CACHE_ARG, None) or first.past_key_values
    turn = torch.cat([first.sequences, prompt_ids(seed=4)[:, :3]], dim=1)
    reused = model.generate(turn, attention_mask=torch.ones_like(turn), max_new_tokens=NEW, do_sample=False,
                            pad_token_id=0, **{CACHE_ARG: cache})
    assert torch.equal(reused, generate(model, turn, cached=False))
