"""Quality under every sharing plan: language modelling, context-QA, multiple choice, greedy continuations.

One checkpoint is loaded once; each plan is switched in with :func:`kvroute.set_plan`
and scored on every dataset. Results go to disk after every plan and dataset, so
a plan that fails midway leaves the others' results in place.

- **Language modelling**: mean next-token loss and perplexity over held-out text,
  with sliding windows: each window scores only tokens no earlier window scored, so
  every token after the first of a document is scored exactly once, with at
  least ``window - stride`` tokens of context once the document is long enough.
- **Context-QA**: greedy generation with ``model.generate``, which in eval mode runs
  through the plan's :class:`~kvroute.SharedKVCache` exactly as serving does; the
  first line of the answer is scored with F1, exact match and ROUGE-L.
- **Multiple choice**: the choice with the highest log-likelihood (``acc``), or the
  highest per character (``acc_norm``).
- **Greedy continuations**: sentence starts spread over held-out text are continued greedily
  through the plan's cache; each continuation's distinct-2 (mean: ``distinct2``) and whether it
  is at least 0.5 (the share: ``non_degenerate``) show whether the plan writes text or loops.

Example:
    >>> cfg = EvalConfig(["runs/rcla/final"], plans="full,every:2", qa=["data/fictional/test.jsonl"])  # doctest: +SKIP
    >>> evaluate(cfg).rows[0]["value"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from kvroute.data.choice import MCExample, load_mc
from kvroute.data.qa import QARecord, qa_prompt_ids, read_qa
from kvroute.data.text import TextSet, continuation_prompts, load_eval_text, tokenize_documents
from kvroute.metrics import NON_DEGENERATE, answer_scores, distinct_n, standard_error
from kvroute.plan import KVShape, SharingPlan, dtype_bytes, parse_plan_list
from kvroute.precision import Precision, autocast, resolve_precision
from kvroute.results import ResultWriter, kv_kib_per_token

DEFAULT_PLANS = "full,every:2,every:3,every:4,every:8"


@dataclass(frozen=True)
class LMScore:
    """Language-modelling result; ``tokens_scored`` tokens each counted once."""

    loss: float
    perplexity: float
    tokens_scored: int
    tokens_total: int
    documents: int
    windows: int


@torch.no_grad()  # not inference_mode: see kvroute.precision.autocast
def lm_score(
    model: torch.nn.Module, documents: list[list[int]], window: int = 1024, stride: int = 512, progress: bool = False,
    kv_quant: Any = None,
) -> LMScore:
    """Mean next-token NLL over token documents with sliding windows.

    Args:
        model: a causal LM (routed or not); runs under its current plan.
        documents: token ids, one list per document (no context crosses documents).
        window: tokens one forward pass sees.
        stride: tokens a window advances; ``stride <= window``.
        kv_quant: score through a quantized shared cache (``"int8"``, ``"int4"``): each window runs
            in chunks of half the residual window, so every token attends to older context as a
            decoding model with that cache would (the newest tokens exact, older ones quantized).

    Returns:
        Loss (mean NLL, nats), perplexity ``exp(loss)`` and token counts: every
        token but the first of each document is scored exactly once.
    """
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    device = next(model.parameters()).device
    nll, scored, windows = 0.0, 0, 0
    total = sum(len(d) for d in documents)
    bar = tqdm(total=total - len(documents), desc="lm", unit="tok", disable=not progress, leave=False)
    for doc in documents:
        ids = torch.tensor(doc, dtype=torch.long, device=device)
        done = 1  # ids[:done] are scored, or have no prediction (the first token)
        while done < len(doc):
            step = window - 1 if done == 1 else min(stride, window - 1)
            end = min(len(doc), done + step)
            begin = max(0, end - window)  # begin <= done - 1: the window holds each target's context
            chunk = ids[begin:end].unsqueeze(0)  # (1, T)
            # the logits at position t - 1 predict token t: keep those of the targets done..end-1
            keep = end - done + 1
            logits = _window_logits(model, chunk, keep, kv_quant)[0, :-1].float()  # (keep-1, V)
            losses = torch.nn.functional.cross_entropy(logits, ids[done:end], reduction="none")
            nll += losses.double().sum().item()
            scored += losses.numel()
            windows += 1
            bar.update(end - done)
            done = end
    bar.close()
    if scored == 0:
        raise ValueError("no tokens to score: every document is a single token")
    loss = nll / scored
    return LMScore(loss, math.exp(loss), scored, total, len(documents), windows)


def _window_logits(model: torch.nn.Module, ids: torch.Tensor, keep: int, kv_quant: Any) -> torch.Tensor:
    """Logits of the last ``keep`` positions of ``ids`` (1, T): one forward, or through a quantized cache."""
    from kvroute.kvquant import KVQuant

    quant = KVQuant.parse(kv_quant)
    if quant is None:
        return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    from kvroute.hf.cache import SharedKVCache
    from kvroute.hf.compat import cache_kwargs

    cache = SharedKVCache.for_model(model, kv_quant=quant)
    step = max(1, quant.residual // 2)
    parts = [model(input_ids=ids[:, i : i + step], use_cache=True, **cache_kwargs(cache)).logits
             for i in range(0, ids.shape[1], step)]
    return torch.cat(parts, dim=1)[:, -keep:]


def through_eos(ids: list[int], eos: int | None) -> list[int]:
    """``ids`` up to and including the first ``eos`` (all of them when there is none): what generation wrote."""
    return ids[: ids.index(eos) + 1] if eos is not None and eos in ids else ids


class _StopAtNewline:
    """Stop each row's greedy generation once its answer has started and a line ended."""

    def __init__(self, tokenizer: Any, prompt_len: int) -> None:
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()  # not inference_mode: see kvroute.precision.autocast
def qa_score(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[QARecord],
    max_new_tokens: int = 32,
    chat: bool = False,
    progress: bool = False,
    batch_size: int = 8,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy answers through the model's cache, scored with F1, exact match and ROUGE-L.

    Prompts of similar length are answered ``batch_size`` at a time, left-padded: decoding a small
    model is bound by reading its weights, so a batch's steps cost about what one prompt's do. Each
    row's answer is what it would be alone (tested in float32; under bf16 autocast a padded batch
    can round differently).

    Returns:
        ``({"f1", "exact_match", "rouge_l"}, predictions)``; one prediction dict per example, in order.
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    if not examples:
        raise ValueError("empty QA dataset")
    if batch_size < 1:
        raise ValueError(f"QA batch size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos, eos_token_id=eos,
    )
    prompts = [qa_prompt_ids(tokenizer, ex, chat) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))  # similar lengths together: little padding
    answers: dict[int, str] = {}
    # generate() fills what ``gen`` leaves unset from the model's own generation_config (a saved
    # repetition_penalty, say): greedy scoring must not depend on it, so the model's is set aside
    saved_config, model.generation_config = model.generation_config, GenerationConfig()
    bar = tqdm(total=len(examples), desc="qa", unit="ex", disable=not progress, leave=False)
    try:
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), gen.pad_token_id if gen.pad_token_id is not None else 0)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(rows):  # left padding: each prompt ends where the answer starts
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]):] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen,
                stopping_criteria=StoppingCriteriaList([_StopAtNewline(tokenizer, width)]),
            )
            for r, i in enumerate(rows):
                new = through_eos(out[r, width:].tolist(), eos)  # what follows a row's EOS is the batch's padding
                answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip().split("\n", 1)[0].strip()
            bar.update(len(rows))
    finally:
        model.generation_config = saved_config
        bar.close()
    sums = {"f1": 0.0, "exact_match": 0.0, "rouge_l": 0.0}
    predictions = []
    for i, ex in enumerate(examples):
        scores = answer_scores(answers[i], ex.answers)
        for k, v in scores.items():
            sums[k] += v
        predictions.append({"id": ex.id, "question": ex.question, "prediction": answers[i],
                            "answers": list(ex.answers), **scores})
    return {k: v / len(examples) for k, v in sums.items()}, predictions


