"""Do shared layers loop because they lose their own attention sink? (issue 15, a probe)

Under a shared plan a non-owner layer reads its owner's KV for every token, the first ones
included, where most heads park attention they do not need (the "attention sink"). This probe
gives each non-owner layer its own K/V for the first ``--sinks`` tokens of the sequence (computed
from that layer's own projections, as under the full cache) and the owner's mapped KV for every
later token, then scores perplexity on held-out SOTU 2007-2021 and greedy distinct-2 over the held-out
prompts of ``greedy_loops.py``. The extra memory is ``sinks`` tokens per non-owner layer, nothing
per generated token.

It patches :class:`kvroute.hf.attention.RoutedAttention` in this process only (eager attention,
one sequence at a time; ``--sinks 0`` is the library's own path). Before it scores anything it checks,
on the first plan, that the patched path with every token a sink reproduces the full cache, and that
decoding through the shared cache with 4 sinks gives the whole-window logits. In generation the sinks
come from the prompt (at most its length). Appends to experiments/results/attention_sinks.json.

    make demo
    .venv/bin/python experiments/attention_sinks.py --checkpoint runs/demo/rcla-mix-text/final \
        --plans every:2,every:4 --sinks 0,1,4,16
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from kvroute.data.text import load_eval_text, tokenize_documents  # noqa: E402
from kvroute.evaluate import lm_score  # noqa: E402
from kvroute.hf.attention import RoutedAttention, apply_rope  # noqa: E402
from kvroute.hf.cache import SharedKVCache  # noqa: E402
from kvroute.hf.compat import cache_kwargs  # noqa: E402
from kvroute.models import load, load_tokenizer  # noqa: E402
from kvroute.plan import parse_plan_list  # noqa: E402
from common import append_rows, sotu  # noqa: E402
from greedy_loops import greedy_scores, prompts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "attention_sinks.json"
ORIGINAL_FORWARD = RoutedAttention.forward


class Sinks:
    """This process's setting: how many leading tokens a non-owner layer keeps its own K/V for."""

    count = 0
    own: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> its own (keys, values) of the sink tokens


def sink_forward(self: RoutedAttention, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                 cache=None, past_key_values=None, **kwargs):
    routing = self.router.current
    idx, s = self.layer_idx, Sinks.count
    source = routing.route[idx] if routing is not None else idx
    if s == 0 or source == idx or hidden_states.shape[0] != 1:
        return ORIGINAL_FORWARD(self, hidden_states, position_embeddings, attention_mask, cache, past_key_values,
                                **kwargs)
    cos, sin = position_embeddings
    if routing.key in self.calibration:
        maps = self.calibration[routing.key]
    else:
        maps = self.pairs[str(source)] if str(source) in self.pairs else None
    raw = self._project(self.q_proj, self.q_norm, hidden_states)  # (1, H, T, D) before RoPE
    q_own = apply_rope(raw, cos, sin)
    q_map = apply_rope(maps.map_query(raw), cos, sin) if maps is not None else q_own
    key, value = routing.kv[source]  # the owner's, every position so far: (1, H_kv, N, D)
    n, t = key.shape[2], hidden_states.shape[1]
    if n == t:  # a whole sequence or a prefill: this layer's own K/V of the first s tokens
        head = hidden_states[:, :s]
        Sinks.own[idx] = (apply_rope(self._project(self.k_proj, self.k_norm, head), cos[:, :s], sin[:, :s]),
                          self._project(self.v_proj, None, head))
    k_s, v_s = Sinks.own[idx]
    s = k_s.shape[2]  # a sequence shorter than the sink count
    g = self.num_key_value_groups
    k_s, v_s = k_s.repeat_interleave(g, 1), v_s.repeat_interleave(g, 1)
    k_r, v_r = key[:, :, s:].repeat_interleave(g, 1), value[:, :, s:].repeat_interleave(g, 1)
    logits = torch.cat((q_own @ k_s.transpose(-1, -2), q_map @ k_r.transpose(-1, -2)), dim=-1) * self.scaling
    qpos = torch.arange(n - t, n, device=key.device).unsqueeze(1)  # absolute positions of the queries
    logits = logits.masked_fill(torch.arange(n, device=key.device).unsqueeze(0) > qpos, float("-inf"))
    weights = torch.softmax(logits.float(), dim=-1).to(q_own.dtype)
    out_s = (weights[..., :s] @ v_s).transpose(1, 2)  # (1, T, H, D)
    out_r = (weights[..., s:] @ v_r).transpose(1, 2)
    if maps is not None:
        out_r = maps.map_output(out_r)
    return self.o_proj((out_s + out_r).reshape(*hidden_states.shape[:-1], -1)), None


