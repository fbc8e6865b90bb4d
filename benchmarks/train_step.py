"""Time per training step: R-CLA vs standard training on the SmolLM2-135M shape.

R-CLA should cost no more than standard training (target ratio <= 1.00): a layer
whose K/V no layer reads in a step skips its K/V projections. Random weights of
the SmolLM2-135M shape (30 layers, 9 heads, 3 KV heads, head_dim 64); no download.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_step.py --steps 6 --batch-size 1
    python benchmarks/train_step.py --device cuda --batch-size 16 --steps 30 --json out.json

Not a test: its numbers go into the docs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import kvroute
from kvroute.train import causal_lm_loss

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


class Trainee:
    """One model of the SmolLM2-135M shape with its optimizer, routed by one policy."""

    def __init__(self, policy: str, args: argparse.Namespace, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        config = LlamaConfig(**SMOLLM2_135M)
        self.model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
        kvroute.apply(self.model, policy=policy, seed=0)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        self.args, self.device, self.times = args, device, []

    def step(self, ids: torch.Tensor, timed: bool) -> None:
        bf16 = self.args.precision == "bf16"
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=bf16):
            logits = self.model(input_ids=ids, use_cache=False).logits
        causal_lm_loss(logits, ids).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        if timed:
            self.times.append(time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=["none", "rcla:p=0.6"],
                        help="routing policies to time; the first is the baseline")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the dev machines share 2 cores)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    policies = args.policies
    trainees = {policy: Trainee(policy, args, device) for policy in policies}
    gen = torch.Generator().manual_seed(0)
    for step in range(args.warmup + args.steps):  # interleaved, so load drift hits every policy alike
        ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch_size, args.seq_len), generator=gen)
        for trainee in trainees.values():
            trainee.step(ids.to(device), timed=step >= args.warmup)
    results = {}
    for policy, trainee in trainees.items():
        t = trainee.times
        results[policy] = {"median_s": statistics.median(t), "mean_s": statistics.fmean(t), "steps": len(t)}
    base = results[policies[0]]["median_s"]
    print(f"SmolLM2-135M shape, seq {args.seq_len}, batch {args.batch_size}, {args.precision}, {device}, "
          f"{args.steps} timed steps (median)")
    print(f"{'policy':<16} {'s/step':>8} {'tok/s':>9} {'ratio':>6}")
    for policy, r in results.items():
        r["ratio"] = r["median_s"] / base
        r["tok_per_s"] = args.batch_size * args.seq_len / r["median_s"]
        print(f"{policy:<16} {r['median_s']:>8.3f} {r['tok_per_s']:>9.0f} {r['ratio']:>6.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "device": str(device), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
