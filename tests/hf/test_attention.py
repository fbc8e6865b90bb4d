"""Routed attention on tiny HF models: identity, cached decode, generate, training paths, gradients."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.cache_utils import DynamicCache

import kvroute
from kvroute.hf.compat import cache_kwargs, output_cache
from conftest import FAMILIES, record_routes, tiny_config, tiny_model
from kvroute.hf.cache import DummyLayer, SharedKVCache
from kvroute.plan import KVShape
from kvroute.policy import RoutingPolicy

VOCAB = 97
# valid for every family; with six layers Gemma3's types are [S, S, F, S, S, F]
PLANS = ["full", "every:2", "every:3", "keep:0.5", "layers:0,2,3", "groups:2,3,1", "source:0,0,2,1,3,2"]


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


@dataclass(frozen=True)
class Fixed(RoutingPolicy):
    """A test policy that always draws the same route."""

    route: tuple[int, ...] = ()

    def sample(self, num_layers, layer_types, generator):
        return self.route


def count_kv_calls(model) -> dict[str, list[int]]:
    """Record which layers run their k_proj / v_proj, in call order."""
    calls: dict[str, list[int]] = {"k": [], "v": []}
    for i, layer in enumerate(model.model.layers):
        for name in ("k", "v"):
            proj = getattr(layer.self_attn, f"{name}_proj")
            proj.register_forward_hook(lambda *_, name=name, i=i: calls[name].append(i))
    return calls


# ------------------------------------------------------------------ identity
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_plan_is_the_unmodified_model(family, attn):
    model = tiny_model(family, layers=4, attn=attn)
    ids = tokens(2, 12)
    with torch.no_grad():
        ref = model(ids).logits
        ref_train = model.train()(ids, labels=ids)
    model.eval()
    kvroute.apply(model, policy="none", plan="full")
    assert all(type(layer.self_attn).__name__ == "RoutedAttention" for layer in model.model.layers)
    with torch.no_grad():
        close(model(ids).logits, ref)
        close(model(ids, use_cache=False).logits, ref)
        train = model.train()(ids, labels=ids)
    close(train.logits, ref_train.logits)
    close(train.loss, ref_train.loss)


def test_routing_changes_the_logits(family):
    # the equivalence tests below would pass trivially if the plan were ignored
    model = kvroute.apply(tiny_model(family, layers=6), plan="full")
    ids = tokens(1, 10)
    with torch.no_grad():
        full = model(ids).logits
        kvroute.set_plan(model, "every:3")
        shared = model(ids).logits
    assert (full - shared).abs().max() > 1e-3


# ------------------------------------------------------------- cached decode
def decode_logits(model, ids: torch.Tensor, prefill: int, cache=None) -> torch.Tensor:
    """Prefill ``prefill`` tokens, then decode the rest one by one; logits of every position."""
    out = model(ids[:, :prefill], **cache_kwargs(cache), use_cache=True)
    logits = [out.logits]
    cache = output_cache(out)
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
        cache = output_cache(out)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("spec", PLANS)
def test_decode_matches_full_forward(family, spec):
    model = kvroute.apply(tiny_model(family, layers=6), plan=spec)
    ids = tokens(2, 14)  # longer than Gemma3's sliding window (8)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        close(decode_logits(model, ids, prefill=5), full)
        cache = SharedKVCache.for_model(model, max_cache_len=14)
        close(decode_logits(model, ids, prefill=3, cache=cache), full)
    assert cache.get_seq_length() == 14


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_caller_cache_is_kept_across_calls(family, attn):
    # a loop that keeps passing its own DynamicCache, as with an unrouted model
    model = kvroute.apply(tiny_model(family, layers=6, attn=attn), plan="every:2")
    ids = tokens(2, 12)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        logits = [model(ids[:, :4], **cache_kwargs(cache)).logits]
        for t in range(4, 12):
            logits.append(model(ids[:, t : t + 1], **cache_kwargs(cache)).logits)
    close(torch.cat(logits, dim=1), full)
    owners = kvroute.get_router(model).plan.owners
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, DummyLayer) == (i not in owners)


def test_stale_cache_after_set_plan_raises():
    model = kvroute.apply(tiny_model("llama", layers=4), plan="every:2")
    ids = tokens(1, 6)
    with torch.no_grad():
        cache = output_cache(model(ids))
        dyn = DynamicCache(config=model.config)
        model(ids, **cache_kwargs(dyn))
        kvroute.set_plan(model, "full")
        with pytest.raises(ValueError, match="built for plan 'every:2'.*'full'"):
            model(ids[:, :1], **cache_kwargs(cache))
        with pytest.raises(ValueError, match="built for plan 'every:2'.*'full'"):
            model(ids[:, :1], **cache_kwargs(dyn))  # laid out in place for every:2
        foreign = DynamicCache(config=model.config)
        foreign.layers[1] = DummyLayer()  # a cache laid out elsewhere, e.g. by another model
        foreign.layers[0].update(torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8))
        with pytest.raises(ValueError, match="holds no KV for some owners of plan 'full'"):
            model(ids[:, :1], **cache_kwargs(foreign))


# ------------------------------------------------------------------ generate
def greedy_loop(model, ids, steps, mask=None, sample=False):
    """Hand-written prefill + decode: argmax (or multinomial with the global RNG) of the last logits."""
    mask = torch.ones_like(ids) if mask is None else mask
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model(ids, attention_mask=mask, position_ids=pos, use_cache=True)
    seq = ids
    for _ in range(steps):
        last = out.logits[:, -1].float()
        nxt = torch.multinomial(last.softmax(-1), 1) if sample else last.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(nxt, attention_mask=mask, position_ids=pos, **cache_kwargs(output_cache(out)), use_cache=True)
    return seq


def routed_for_generate(family, spec="every:2"):
    model = kvroute.apply(tiny_model(family, layers=6), plan=spec)
    model.generation_config.eos_token_id = None  # always generate every step
    return model


def test_generate_matches_greedy_loop(family):
    model = routed_for_generate(family)
    ids = tokens(2, 5)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        ref = greedy_loop(model, ids, 8)
    assert torch.equal(out.sequences, ref)
    owners = kvroute.get_router(model).plan.owners
    assert [not isinstance(layer, DummyLayer) for layer in output_cache(out).layers] == [
        i in owners for i in range(6)
    ]


def test_generate_sampling_matches_loop_with_same_seed():
    model = routed_for_generate("qwen3")
    ids = tokens(2, 4)
    with torch.no_grad():
        torch.manual_seed(123)
        out = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
        torch.manual_seed(123)
        ref = greedy_loop(model, ids, 8, sample=True)
        torch.manual_seed(124)
        other = greedy_loop(model, ids, 8, sample=True)
    assert torch.equal(out, ref)
    assert not torch.equal(out, other)


@pytest.mark.parametrize("family_", ["llama", "gemma3_text"])
def test_generate_batched_left_padding(family_):
    model = routed_for_generate(family_)
    rows = [tokens(1, 4, seed=1)[0], tokens(1, 9, seed=2)[0]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(batched, greedy_loop(model, ids, 6, mask=mask))
        for i, row in enumerate(rows):
            alone = model.generate(row[None], max_new_tokens=6, do_sample=False)
            assert torch.equal(batched[i, -6:], alone[0, -6:])


# ------------------------------------------------------------ training paths
def train_step(family, policy, seed, layers=6, **kwargs):
    """One training forward + backward; returns the model, output, gradients and the pass's route."""
    model = tiny_model(family, layers=layers)
    kvroute.apply(model, policy=policy, plan="every:2", seed=seed)
    checkpointing = kwargs.pop("checkpointing", False)
    teacher_between = kwargs.pop("teacher_between", False)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    ids = tokens(2, 12)
    routes = record_routes(model)
    out = model(ids, labels=ids, **kwargs)
    if teacher_between:  # another pass of the same model before backward (self-distillation's teacher)
        with torch.no_grad():
            model(tokens(2, 9, seed=5), use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, out, grads, routes[0]


@pytest.mark.parametrize("family_", ["llama", "qwen3", "gemma3_text"])
def test_cache_and_checkpointing_do_not_change_routing(family_):
    model, ref, ref_grads, route = train_step(family_, "rcla:p=0.5", seed=0, use_cache=False)
    assert route != tuple(range(6))  # the seed draws a real routing
    cache = DynamicCache(config=model.config)
    runs = {
        "cache": train_step(family_, "rcla:p=0.5", seed=0, use_cache=True, **cache_kwargs(cache)),
        "no-cache-arg": train_step(family_, "rcla:p=0.5", seed=0),
        "checkpointing": train_step(family_, "rcla:p=0.5", seed=0, checkpointing=True),
        # backward recomputes the layers under the pass they ran in, not the teacher's later one
        "checkpointing, teacher pass before backward": train_step(
            family_, "rcla:p=0.5", seed=0, checkpointing=True, teacher_between=True),
    }
    for name, (model, out, grads, drawn) in runs.items():
        assert drawn == route, name
        close(out.logits, ref.logits)
        close(out.loss, ref.loss)
        assert grads.keys() == ref_grads.keys(), name
        for key in grads:
            close(grads[key], ref_grads[key])


def test_sdpa_and_eager_agree_under_routing(family):
    ids = tokens(2, 11)
    logits = {}
    for attn in ("sdpa", "eager"):
        model = kvroute.apply(tiny_model(family, layers=6, attn=attn), policy="rcla:p=0.3", plan="every:3", seed=2)
        routes = record_routes(model)
        with torch.no_grad():
            logits[attn, "eval"] = model(ids).logits
            logits[attn, "train"] = model.train()(ids).logits
        assert routes[0] == kvroute.get_router(model).plan.source and routes[1] != tuple(range(6))
    close(logits["sdpa", "eval"], logits["eager", "eval"])
    close(logits["sdpa", "train"], logits["eager", "train"])


def test_eval_paths_agree():
    model = kvroute.apply(tiny_model("gemma3_text", layers=6), plan="every:3")
    ids = tokens(2, 11)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        close(model(ids).logits, ref)
        close(model(ids, **cache_kwargs(DynamicCache(config=model.config))).logits, ref)
        close(model(ids, **cache_kwargs(SharedKVCache.for_model(model))).logits, ref)


def test_reentrant_checkpointing_is_refused():
    model = kvroute.apply(tiny_model("llama"), policy="rcla")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = tokens(1, 6)
    with pytest.raises(ValueError, match="use_reentrant"):
        model(ids, labels=ids)


def test_gradients_reach_the_source_projections():
    *_, own, _ = train_step("llama", "none", seed=0, layers=2)
    model, _, routed, route = train_step("llama", "cla:2", seed=0, layers=2)
    assert route == (0, 0)
    for proj in ("k_proj", "v_proj"):
        src = f"model.layers.0.self_attn.{proj}.weight"
        assert f"model.layers.1.self_attn.{proj}.weight" not in routed  # never computed
        assert routed[src].abs().sum() > 0
        # layer 1 reads layer 0's K/V, so its loss gradient flows into layer 0's projections
        assert (routed[src] - own[src]).abs().max() > 1e-6
    assert "model.layers.1.self_attn.q_proj.weight" in routed


def test_skipped_projections_are_never_called_in_training(family):
    model = kvroute.apply(tiny_model(family, layers=6), policy="rcla:p=0.4", seed=1).train()
    calls = count_kv_calls(model)
    routes = record_routes(model)
    seen = set()
    for step in range(6):
        for recorded in calls.values():
            recorded.clear()
        model(tokens(1, 6, seed=step))
        producers = sorted(set(routes[-1]))
        assert calls["k"] == producers and calls["v"] == producers
        seen.add(routes[-1])
    assert len(seen) > 1 and any(len(set(r)) < 6 for r in seen)


def test_skipped_projections_are_never_called_in_inference(family):
    model = routed_for_generate(family, "every:3")
    calls = count_kv_calls(model)
    with torch.no_grad():
        model.generate(tokens(1, 5), max_new_tokens=4, do_sample=False)
    owners = list(kvroute.get_router(model).plan.owners)
    assert len(owners) < 6
    assert calls["k"] == owners * 4 and calls["v"] == owners * 4  # prefill + 3 decode steps


def test_drawn_routes_reach_the_model():
    model = kvroute.apply(tiny_model("llama", layers=4), policy="rcla:p=0.3", seed=5).train()
    routes = record_routes(model)
    ids = tokens(2, 8)
    with torch.no_grad():
        for _ in range(4):
            logits = model(ids).logits
            route = routes[-1]
            kvroute.apply(model, policy=Fixed(route))
            close(model(ids).logits, logits)
            kvroute.apply(model, policy="rcla:p=0.3")
        # a training route reads the producer's own KV, not its owner: (0, 0, 1) != (0, 0, 0)
        outs = []
        for route in [(0, 0, 1, 3), (0, 0, 0, 3), (0, 1, 2, 3)]:
            kvroute.apply(model, policy=Fixed(route))
            outs.append(model(ids).logits)
            assert routes[-1] == route
    assert (outs[0] - outs[1]).abs().max() > 1e-4 and (outs[0] - outs[2]).abs().max() > 1e-4


def test_routed_layer_refuses_a_direct_call():
    model = kvroute.apply(tiny_model("llama", layers=2))
    attn = model.model.layers[0].self_attn
    with pytest.raises(RuntimeError, match="outside a routed forward pass"):
        attn(torch.zeros(1, 2, 32), position_embeddings=(torch.ones(1, 2, 8), torch.zeros(1, 2, 8)))


# ---------------------------------------------------------------- errors
def test_unsupported_model_lists_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32))
    with pytest.raises(ValueError, match="'gpt2'") as err:
        kvroute.apply(model)
    assert all(f in str(err.value) for f in FAMILIES)