def score(model, tokenizer, docs: list[list[int]], texts: list[str]) -> dict:
    lm = lm_score(model, docs, window=256, stride=256)
    summary, samples = greedy_scores(model, tokenizer, texts)
    return {"perplexity": round(lm.perplexity, 2), **summary, "first_sample": texts[0] + samples[0].text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (RUN/final)")
    parser.add_argument("--plans", default="every:2,every:4")
    parser.add_argument("--sinks", default="0,1,4,16", help="comma-separated sink token counts (0: the library's path)")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens for perplexity")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="", help="a label for the rows")
    args = parser.parse_args()
    if not (Path(args.checkpoint) / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no config.json there (a checkpoint folder, e.g. RUN/final)")
    counts = [int(x) for x in args.sinks.split(",")]
    if any(c < 0 for c in counts):
        parser.error("--sinks: counts are >= 0")
    torch.set_num_threads(args.threads)
    RoutedAttention.forward = sink_forward
    tokenizer = load_tokenizer(args.checkpoint)
    held = [str(p) for p in sotu(2007, 2021)]
    texts_all = [load_eval_text(p).texts[0] for p in held]
    docs = tokenize_documents(tokenizer, texts_all, max_tokens=args.tokens)
    texts = prompts(args.prompts, 12)
    rows = []
    for i, plan in enumerate(parse_plan_list(args.plans)):
        model = load(args.checkpoint, plan=plan)
        if i == 0:  # the patched path must reproduce the full cache and decode as it scores
            ids = torch.tensor([docs[0][:128]])
            with torch.inference_mode():
                Sinks.count = 0
                ref = model(input_ids=ids, use_cache=False).logits
                Sinks.count = 10**9  # longer than the window: every token a sink -> the full cache's own KV
                own = model(input_ids=ids, use_cache=False).logits
            full = load(args.checkpoint, plan="full")
            with torch.inference_mode():
                Sinks.count = 0
                want = full(input_ids=ids, use_cache=False).logits
            gap = (own - want).abs().max().item()
            print(f"check: every token a sink vs the full cache, max |logit diff| {gap:.2e} "
                  f"(plan path vs full: {(ref - want).abs().max().item():.2e})", flush=True)
            if gap > 1e-3:
                raise SystemExit("the patched attention does not reproduce the full cache: not scoring")
            Sinks.count, Sinks.own = 4, {}  # decoding through the shared cache gives the whole-window logits
            with torch.inference_mode():
                whole = model(input_ids=ids[:, :40], use_cache=False).logits[0, 31:]
                cache = SharedKVCache.for_model(model)
                parts = [model(input_ids=ids[:, :32], use_cache=True, **cache_kwargs(cache)).logits[0, -1:]]
                parts += [model(input_ids=ids[:, j : j + 1], use_cache=True, **cache_kwargs(cache)).logits[0]
                          for j in range(32, 40)]
            gap = (torch.cat(parts) - whole).abs().max().item()
            print(f"check: 4 sinks, decode vs whole window, max |logit diff| {gap:.2e}", flush=True)
            if gap > 1e-3:
                raise SystemExit("decoding with sinks does not match the whole window: not scoring")
            del full
        for count in counts:
            Sinks.count, Sinks.own = count, {}
            start = time.perf_counter()
            with torch.inference_mode():
                row = {"name": args.name, "checkpoint": args.checkpoint, "plan": plan, "sinks": count,
                       **score(model, tokenizer, docs, texts), "seconds": round(time.perf_counter() - start, 1),
                       "threads": args.threads, "tokens": sum(len(d) for d in docs)}
            print(json.dumps({k: v for k, v in row.items() if k != "first_sample"}), flush=True)
            rows.append(row)
        del model
    append_rows(RESULTS, rows)


if __name__ == "__main__":
    main()
