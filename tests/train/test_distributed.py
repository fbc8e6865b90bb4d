"""Multi-process training on the CPU (torchrun, gloo): FSDP2 and DDP equal one process, exact resume."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

import kvroute
from kvroute.train import TrainConfig, train
from kvroute.train import read_metrics
from dist_helpers import torchrun
from textkit import make_model_dir, write_corpus

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

STEPS = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    return {"model": make_model_dir(root / "model", layers=6), "corpus": write_corpus(root / "corpus"),
            "cache": root / "cache"}


def cli_args(assets, out: Path, batch_size: int, *extra: str) -> list[str]:
    return [str(assets["model"]), "--data", str(assets["corpus"]), "-o", str(out), "--seq-len", "32",
            "--batch-size", str(batch_size), "--max-steps", str(STEPS), "--lr", "1e-2", "--routing", "rcla",
            "--p", "0.5", "--eval-every", "0", "--no-tensorboard", "--device", "cpu", "--quiet",
            "--cache-dir", str(assets["cache"]), "--seed", "3", "--precision", "fp32", *extra]


def steps(out: Path) -> list[dict]:
    """What a run's steps did, without their timing."""
    return [{k: r[k] for k in ("step", "loss", "lm_loss", "grad_norm", "route", "lr")}
            for r in read_metrics(out) if "loss" in r]


def train_one_process(assets, out: Path, **extra) -> Path:
    """The reference: one process, the same global batch (2 processes x 2 = 4)."""
    fields = dict(data=[str(assets["corpus"])], model=str(assets["model"]), output_dir=str(out), seq_len=32,
                  batch_size=4, max_steps=STEPS, lr=1e-2, routing="rcla", p=0.5, eval_every=0, tensorboard=False,
                  quiet=True, device="cpu", cache_dir=str(assets["cache"]), seed=3, precision="fp32")
    train(TrainConfig(**{**fields, **extra}))
    return out


@pytest.fixture(scope="module")
def one_process(assets, tmp_path_factory) -> Path:
    return train_one_process(assets, tmp_path_factory.mktemp("one") / "run")


def assert_same_run(run: Path, ref: Path, atol: float = 1e-5) -> None:
    """The same routes, losses and gradient norms step by step, and the same final weights (to ``atol``)."""
    got, want = steps(run), steps(ref)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["route"] for r in got] == [r["route"] for r in want]  # the same draws as one process
    torch.testing.assert_close([r["loss"] for r in got], [r["loss"] for r in want], rtol=0, atol=1e-5)
    torch.testing.assert_close([r["grad_norm"] for r in got], [r["grad_norm"] for r in want], rtol=1e-4, atol=0)
    a = kvroute.load_model(run / "final").state_dict()
    b = kvroute.load_model(ref / "final").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_processes_equal_one(assets, one_process, tmp_path, mode):
    out = tmp_path / mode
    torchrun(2, cli_args(assets, out, 2, *(["--fsdp"] if mode == "fsdp" else [])))
    assert_same_run(out, one_process)
    routes = [tuple(r["route"]) for r in steps(out)]
    assert len(set(routes)) > 1  # routes vary from step to step under FSDP2 (one draw per pass)
    assert kvroute.load(out / "final").config.kvroute["policy"]["name"] == "rcla"


def test_fsdp_distills_from_a_sharded_teacher_with_checkpointing(assets, tmp_path):
    ref = train_one_process(assets, tmp_path / "one", distill=0.5, distill_from="base", gradient_checkpointing=True)
    out = tmp_path / "fsdp"
    torchrun(2, cli_args(assets, out, 2, "--fsdp", "--distill", "0.5", "--distill-from", "base",
                         "--gradient-checkpointing"))
    assert_same_run(out, ref)
    assert any(r["distill"] > 0 for r in read_metrics(out) if "distill" in r)


@pytest.mark.parametrize("mode, routing, distill", [("fsdp", "plan:every:2+every:3", 0.0),
                                                    ("ddp", "plan:every:2+every:3", 0.0),
                                                    ("fsdp", "mix:rcla|plan:every:2", 0.0),
                                                    ("fsdp", "plan:every:2+every:3", 0.5)])