def test_apply_rejects_bad_plan_for_model():
    model = tiny_model("gemma3_text", layers=6)
    with pytest.raises(ValueError, match="'source:0,0,1,3,4,5'.*cannot read"):
        kvroute.apply(model, plan="source:0,0,1,3,4,5")
    with pytest.raises(ValueError, match="'every:0'"):
        kvroute.apply(model, plan="every:0")
    with pytest.raises(ValueError, match="7 entries but the model has 6"):
        kvroute.apply(model, plan="source:0,0,0,0,0,0,0")
    untyped = kvroute.SharingPlan.from_spec("every:2", 6)  # layer 3 would read layer 2, a full layer
    with pytest.raises(ValueError, match="cannot read"):
        kvroute.apply(model, plan=untyped)


# ---------------------------------------------------------- property test
@functools.lru_cache(maxsize=None)
def _model(family: str):
    return kvroute.apply(tiny_model(family, layers=5))


@st.composite
def source_maps(draw, types):
    """A random valid source map: each layer reads itself or an earlier layer of its type."""
    source = []
    for layer, t in enumerate(types):
        allowed = [j for j in range(layer + 1) if types[j] == t]
        source.append(draw(st.sampled_from(allowed)))
    return tuple(source)


_GEMMA_TYPES = tuple(tiny_config("gemma3_text", 5).layer_types)


