"""kvroute train: fine-tune a checkpoint or pre-train a preset with R-CLA (or a baseline policy)."""

from __future__ import annotations

import argparse

NAME = "train"
HELP = "Fine-tune a model (hub id, folder, .gguf) or pre-train a preset with stochastic KV routing."


def configure(p: argparse.ArgumentParser) -> None:
    from kvroute.policy import SOURCES
    from kvroute.presets import PRESETS

    p.add_argument("model", nargs="?", help="hub id, model folder or .gguf file to fine-tune")
    p.add_argument("--config", dest="preset", choices=list(PRESETS), help="pre-train this preset from scratch")
    p.add_argument("--layers", type=int, help="depth override for --config")
    p.add_argument("--tokenizer", help="tokenizer source (default: the model; required with --config)")
    p.add_argument("--data", nargs="+", required=True,
                   help="text files, folders, globs, hf:NAME[:CONFIG][@SPLIT], or .jsonl QA files; "
                        "text and .jsonl together train on the mixture")
    p.add_argument("--data-format", default="auto", choices=["auto", "text", "qa", "mix"],
                   help="auto: qa if every source is .jsonl, mix if some are, else text")
    p.add_argument("--output", "-o", dest="output_dir", default="runs/kvroute", help="run folder")

    r = p.add_argument_group("routing")
    r.add_argument("--routing", default="rcla",
                   help="rcla | cla:K | rdcla:K | none | plan:SPEC (default rcla); plan:SPEC trains for that one "
                        "plan, any spec (plan:every:2, plan:layers:0,3,7), and the model then serves it only")
    r.add_argument("--p", type=float, help="probability a layer keeps its own KV (rcla, rdcla; default 0.6)")
    r.add_argument("--sources", choices=list(SOURCES),
                   help="rcla source draw: uniform (paper, default), nearest (geometric distance) or plan "
                        "(a random owner set; non-owners read the nearest earlier owner)")
    r.add_argument("--plan", help="default inference plan saved with the checkpoints "
                                   "(default: SPEC with --routing plan:SPEC, else full)")
    r.add_argument("--eval-plans", default="full,every:2,every:4", help="plans the eval loss is measured under")
    r.add_argument("--distill", type=float, default=0.0, help="weight of the KL to the unrouted output (0: off)")
    r.add_argument("--distill-hidden", type=float, default=0.0,
                   help="weight of layer-wise hidden-state distillation from the same teacher (0: off)")
    r.add_argument("--distill-from", default="self", choices=["self", "base"],
                   help="teacher: the model itself unrouted, or the frozen starting model")
    r.add_argument("--pair-maps", action="store_true",
                   help="train pairwise maps with the routes (one per layer and source layer; they serve every "
                        "plan); they start from the checkpoint's `kvroute calibrate --pairs` fit, else the identity")
    r.add_argument("--pair-lr", type=float, help="learning rate of the pairwise maps (default: --lr)")
    r.add_argument("--maps-only", action="store_true",
                   help="with --pair-maps: train only the maps, the weights stay frozen (calibrates every plan)")

    o = p.add_argument_group("optimization")
    o.add_argument("--seq-len", type=int, default=256)
    o.add_argument("--batch-size", type=int, default=4, help="per process")
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--max-steps", type=int, default=100)
    o.add_argument("--lr", type=float, default=1e-4)
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("B1", "B2"))
    o.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    o.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of --max-steps")
    o.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    o.add_argument("--min-lr-ratio", type=float, default=0.0)
    o.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16: autocast; auto (default): bf16 on GPUs with bf16 and CPUs with AMX/AVX512-BF16, else fp32")
    o.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    o.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    o.add_argument("--lora-alpha", type=float, default=16.0)
    o.add_argument("--lora-dropout", type=float, default=0.0)
    o.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
    o.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and optimizer over processes (FSDP2; launch with torchrun)")

    d = p.add_argument_group("data, eval and checkpoints")
    d.add_argument("--val-fraction", type=float, default=0.05)
    d.add_argument("--question-first-p", type=float, default=0.5, help="QA: question before context")
    d.add_argument("--cache-dir", help="token cache (default ~/.cache/kvroute/tokens)")
    d.add_argument("--eval-every", type=int, default=50, help="0 disables")
    d.add_argument("--eval-batches", type=int, default=8)
    d.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: final only)")
    d.add_argument("--keep-checkpoints", type=int, default=2, help="0 keeps all")
    d.add_argument("--log-every", type=int, default=1)
    d.add_argument("--resume", nargs="?", const="latest", help="continue from the latest (or this) checkpoint")
    d.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    d.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from kvroute.train import TrainConfig, train

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    result = train(config)
    if not result.main_process:
        return 0
    summary = "  ".join(f"{plan}: {loss:.3f}" for plan, loss in result.eval_loss.items())
    print(f"trained {result.steps} steps; final model in {result.final_checkpoint}"
          + (f"; eval loss {summary}" if summary else ""))
    return 0