@torch.no_grad()  # not inference_mode: see kvroute.precision.autocast
def continuation_score(
    model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], new_tokens: int = 64, batch_size: int = 32,
    progress: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy continuations of ``prompts`` through the model's cache, scored for loops with distinct-2.

    Prompts of one length decode ``batch_size`` at a time without padding
    (:func:`~kvroute.train.rollouts.greedy_rollout`); each continuation is cut after its first EOS,
    as generation stops there (``ended``; ``tokens`` counts what was written, EOS included).
    Distinct-2 is over the continuation's tokens (0 when it has under two; an EOS counts as a token,
    as in :func:`kvroute.generate.generate`).

    Returns:
        ``({"distinct2": mean, "non_degenerate": share with distinct-2 >= 0.5}, predictions)``; one
        prediction dict (prompt, continuation, tokens, ended, distinct2, non_degenerate) per prompt, in order.
    """
    from kvroute.train.rollouts import greedy_rollout

    if not prompts:
        raise ValueError("no continuation prompts")
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("continuation prompts must all have the same number of tokens")
    if batch_size < 1:
        raise ValueError(f"continuation batch size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    predictions = []
    bar = tqdm(total=len(prompts), desc="continuations", unit="prompt", disable=not progress, leave=False)
    for first in range(0, len(prompts), batch_size):
        batch = torch.tensor(prompts[first:first + batch_size], device=device)
        for prompt, row in zip(batch.tolist(), greedy_rollout(model, batch, new_tokens)[:, batch.shape[1]:].tolist()):
            row = through_eos(row, eos)
            d2 = distinct_n(row, 2)
            predictions.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                                "continuation": tokenizer.decode(row, skip_special_tokens=True),
                                "tokens": len(row), "ended": eos is not None and row[-1] == eos,
                                "distinct2": d2, "non_degenerate": float(d2 >= NON_DEGENERATE)})
        bar.update(batch.shape[0])
    bar.close()
    metrics = {k: sum(p[k] for p in predictions) / len(predictions) for k in ("distinct2", "non_degenerate")}
    return metrics, predictions


@torch.no_grad()  # not inference_mode: see kvroute.precision.autocast
def choice_logprobs(model: torch.nn.Module, tokenizer: Any, example: MCExample) -> list[float]:
    """log p(delimiter + choice | context) for each choice, tokenized as lm-eval does.

    The choices run as one right-padded batch: padding only follows real tokens,
    so a causal model's log-probabilities of the real tokens do not change.
    """
    device = next(model.parameters()).device
    context_ids = list(tokenizer(example.context)["input_ids"]) if example.context else []
    if context_ids:
        wholes = [list(tokenizer(example.context + example.delimiter + c)["input_ids"]) for c in example.choices]
    else:  # nothing to condition on: start from BOS (or EOS), as lm-eval does
        context_ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        wholes = [context_ids + list(tokenizer(example.delimiter + c, add_special_tokens=False)["input_ids"])
                  for c in example.choices]
    n_ctx = len(context_ids)
    for choice, whole in zip(example.choices, wholes):
        if len(whole) <= n_ctx:
            raise ValueError(f"example {example.id}: choice {choice!r} has no tokens")
    width = max(len(w) for w in wholes)
    ids = torch.tensor([w + [w[-1]] * (width - len(w)) for w in wholes], device=device)  # (C, L)
    # keep the logits from the last context position on: they predict the continuations
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=width - n_ctx + 1).logits.float()  # (C, K, V)
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, n_ctx:, None])[..., 0]  # (C, K-1)
    return [logp[i, : len(w) - n_ctx].double().sum().item() for i, w in enumerate(wholes)]


def mc_score(
    model: torch.nn.Module, tokenizer: Any, examples: list[MCExample], progress: bool = False
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Accuracy by log-likelihood (``acc``) and by log-likelihood per character (``acc_norm``).

    Returns:
        ``({"acc", "acc_norm"}, hits)``; ``hits`` holds each metric's per-example 0/1 scores, in order.
    """
    if not examples:
        raise ValueError("empty multiple choice dataset")
    hits: dict[str, list[float]] = {"acc": [], "acc_norm": []}
    for ex in tqdm(examples, desc="mc", unit="ex", disable=not progress, leave=False):
        lls = choice_logprobs(model, tokenizer, ex)
        norm = [ll / max(1, len(c)) for ll, c in zip(lls, ex.choices)]
        hits["acc"].append(float(max(range(len(lls)), key=lls.__getitem__) == ex.answer))
        hits["acc_norm"].append(float(max(range(len(norm)), key=norm.__getitem__) == ex.answer))
    return {k: sum(v) / len(v) for k, v in hits.items()}, hits