@settings(max_examples=25, deadline=None, database=None)
@given(
    data=st.data(),
    family=st.sampled_from(["llama", "gemma3_text"]),
    prefill=st.integers(1, 6),
    length=st.integers(7, 12),
)
def test_decode_equals_full_forward_for_any_source_map(data, family, prefill, length):
    types = _GEMMA_TYPES if family == "gemma3_text" else ("full_attention",) * 5
    source = data.draw(source_maps(types))
    model = _model(family)
    kvroute.set_plan(model, "source:" + ",".join(map(str, source)))
    ids = tokens(1, length, seed=length)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        close(decode_logits(model, ids, prefill=prefill), full)


def _plan_logits(model, plan: str) -> torch.Tensor:
    kvroute.set_plan(model, plan)
    with torch.no_grad():
        return model(tokens(2, 11), use_cache=False).logits


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_routes_on_its_own_router(family, how):
    """A copy carries its own router, generator and plan: changing one never changes the other."""
    import copy
    import io

    model = kvroute.apply(tiny_model(family, layers=6), policy="rcla:p=0.5", plan="full", seed=4)
    full = _plan_logits(model, "full")
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    assert kvroute.get_router(twin) is not kvroute.get_router(model)
    shared = _plan_logits(twin, "every:2")
    assert (shared - full).abs().max() > 1e-3  # the copy runs its own plan...
    assert kvroute.get_router(model).plan.spec == "full"  # ...and the original keeps its own
    with torch.no_grad():
        close(model(tokens(2, 11), use_cache=False).logits, full)
    close(_plan_logits(model, "every:2"), shared)
    # training routes: the copy's generator starts where the original's was, then goes its own way
    twin.train(), model.train()
    ids = tokens(2, 8)
    routes = []
    for m in (model, twin):
        recorded = record_routes(m)
        m(ids, use_cache=False)
        routes += recorded
    assert routes[0] == routes[1]



