"""The vocabulary-sized losses and the optimizer update of a training step, before and after fusing.

(a) Next-token cross-entropy + KL(teacher || student) on (4, 256, 49152) bf16 logits, forward and
backward: the unfused form (``F.cross_entropy`` and a log-softmax KL on fp32 copies, as kvroute
computed them before) against :func:`kvroute.train.next_token_losses`.
(b) One AdamW update of the SmolLM2-135M shape's parameters (random gradients): torch's default
(per-tensor-list) update against ``fused=True``, which kvroute's runs now use on CPU and CUDA.
Interleaved repeats, so load drift hits both alike; ratios are within one run.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/loss_and_optimizer.py --threads 2 --json out.json

Not a test: its numbers go into docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kvroute.data.qa import IGNORE_INDEX  # noqa: E402
from kvroute.precision import cpu_model  # noqa: E402
from kvroute.train import next_token_losses  # noqa: E402


def unfused(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    mask = labels[:, 1:] != IGNORE_INDEX
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                         reduction="sum")
    s = logits[:, :-1][mask].float().log_softmax(-1)
    t = teacher[:, :-1][mask].float().log_softmax(-1)
    return ce + (t.exp() * (t - s)).sum()


def fused(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    ce, kl = next_token_losses(logits, labels, teacher, "sum")
    return ce + kl


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, LlamaConfig

    from train_step import SMOLLM2_135M  # benchmarks/train_step.py: the shape, random weights

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 256, SMOLLM2_135M["vocab_size"], generator=g) * 3).bfloat16().requires_grad_()
    teacher = (torch.randn(4, 256, SMOLLM2_135M["vocab_size"], generator=g) * 3).bfloat16()
    labels = torch.randint(0, SMOLLM2_135M["vocab_size"], (4, 256), generator=g)

    def loss_step(form):
        form(logits, labels, teacher).backward()
        logits.grad = None

    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    optimizers = {"default": torch.optim.AdamW(params, lr=1e-4), "fused": torch.optim.AdamW(params, lr=1e-4, fused=True)}
    cases = {"losses_unfused": lambda: loss_step(unfused), "losses_fused": lambda: loss_step(fused),
             "adamw_default": optimizers["default"].step, "adamw_fused": optimizers["fused"].step}
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    results = {name: {"median_s": statistics.median(t), "times_s": [round(x, 4) for x in t]} for name, t in times.items()}
    ratios = {"losses": results["losses_fused"]["median_s"] / results["losses_unfused"]["median_s"],
              "adamw": results["adamw_fused"]["median_s"] / results["adamw_default"]["median_s"]}
    print(f"{cpu_model()}, {args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"torch {torch.__version__}")
    for name, r in results.items():
        print(f"{name:<16} {r['median_s']:.3f} s (median of {args.repeats})")
    print(f"fused / unfused: losses {ratios['losses']:.2f}, AdamW {ratios['adamw']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
                       "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "results": results, "ratios": ratios},
                      fh, indent=2)


if __name__ == "__main__":
    main()