# ------------------------------------------------------------------ the run
@dataclass
class EvalConfig:
    """What ``kvroute eval`` runs.

    Args:
        checkpoints: hub ids, folders or ``.gguf`` files.
        plans: plan specs, a list or a comma-separated string.
        text: held-out text datasets (file, folder or glob each).
        qa: context-QA JSONL files.
        mc: multiple choice JSONL files or BIG-bench ``task.json`` files.
        continuations: held-out text datasets whose sentence starts are continued greedily
            (:func:`continuation_score`).
        out: folder for ``results.json``, ``results.csv``, ``predictions.jsonl`` and ``pareto.png``.
        window: sliding window of the language-modelling loss, tokens (None: 1024, or the model's
            context if shorter).
        stride: stride of that window, tokens (None: half the window).
        max_tokens: tokens taken from each text dataset (None: all).
        limit: examples taken from each QA / multiple choice dataset (None: all).
        max_new_tokens: answer length limit for QA.
        qa_batch_size: QA prompts answered together, left-padded: decoding reads every weight per
            step whatever the batch, so a batch of 8 costs little more than one prompt.
        prompts: continuation prompts taken from each ``continuations`` dataset (sentence starts
            spread evenly over it).
        prompt_tokens: tokens of each continuation prompt.
        continuation_tokens: greedy tokens each prompt is continued by.
        continuation_batch_size: continuation prompts decoded together (all of one length: no padding).
        chat: wrap QA prompts in the tokenizer's chat template.
        dtype: dtype the model is loaded in.
        precision: ``fp32`` (default) scores in the model's dtype; ``bf16`` under bfloat16 autocast
            (matmuls in bf16, the loss in fp32: on the demo, with AVX512-BF16, the perplexity passes
            took 0.63x the fp32 time and full-cache and calibrated perplexities moved by at most
            0.3%; docs/RESULTS.md); ``auto``: bf16 where the device runs it natively
            (:mod:`kvroute.precision`).
        device: device the model runs on.
        kv_dtype: dtype the KV KiB/token figure assumes (default: the model's).
        kv_quant: KV cache storage, comma-separated: ``none``, ``int8``, ``int4``; every plan runs
            under each (quantized: through the cache, see :func:`lm_score`).
    """

    checkpoints: list[str]
    plans: list[str] | str = DEFAULT_PLANS
    text: list[str] = field(default_factory=list)
    qa: list[str] = field(default_factory=list)
    mc: list[str] = field(default_factory=list)
    continuations: list[str] = field(default_factory=list)
    out: str = "eval"
    window: int | None = None
    stride: int | None = None
    max_tokens: int | None = None
    limit: int | None = None
    max_new_tokens: int = 32
    qa_batch_size: int = 8
    prompts: int = 32
    prompt_tokens: int = 16
    continuation_tokens: int = 64
    continuation_batch_size: int = 32
    chat: bool = False
    dtype: str = "float32"
    precision: Precision = "fp32"
    device: str = "cpu"
    kv_dtype: str | None = None
    kv_quant: list[str] | str = "none"

    def __post_init__(self) -> None:
        self.plans = parse_plan_list(self.plans)
        if not self.checkpoints:
            raise ValueError("give at least one checkpoint")
        if not self.plans:
            raise ValueError("--plans: give at least one plan")
        if not (self.text or self.qa or self.mc or self.continuations):
            raise ValueError("give at least one dataset: --text, --qa, --mc or --continuations")
        for name in ("window", "stride"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}")
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ValueError(f"--stride must be in 1..--window ({self.window}), got {self.stride}")
        for name in ("max_tokens", "limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        for name in ("qa_batch_size", "prompts", "prompt_tokens", "continuation_tokens", "continuation_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.kv_dtype is not None:
            dtype_bytes(self.kv_dtype)
        resolve_precision(self.precision, self.device)  # checks the name
        from kvroute.kvquant import KVQuant

        quants = self.kv_quant.split(",") if isinstance(self.kv_quant, str) else list(self.kv_quant)
        self.kv_quant = [q.strip().lower() or "none" for q in quants] or ["none"]
        for q in self.kv_quant:
            KVQuant.parse(q)


@dataclass
class _Datasets:
    text: list[TextSet]
    qa: list[tuple[str, list[QARecord]]]
    mc: list[tuple[str, list[MCExample]]]
    continuations: list[TextSet]


def load_datasets(config: EvalConfig) -> _Datasets:
    """Read and check every dataset before any model is loaded."""
    return _Datasets(
        [load_eval_text(p, "--text") for p in config.text],
        [(p, read_qa([p], config.limit, "--qa")) for p in config.qa],
        [(p, load_mc(p, config.limit)) for p in config.mc],
        [load_eval_text(p, "--continuations") for p in config.continuations],
    )


def check_checkpoints(checkpoints: list[str]) -> None:
    """Fail early, before any work, for a local checkpoint that does not exist."""
    from kvroute.models import check_source

    for ckpt in checkpoints:
        check_source(ckpt)


def evaluate(config: EvalConfig, progress: bool = True) -> ResultWriter:
    """Score every checkpoint under every plan on every dataset; write results as they come.

    Returns:
        The writer holding the rows (``.rows``), the errors (``.errors``) and the file paths.
    """
    from kvroute.calibrate import is_calibrated
    from kvroute.hf.patch import set_kv_quant, set_plan
    from kvroute.models import load, load_tokenizer

    data = load_datasets(config)
    check_checkpoints(config.checkpoints)
    # continuation prompts come from each checkpoint's tokenizer: too little text fails before any model loads
    tokenizers = {ckpt: load_tokenizer(ckpt) for ckpt in config.checkpoints}
    all_prompts = {ckpt: [continuation_prompts(tok, t, config.prompts, config.prompt_tokens)
                          for t in data.continuations] for ckpt, tok in tokenizers.items()}
    writer = ResultWriter(config.out, run={k: v for k, v in asdict(config).items() if k != "out"})
    for ckpt in config.checkpoints:
        tokenizer, prompts = tokenizers[ckpt], all_prompts[ckpt]
        model = load(ckpt, plan="full", dtype=config.dtype, device=config.device)
        plans = [SharingPlan.for_model(spec, model.config) for spec in config.plans]  # all checked first
        max_positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
        if data.text and max_positions and config.window and config.window > max_positions:
            raise ValueError(f"--window {config.window} is longer than {ckpt}'s context ({max_positions} tokens)")
        window, stride = lm_windows(config, max_positions)
        shape = KVShape.from_config(model.config)
        kv_dtype = config.kv_dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
        documents = [tokenize_documents(tokenizer, t.texts, config.max_tokens) for t in data.text]
        model_info = {"checkpoint": ckpt, "model_type": model.config.model_type,
                      "num_layers": shape.num_layers, "dtype": config.dtype,
                      "precision": resolve_precision(config.precision, config.device)}
        for plan, quant in [(p, q) for p in plans for q in config.kv_quant]:
            set_plan(model, plan)
            set_kv_quant(model, quant)
            calibrated = is_calibrated(model, plan)
            base = {**model_info, "plan": plan.spec, "calibrated": calibrated,
                    "plan_source": ",".join(map(str, plan.source)),
                    "owners": len(plan.owners), "retention": plan.retention,
                    "kv_kib_per_token": kv_kib_per_token(plan, shape, kv_dtype, quant), "kv_dtype": kv_dtype,
                    "kv_quant": quant}
            if progress:
                print(f"[{ckpt}] {plan.describe()}{', calibrated' if calibrated else ''}"
                      f"{'' if quant == 'none' else ', KV ' + quant}", flush=True)
            try:
                with autocast(config.precision, config.device):
                    _score_plan(model, tokenizer, config, data, (documents, prompts), base, writer, progress,
                                (window, stride))
            except Exception as err:  # keep what other plans produced; report and go on
                writer.add_error({**base, "error": f"{type(err).__name__}: {err}"})
                if progress:
                    print(f"[{ckpt}] plan {plan.spec} failed: {type(err).__name__}: {err}", flush=True)
        del model
    return writer


def lm_windows(config: EvalConfig, max_positions: int | None) -> tuple[int, int]:
    """(window, stride) for a model: as given, else 1024 tokens or the model's context if shorter,
    and half the window."""
    window = config.window or min(1024, max_positions or 1024)
    stride = config.stride or max(1, window // 2)
    if stride > window:
        raise ValueError(f"--stride must be in 1..--window ({window}), got {stride}")
    return window, stride


def _score_plan(model, tokenizer, config: EvalConfig, data: _Datasets, tokenized, base, writer, progress,
                windows: tuple[int, int]) -> None:
    (window, stride), (documents, prompts) = windows, tokenized
    for text_set, docs in zip(data.text, documents):
        start = time.perf_counter()
        score = lm_score(model, docs, window, stride, progress, kv_quant=base.get("kv_quant"))
        info = {**base, "task": "lm", "data": text_set.path, "n": score.documents,
                "tokens_scored": score.tokens_scored, "tokens_total": score.tokens_total,
                "window": window, "stride": stride,
                "seconds": round(time.perf_counter() - start, 3)}
        writer.add(info, {"loss": score.loss, "perplexity": score.perplexity})
    for path, examples in data.qa:
        start = time.perf_counter()
        metrics, predictions = qa_score(model, tokenizer, examples, config.max_new_tokens, config.chat, progress,
                                        config.qa_batch_size)
        info = {**base, "task": "qa", "data": path, "n": len(examples),
                "seconds": round(time.perf_counter() - start, 3)}
        writer.add(info, metrics, predictions,
                   stderr={k: standard_error([p[k] for p in predictions]) for k in metrics})
    for path, examples in data.mc:
        start = time.perf_counter()
        metrics, hits = mc_score(model, tokenizer, examples, progress)
        info = {**base, "task": "mc", "data": path, "n": len(examples),
                "seconds": round(time.perf_counter() - start, 3)}
        writer.add(info, metrics, stderr={k: standard_error(v) for k, v in hits.items()})
    for text_set, ids in zip(data.continuations, prompts):
        start = time.perf_counter()
        metrics, predictions = continuation_score(model, tokenizer, ids, config.continuation_tokens,
                                                  config.continuation_batch_size, progress)
        info = {**base, "task": "continuation", "data": text_set.path, "n": len(ids),
                "seconds": round(time.perf_counter() - start, 3)}
        writer.add(info, metrics, predictions,
                   stderr={k: standard_error([p[k] for p in predictions]) for k in metrics})