@pytest.mark.parametrize("mode", ["assisted", "prompt lookup"])
@pytest.mark.parametrize("plan", ["full", "every:2"])
def test_gemma3_assisted_and_prompt_lookup_decoding_past_the_window(mode, plan):
    """Both crop the cache after rejected drafts; on Gemma3's sliding layers that needs the cache's
    past recording, which the routing hook must keep when it lays the cache out. Greedy either way."""
    model = kvroute.apply(tiny_model("gemma3_text", layers=6), plan=plan)
    ids = torch.cat([tokens(1, 6, seed=3)] * 3, dim=1)  # 18 tokens, past the window of 8; repeats for lookup
    common = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, **common)
    extra = ({"assistant_model": kvroute.apply(tiny_model("gemma3_text", layers=6, seed=1), plan=plan)}
             if mode == "assisted" else {"prompt_lookup_num_tokens": 3})
    assert torch.equal(model.generate(ids, **common, **extra), plain)


@functools.lru_cache(maxsize=None)
def _typed_model(family: str, dtype: str):
    return kvroute.apply(tiny_model(family, layers=5)).to(getattr(torch, dtype))


@settings(max_examples=30, deadline=None, database=None)
@given(
    data=st.data(),
    family=st.sampled_from(FAMILIES),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    batch=st.integers(1, 3),
    length=st.integers(6, 14),
)
def test_fuzz_padded_batches_decode_like_the_full_forward(data, family, dtype, batch, length):
    """Random plan, batch, left padding, prompt/continuation split and dtype: decoding through the
    shared cache equals the full forward on every real token, and the cache holds exactly the
    bytes the plan's accounting gives."""
    model = _typed_model(family, dtype)
    types = tuple(model.config.layer_types) if family == "gemma3_text" else ("full_attention",) * 5
    kvroute.set_plan(model, "source:" + ",".join(map(str, data.draw(source_maps(types)))))
    pads = [data.draw(st.integers(0, length - 3)) for _ in range(batch)]
    prefill = data.draw(st.integers(max(pads) + 1, length - 1))
    ids = tokens(batch, length, seed=length + batch)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = SharedKVCache.for_model(model)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        steps = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=pos[:, :prefill],
                       **cache_kwargs(cache)).logits]
        for t in range(prefill, length):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                               **cache_kwargs(cache)).logits)
    decoded = torch.cat(steps, dim=1)
    real = mask.bool()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == "float32" else dict(atol=1e-2, rtol=1e-2)  # logits ~0.4
    torch.testing.assert_close(decoded[real].float(), full[real].float(), **tol)
    plan, shape = kvroute.get_router(model).plan, KVShape.from_config(model.config)
    assert cache.used_bytes() == plan.kv_bytes(shape, length, batch=batch, dtype=dtype)