def test_rollout_unlikelihood_on_two_processes_equals_one(assets, tmp_path, mode, routing, distill):
    """Greedy rollouts under the drawn plan on every rank, their loss divided by all ranks' continuation tokens;
    in a mix, on the steps that draw the plan only (every rank draws alike); with ``--seq-distill`` the
    frozen start, sharded, reads the rollouts as their teacher."""
    flags = dict(routing=routing, seq_unlikelihood=1.0, seq_ul_prefix=8, seq_ul_length=8)
    extra = dict(seq_distill=distill, distill_from="base") if distill else {}
    ref = train_one_process(assets, tmp_path / "one", **flags, **extra)
    out = tmp_path / mode
    torchrun(2, cli_args(assets, out, 2, *(["--fsdp"] if mode == "fsdp" else []), "--routing", flags["routing"],
                         "--seq-unlikelihood", "1", "--seq-ul-prefix", "8", "--seq-ul-length", "8",
                         *(["--seq-distill", str(distill), "--distill-from", "base"] if distill else [])))
    # the KL's gradient, p_student - p_teacher, is a difference of near-equal numbers (the teacher is the
    # start), so the summation order across ranks moves a few weights by up to 3e-5 after Adam's
    # second step (one process split into micro-batches agrees to 1e-6); the losses agree to 1e-5
    assert_same_run(out, ref, atol=1e-4 if distill else 1e-5)
    got, want = read_metrics(out), read_metrics(ref)
    rolled = [r["repeated"] > 0 or r["seq_distill"] > 0 for r in want if "loss" in r]
    assert all(rolled) if routing.startswith("plan:") else any(rolled) and not all(rolled)
    for key in ("seq_unlikelihood", "seq_distill"):
        torch.testing.assert_close([r[key] for r in got if "loss" in r], [r[key] for r in want if "loss" in r],
                                   rtol=0, atol=1e-5)
    assert all(r["seq_distill"] > 0 for r in want if "loss" in r) == bool(distill)


def test_fsdp_trains_pair_maps_like_one_process(assets, tmp_path):
    """The pairwise maps are sharded with their layer, trained and saved gathered (kvroute.pairs)."""
    from kvroute.pairs import pair_maps

    ref = train_one_process(assets, tmp_path / "one", pair_maps=True)
    out = tmp_path / "fsdp"
    torchrun(2, cli_args(assets, out, 2, "--fsdp", "--pair-maps"))
    assert_same_run(out, ref)
    got, want = pair_maps(kvroute.load(out / "final")), pair_maps(kvroute.load(ref / "final"))
    assert got.keys() == want.keys() and len(got) == 15
    for pair in got:
        torch.testing.assert_close(got[pair].value, want[pair].value, rtol=1e-4, atol=1e-5)
    eye = torch.eye(got[(1, 0)].value.shape[-1])
    assert any(not torch.allclose(m.value, eye.expand_as(m.value)) for m in got.values())  # they trained


def test_memory_script_counts_parameters_exactly():
    import importlib.util

    from conftest import tiny_config

    path = Path(__file__).parents[2] / "scripts" / "fsdp_memory.py"
    spec = importlib.util.spec_from_file_location("fsdp_memory", path)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up
    spec.loader.exec_module(script)
    for family in ("llama", "qwen2", "mistral"):
        config = tiny_config(family)
        shape = script.Shape.from_config(config.to_dict())
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
        expected = sum(p.numel() for p in model.parameters())
        if family == "qwen2":  # Qwen2's q/k/v projections carry biases
            expected -= sum(m.bias.numel() for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj")))
        assert shape.params() == expected, family
    assert round(script.Shape.from_config(script.SHAPES["llama-3.1-8b"]).params() / 1e9, 2) == 8.03


def test_fsdp_resumes_exactly_and_only_on_the_same_world_size(assets, tmp_path):
    full = tmp_path / "full"
    torchrun(2, cli_args(assets, full, 2, "--fsdp", "--save-every", "2"))
    ckpt = full / "checkpoints" / "step-000002"
    assert (ckpt / "training_state" / "dcp" / ".metadata").is_file()  # sharded (torch distributed checkpoint)
    assert kvroute.load_model(ckpt) is not None  # every checkpoint is also a plain transformers folder

    # a run killed after step 2 left exactly this checkpoint and the first two metrics records
    cut = tmp_path / "cut"
    shutil.copytree(ckpt, cut / "checkpoints" / ckpt.name)
    (cut / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines()[:2]))
    torchrun(2, cli_args(assets, cut, 2, "--fsdp", "--save-every", "2", "--resume"))
    assert steps(cut) == steps(full)
    a = kvroute.load_model(cut / "final").state_dict()
    b = kvroute.load_model(full / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)

    other = torchrun(1, cli_args(assets, cut, 2, "--fsdp", "--save-every", "2", "--resume"), check=False)
    assert other.returncode != 0
    assert "written by 2 process(es), this run has 1" in other.stderr


def test_fsdp_without_a_launcher_says_how_to_launch(assets, tmp_path):
    with pytest.raises(ValueError, match="torchrun"):
        train(TrainConfig(data=[str(assets["corpus"])], model=str(assets["model"]), output_dir=str(tmp_path),
                          fsdp=True, device="cpu", quiet=True, tensorboard=False))


def test_fsdp_refuses_lora(assets, tmp_path):
    with pytest.raises(ValueError, match="--fsdp with LoRA"):
        TrainConfig(data=[str(assets["corpus"])], model=str(assets["model"]), fsdp=True, lora_r=4)