def test_torch_compile_routes_every_pass_like_eager():
    """Under torch.compile each training pass still draws its own route (no route baked into the graph)."""
    compiled_model = kvroute.apply(tiny_model("llama", layers=6), policy="rcla:p=0.5", plan="every:2", seed=1)
    eager = kvroute.apply(tiny_model("llama", layers=6), policy="rcla:p=0.5", plan="every:2", seed=1)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    ids = tokens(2, 10)
    with torch.no_grad():
        close(compiled.eval()(ids, use_cache=False).logits, eager.eval()(ids, use_cache=False).logits)
    compiled.train(), eager.train()
    routes, eager_routes = record_routes(compiled_model), record_routes(eager)
    for _ in range(4):
        a, b = compiled(ids, labels=ids), eager(ids, labels=ids)
        assert routes[-1] == eager_routes[-1]
        close(a.loss, b.loss)
        a.loss.backward(), b.loss.backward()
    assert len(set(routes)) > 1
    for p, q in zip(compiled_model.parameters(), eager.parameters()):
        if q.grad is not None:
            close(p.grad, q.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_packed_decode_equals_transformers_sdpa(dtype, mask_kind):
    """One query token on the KV heads: the same output as transformers' own sdpa (repeated KV)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from kvroute.hf.attention import packed_decode

    g = torch.Generator().manual_seed(0)
    batch, kv_heads, groups, length, dim = 2, 3, 3, 40, 16
    query = torch.randn(batch, kv_heads * groups, 1, dim, generator=g).to(dtype)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype) for _ in range(2))
    keep = torch.ones(batch, 1, 1, length + 5, dtype=torch.bool)  # longer than the keys, as a static mask can be
    keep[0, ..., :7] = False  # left padding of the first sequence
    mask = {"none": None, "bool": keep,
            "additive": torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)}[mask_kind]
    got = packed_decode(query, key, value, mask, 0.25, groups)
    ref_mask = None if mask is None else mask[..., :length]
    want = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=ref_mask, scale=0.25).transpose(1, 2)
    assert got.shape == (batch, 1, kv_heads * groups, dim)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_cpu_sdpa_decode_takes_the_packed_path_and_matches_the_full_forward(monkeypatch):
    """A cached decode step on CPU goes through packed_decode (not enable_gqa), with the same logits."""
    import kvroute.hf.attention as attention

    calls = []
    real = attention.packed_decode
    monkeypatch.setattr(attention, "packed_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = kvroute.apply(tiny_model("llama", layers=4), plan="every:2").eval()
    ids = tokens(2, 12)
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        out = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], **cache_kwargs(output_cache(out)), use_cache=True).logits[:, -1]
    assert len(calls) == 4  # every layer of the one-token step, none of the prefill
    close(step, full)
