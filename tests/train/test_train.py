"""kvroute train on tiny models and tiny text: learning, exact resume, routing, distillation, bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import kvroute
from kvroute.cli import main as cli_main
from kvroute.hf.patch import PlanMismatchWarning
from kvroute.policy import RCLA, FixedPlan
from kvroute.train import StepInfo, TrainConfig, distill_kl, hidden_distill, train, unlikelihood
from kvroute.train import latest_checkpoint, read_metrics
from textkit import make_model_dir, make_tokenizer, write_corpus, write_qa
from train_helpers import accumulated_grads


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    return {
        "model": make_model_dir(root / "model"),
        "corpus": write_corpus(root / "corpus"),
        "qa": write_qa(root / "qa.jsonl"),
        "tokenizer": make_tokenizer(root / "tokenizer"),
        "cache": root / "cache",
    }


def config(assets, out: Path, **overrides) -> TrainConfig:
    fields = dict(
        data=[str(assets["corpus"])], model=str(assets["model"]), output_dir=str(out), seq_len=32,
        batch_size=4, max_steps=4, lr=1e-2, routing="rcla", p=0.5, eval_every=0, tensorboard=False,
        quiet=True, cache_dir=str(assets["cache"]), device="cpu", precision="fp32",  # equivalences are exact in fp32
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def step_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r]


def test_loss_goes_down(assets, tmp_path):
    result = train(config(assets, tmp_path / "run", max_steps=30, warmup=0.1, eval_every=30))
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.5 * first, result.losses
    assert set(result.eval_loss) == {"full", "every:2", "every:4"}
    evals = [r for r in read_metrics(tmp_path / "run") if "eval" in r]
    assert [r["step"] for r in evals] == [0, 30]
    assert evals[-1]["eval"]["every:2"] < evals[0]["eval"]["every:2"]
    assert (tmp_path / "run" / "train.csv").read_text().startswith("step,loss,lm_loss")


class Interrupt(Exception):
    pass


def test_resume_reproduces_an_uninterrupted_run(assets, tmp_path):
    kwargs = dict(max_steps=6, grad_accum=2, save_every=2, keep_checkpoints=1, warmup=0.2)
    full = train(config(assets, tmp_path / "full", **kwargs))

    def kill_at_5(info: StepInfo) -> None:
        if info.step == 5:
            raise Interrupt
    with pytest.raises(Interrupt):
        train(config(assets, tmp_path / "cut", **kwargs), callbacks=[kill_at_5])
    ckpt = latest_checkpoint(tmp_path / "cut" / "checkpoints")
    assert ckpt is not None and ckpt.name == "step-000004"
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-000004"]  # keep 1
    resumed = train(config(assets, tmp_path / "cut", resume="latest", **kwargs))
    assert resumed.losses == full.losses[4:]
    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "full")  # bit-exact loss curve
    a = kvroute.load_model(full.final_checkpoint).state_dict()
    b = kvroute.load_model(resumed.final_checkpoint).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_losses(assets, tmp_path):
    plain = train(config(assets, tmp_path / "plain", max_steps=3))
    checkpointed = train(config(assets, tmp_path / "gc", max_steps=3, gradient_checkpointing=True))
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_reloaded_checkpoint_keeps_its_routing(assets, tmp_path):
    result = train(config(assets, tmp_path / "run", max_steps=2, routing="rcla", p=0.25, plan="every:2"))
    model = kvroute.load(result.final_checkpoint)
    router = kvroute.get_router(model)
    assert router.policy == RCLA(p=0.25)
    assert router.plan.spec == "every:2" and router.plan.source == (0, 0, 2, 2)
    saved = json.loads((result.final_checkpoint / "config.json").read_text())["kvroute"]
    assert saved["plan"] == "every:2" and saved["policy"]["name"] == "rcla"
    assert (result.final_checkpoint / "tokenizer.json").is_file()


@pytest.mark.parametrize("routing, p, check", [
    ("none", None, lambda r: r == (0, 1, 2, 3)),
    ("cla:2", None, lambda r: r == (0, 0, 2, 2)),
    ("rdcla:2", 0.0, lambda r: r == (0, 0, 2, 2)),
    ("rdcla:2", 1.0, lambda r: r == (0, 1, 2, 3)),
    ("rcla", 0.0, lambda r: r[0] == 0 and r[1] == 0 and all(s < layer for layer, s in enumerate(r) if layer)),
    ("mix:plan:every:2|cla:4", None, lambda r: r in ((0, 0, 2, 2), (0, 0, 0, 0))),
])
def test_each_policy_reaches_the_model(assets, tmp_path, routing, p, check):
    seen: list[tuple[int, ...]] = []
    train(config(assets, tmp_path / "run", max_steps=3, grad_accum=2, routing=routing, p=p),
          callbacks=[lambda info: seen.extend(info.routes)])
    assert len(seen) == 6 and all(check(r) for r in seen), seen


def test_plan_routing_trains_for_its_plan_only(assets, tmp_path):
    seen: list[tuple[int, ...]] = []
    with warnings.catch_warnings():  # measuring other plans is asked for: no warning
        warnings.simplefilter("error", PlanMismatchWarning)
        result = train(config(assets, tmp_path / "run", max_steps=2, grad_accum=2, routing="plan:layers:0,3",
                              eval_every=2), callbacks=[lambda info: seen.extend(info.routes)])
    assert seen == [(0, 0, 0, 3)] * 4
    assert set(result.eval_loss) == {"full", "every:2", "every:4"}
    assert kvroute.get_router(kvroute.load(result.final_checkpoint)).plan.spec == "layers:0,3"
    with pytest.warns(PlanMismatchWarning, match=r"fine-tuned for plan 'every:2' only"):
        train(config(assets, tmp_path / "full", max_steps=1, routing="plan:every:2", plan="full"))


def test_default_plan_follows_plan_routing(assets, tmp_path):
    assert config(assets, tmp_path, routing="plan:groups:1,3").plan == "groups:1,3"
    assert config(assets, tmp_path, routing="plan:every:2", plan="every:4").plan == "every:4"
    assert config(assets, tmp_path, routing="cla:2").plan == "full"
    assert config(assets, tmp_path, routing="mix:rcla|plan:every:2").plan == "full"  # R-CLA: any plan
    assert config(assets, tmp_path, routing="mix:plan:every:4|plan:every:2").plan == "every:4"


def test_rcla_draws_varied_routes(assets, tmp_path):
    seen: list[tuple[int, ...]] = []
    train(config(assets, tmp_path / "run", max_steps=6, routing="rcla", p=0.5),
          callbacks=[lambda info: seen.extend(info.routes)])
    assert len(set(seen)) > 1 and all(s <= layer for r in seen for layer, s in enumerate(r))


def test_cpu_runs_update_with_fused_adamw(assets, tmp_path):
    """On a CPU (or CUDA) the run's AdamW is torch's fused one; its groups are the unfused one's."""
    from kvroute.train import _Run, _optimizer

    run = _Run(config(assets, tmp_path / "run"))
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # Accelerate wraps it
    assert optimizer.defaults["fused"] is True
    plain = _optimizer(run.plain, run.config)
    assert not plain.defaults["fused"]
    assert [g["weight_decay"] for g in plain.param_groups] == [g["weight_decay"] for g in optimizer.param_groups]


def test_a_checkpoint_from_the_unfused_optimizer_resumes_with_the_fused_one(assets, tmp_path):
    """Checkpoints written before the fused AdamW (their groups say ``fused: None``) resume with this
    run's update kernel, from the saved moments."""
    from kvroute.train import _Run
    from kvroute.train.checkpoint import restore_run

    train(config(assets, tmp_path / "cut", max_steps=2, save_every=1))
    ckpt = latest_checkpoint(tmp_path / "cut" / "checkpoints")
    state_file = ckpt / "training_state" / "state.pt"
    state = torch.load(state_file, weights_only=False)
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = None  # as an older kvroute saved it
    torch.save(state, state_file)
    run = _Run(config(assets, tmp_path / "cut", max_steps=4))
    restore_run(run, ckpt)
    assert all(group["fused"] is True for group in run.optimizer.param_groups)
    moments = [s["exp_avg"].clone() for s in run.optimizer.state.values()]
    assert moments and any(m.abs().sum() > 0 for m in moments)  # the saved moments came back
    run.train_step()
    assert any(not torch.equal(m, s["exp_avg"]) for m, s in zip(moments, run.optimizer.state.values()))


def test_distill_kl_is_zero_for_equal_outputs():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, 3, 4]])
    assert distill_kl(logits, logits, labels).item() == 0.0
    assert distill_kl(logits, torch.randn(2, 5, 11), labels).item() > 0.0


def test_distill_is_zero_without_routing(assets, tmp_path):
    plain = train(config(assets, tmp_path / "plain", routing="none"))
    infos: list[StepInfo] = []
    distilled = train(config(assets, tmp_path / "distill", routing="none", distill=1.0),
                      callbacks=[infos.append])
    assert [i.distill for i in infos] == [0.0] * 4
    assert distilled.losses == plain.losses


def test_the_self_distillation_teacher_draws_no_route(assets, tmp_path):
    """The teacher runs an explicit identity route: the student's routes are those of a run without it."""
    runs = {}
    for name, distill in (("plain", 0.0), ("distill", 0.5)):
        infos: list[StepInfo] = []
        train(config(assets, tmp_path / name, max_steps=3, grad_accum=2, distill=distill, distill_from="self"),
              callbacks=[infos.append])
        runs[name] = [i.routes for i in infos]
    assert runs["distill"] == runs["plain"]
    assert len({r for step in runs["plain"] for r in step}) > 1


@pytest.mark.parametrize("source", ["self", "base"])
def test_distill_adds_a_term_under_routing(assets, tmp_path, source):
    infos: list[StepInfo] = []
    train(config(assets, tmp_path / "run", max_steps=2, routing="rcla", p=0.0, distill=0.5, distill_from=source),
          callbacks=[infos.append])
    assert all(i.distill > 0 and i.loss == pytest.approx(i.lm_loss + 0.5 * i.distill, rel=1e-5) for i in infos)


def test_hidden_distill_is_relative_and_counts_labelled_positions():
    teacher = tuple(torch.randn(2, 5, 8) for _ in range(4))  # embeddings + 3 layers
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, 3, 4]])
    assert hidden_distill(teacher, teacher, labels).item() == 0.0
    student = list(teacher)
    student[0] = student[0] + 5.0  # the embeddings are not distilled
    assert hidden_distill(tuple(student), teacher, labels).item() == 0.0
    student[2] = teacher[2] * 2.0  # one of three layers off by its own norm: 1/3 per position
    assert hidden_distill(tuple(student), teacher, labels).item() == pytest.approx(1 / 3, rel=1e-5)
    counted = int((labels[:, 1:] != -100).sum())
    assert hidden_distill(tuple(student), teacher, labels, reduction="sum").item() == pytest.approx(counted / 3,
                                                                                                   rel=1e-5)
    student[3] = student[3].clone()
    student[3][:, -1] += 100.0  # the last position predicts nothing: not counted
    assert hidden_distill(tuple(student), teacher, labels).item() == pytest.approx(1 / 3, rel=1e-5)
    with pytest.raises(ValueError, match="3 layers, the teacher 2"):
        hidden_distill(teacher, teacher[:3], labels)


def test_unlikelihood_pushes_down_earlier_targets_once_each():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 7)
    labels = torch.tensor([[0, 2, 3, 2, 5, 3]])  # targets at positions 0..4: 2, 3, 2, 5, 3
    p = logits[0, :-1].softmax(-1)

    def ul(i, tokens):
        return -sum(torch.log1p(-p[i, t]) for t in tokens)

    # position 0 has nothing before it; 1: {2}; 2 (target 2): {3}; 3: {2, 3}; 4 (target 3): {2, 5}
    expected = [0.0, ul(1, [2]), ul(2, [3]), ul(3, [2, 3]), ul(4, [2, 5])]
    torch.testing.assert_close(unlikelihood(logits, labels, reduction="sum"), torch.stack(
        [torch.as_tensor(e) for e in expected]).sum())
    torch.testing.assert_close(unlikelihood(logits, labels), torch.stack([torch.as_tensor(e) for e in expected]).mean())
    # a QA record: the context (-100) is not a candidate, the answer's own earlier tokens are
    qa = torch.tensor([[0, -100, -100, 2, 5, 2]])  # the answer 2, 5, 2 is scored at positions 2, 3, 4
    torch.testing.assert_close(unlikelihood(logits, qa, reduction="sum"),
                               torch.as_tensor(ul(3, [2]) + ul(4, [5])).float())
    assert unlikelihood(logits, torch.tensor([[0, 1, 2, 3, 4, 5]])).item() > 0  # every earlier token counts
    assert unlikelihood(logits, torch.tensor([[0, 1, 1, 1, 1, 1]])).item() == 0.0  # a target is never its own candidate


def test_unlikelihood_adds_a_term_on_every_pass(assets, tmp_path):
    infos: list[StepInfo] = []
    train(config(assets, tmp_path / "run", max_steps=2, routing="none", unlikelihood=0.5), callbacks=[infos.append])
    assert all(i.unlikelihood > 0 and i.loss == pytest.approx(i.lm_loss + 0.5 * i.unlikelihood, rel=1e-5)
               for i in infos)
    assert "unlikelihood" in (tmp_path / "run" / "train.csv").read_text().splitlines()[0]
    with pytest.raises(ValueError, match="--unlikelihood must be >= 0"):
        config(assets, tmp_path / "bad", unlikelihood=-1.0)


@pytest.mark.parametrize("source", ["self", "base"])
def test_hidden_distill_adds_a_term_under_routing_only(assets, tmp_path, source):
    infos: list[StepInfo] = []
    train(config(assets, tmp_path / "run", max_steps=2, routing="rcla", p=0.0, distill=0.5, distill_hidden=2.0,
                 distill_from=source), callbacks=[infos.append])
    assert all(i.distill_hidden > 0 and i.distill > 0 for i in infos)
    assert all(i.loss == pytest.approx(i.lm_loss + 0.5 * i.distill + 2.0 * i.distill_hidden, rel=1e-5) for i in infos)
    rows = read_metrics(tmp_path / "run")
    assert all(r["distill_hidden"] == pytest.approx(i.distill_hidden) for r, i in zip(rows, infos))
    infos.clear()
    train(config(assets, tmp_path / "plain", max_steps=2, routing="none", distill_hidden=2.0, distill_from=source),
          callbacks=[infos.append])
    assert [i.distill_hidden for i in infos] == [0.0, 0.0]
    with pytest.raises(ValueError, match="--distill-hidden must be >= 0"):
        config(assets, tmp_path / "bad", distill_hidden=-1.0)


def test_qa_data_trains_on_answers(assets, tmp_path):
    result = train(config(assets, tmp_path / "run", data=[str(assets["qa"])], seq_len=48, max_steps=2,
                          eval_every=2))
    assert len(result.losses) == 2 and set(result.eval_loss) == {"full", "every:2", "every:4"}


def test_text_and_qa_train_as_a_mixture(assets, tmp_path):
    from kvroute.data.mix import Mixture
    from kvroute.data.qa import IGNORE_INDEX
    from kvroute.models import load_tokenizer
    from kvroute.train import _load_data

    cfg = config(assets, tmp_path / "run", data=[str(assets["corpus"]), str(assets["qa"])], seq_len=48)
    assert cfg.data_kind == "mix"
    train_ds, val_ds, collate = _load_data(cfg, load_tokenizer(cfg.model))
    assert isinstance(train_ds, Mixture) and len(train_ds.sizes) == 2 and all(train_ds.sizes)
    text_item, qa_item = train_ds[0], train_ds[len(train_ds) - 1]
    assert torch.equal(text_item["labels"], text_item["input_ids"]) and len(text_item["input_ids"]) == 48
    assert (qa_item["labels"] == IGNORE_INDEX).any() and (qa_item["labels"] != IGNORE_INDEX).any()
    batch = collate([text_item, qa_item])  # padded to one width, the mask marks the real tokens
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"][1].sum()) == len(qa_item["input_ids"])
    result = train(config(assets, tmp_path / "run", data=cfg.data, seq_len=48, max_steps=3, eval_every=3))
    assert len(result.losses) == 3 and all(loss == loss for loss in result.losses)  # finite, not NaN


def test_mixture_set_epoch_reaches_qa_order():
    from kvroute.data.mix import Mixture

    class Part(list):
        epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

    a, b = Part([1, 2]), Part([3])
    mix = Mixture([a, [], b])
    assert [mix[i] for i in range(len(mix))] == [1, 2, 3] and mix.sizes == [2, 1]
    mix.set_epoch(4)
    assert a.epoch == b.epoch == 4
    with pytest.raises(IndexError):
        mix[3]
    with pytest.raises(ValueError, match="at least one non-empty part"):
        Mixture([[]])


def test_pretrain_preset_with_layer_override(assets, tmp_path):
    result = train(config(assets, tmp_path / "run", model=None, preset="tiny", layers=2,
                          tokenizer=str(assets["tokenizer"]), max_steps=2, eval_plans="full,every:2"))
    model = kvroute.load(result.final_checkpoint)
    assert model.config.model_type == "qwen3" and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == 47


def test_lora_saves_a_merged_routed_model(assets, tmp_path):
    result = train(config(assets, tmp_path / "run", lora_r=4, lr=5e-2, max_steps=2, save_every=1))
    model = kvroute.load(result.final_checkpoint)
    assert kvroute.get_router(model).policy == RCLA(p=0.5)
    base = kvroute.load_model(assets["model"]).state_dict()
    tuned = model.state_dict()
    assert not any("lora" in k for k in tuned)
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.weight"],
                           tuned["model.layers.0.self_attn.q_proj.weight"])
    resumed = train(config(assets, tmp_path / "run", lora_r=4, lr=5e-2, max_steps=3, resume="latest"))
    assert resumed.steps == 3 and len(resumed.losses) == 2  # continued from step 1


def test_cli_trains(assets, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["train", str(assets["model"]), "--data", str(assets["corpus"]), "--output", str(out),
                   "--seq-len", "32", "--device", "cpu", "--max-steps", "2", "--routing", "rdcla:2", "--p", "0.5",
                   "--eval-every", "2", "--eval-plans", "full,every:4", "--quiet", "--no-tensorboard",
                   "--cache-dir", str(assets["cache"])])
    assert rc == 0
    captured = capsys.readouterr()
    assert "trained 2 steps" in captured.out
    assert json.loads((out / "run_config.json").read_text())["routing"] == "rdcla:2"
    # --quiet: no bars of our own, and none of transformers' ("Loading weights", "Writing model shards")
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err
    assert "train:" not in captured.err


@pytest.fixture(autouse=True)
def _libraries_speak_again():
    """``--quiet`` silences transformers for the process; the other tests get it back."""
    yield
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()


def test_cli_trains_for_one_plan(assets, tmp_path, capsys):
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanMismatchWarning)
        rc = cli_main(["train", str(assets["model"]), "--data", str(assets["corpus"]), "--output", str(out),
                       "--seq-len", "32", "--device", "cpu", "--max-steps", "2", "--routing", "plan:every:2",
                       "--quiet", "--no-tensorboard", "--cache-dir", str(assets["cache"])])
        assert rc == 0, capsys.readouterr().err
        model = kvroute.load(out / "final")
    router = kvroute.get_router(model)
    assert router.policy == FixedPlan("every:2")
    assert router.plan.spec == "every:2" and router.plan.source == (0, 0, 2, 2)
    saved = json.loads((out / "final" / "config.json").read_text())["kvroute"]
    assert saved["policy"] == {"name": "plan", "plan": "every:2"} and saved["plan"] == "every:2"
    assert json.loads((out / "run_config.json").read_text())["plan"] == "every:2"
    with pytest.warns(PlanMismatchWarning, match=r"'every:2' only .*plan 'full'"):
        kvroute.set_plan(model, "full")


def test_cli_reports_bad_input(assets, tmp_path, capsys):
    rc = cli_main(["train", str(assets["model"]), "--data", str(assets["corpus"]), "--p", "1.5"])
    assert rc == 2 and "--p must be in [0, 1]" in capsys.readouterr().err


BAD_CONFIGS = [
    (dict(p=1.5), ValueError, r"--p must be in \[0, 1\]"),
    (dict(p=-0.1), ValueError, r"--p must be in \[0, 1\]"),
    (dict(routing="rcla2"), ValueError, r"--routing: .*unknown policy"),
    (dict(routing="cla:x"), ValueError, r"--routing: .*bad value"),
    (dict(routing="cla"), ValueError, r"--routing: .*needs a group size"),
    (dict(routing="plan:every:0"), ValueError, r"--routing: routing 'plan:every:0': .*K must be a positive"),
    (dict(routing="plan"), ValueError, r"--routing: routing 'plan:': give the plan to train for"),
    (dict(model=None), ValueError, r"exactly one"),
    (dict(preset="huge"), ValueError, r"exactly one"),
    (dict(model=None, preset="huge"), ValueError, r"--preset: unknown preset"),
    (dict(model=None, preset="tiny"), ValueError, r"--preset needs --tokenizer"),
    (dict(layers=2), ValueError, r"--layers only applies"),
    (dict(batch_size=0), ValueError, r"--batch-size must be a positive"),
    (dict(warmup=1.5), ValueError, r"--warmup must be in"),
    (dict(schedule="step"), ValueError, r"--schedule must be one of"),
    (dict(data=[]), ValueError, r"--data"),
    (dict(data_format="mix"), ValueError, r"--data-format mix needs both"),
    (dict(data_format="tsv"), ValueError, r"--data-format must be one of"),
]


@pytest.mark.parametrize("overrides, error, match", BAD_CONFIGS)
def test_bad_config_fails_on_construction(assets, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        config(assets, tmp_path / "run", **overrides)


def _unsupported_model(tmp_path: Path) -> Path:
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    return folder


@pytest.mark.parametrize("case", ["missing data", "missing model", "empty data", "seq len", "family",
                                  "bad plan", "routing plan", "tiny data", "missing resume"])
def test_bad_input_fails_before_work(assets, tmp_path, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n")
    overrides, match = {
        "missing data": (dict(data=[str(tmp_path / "nope.txt")]), "file not found"),
        "missing model": (dict(model=str(tmp_path / "no-model")), "checkpoint not found"),
        "empty data": (dict(data=[str(empty)]), "no text"),
        "seq len": (dict(seq_len=512), r"--seq-len 512 is above the model's maximum of 256"),
        "family": (dict(model=str(_unsupported_model(tmp_path))), "does not support model_type 'gpt2'"),
        "bad plan": (dict(eval_plans="full,every:0"), "K must be a positive"),
        "routing plan": (dict(routing="plan:groups:2,3,3"),
                         r"--routing: routing 'plan:groups:2,3,3' does not fit a 4-layer model: .*add up to 8"),
        "tiny data": (dict(seq_len=200, batch_size=64), "fewer than one batch"),
        "missing resume": (dict(resume=str(tmp_path / "ckpt")), "--resume: checkpoint not found"),
    }[case]
    out = tmp_path / "run"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train(config(assets, out, **overrides))
    assert not (out / "final").exists()


def test_resume_refuses_other_settings(assets, tmp_path):
    train(config(assets, tmp_path / "run", max_steps=2, save_every=1))
    with pytest.raises(ValueError, match=r"--resume: .* --seq-len 32, this run asks for 16"):
        train(config(assets, tmp_path / "run", max_steps=2, seq_len=16, resume="latest"))


def test_grad_accum_weights_every_labelled_token_alike(assets, tmp_path):
    """Micro-batches with different numbers of answer tokens: k micro-batches of n give the
    gradient of one batch of k x n (the token mean over the window, not a mean of means)."""
    import random

    rng = random.Random(1)
    words = [f"w{i}" for i in range(40)]
    rows = [{"context": " ".join(rng.choice(words) for _ in range(8)), "question": "w1 w2",
             "answer": " ".join(rng.choice(words) for _ in range(1 + 7 * (i % 2)))} for i in range(24)]
    qa = tmp_path / "uneven.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(data=[str(qa)], routing="none", grad_clip=0.0, val_fraction=0.0, seq_len=48, max_steps=1,
                  question_first_p=0.0)
    one = accumulated_grads(config(assets, tmp_path / "one", batch_size=4, **common))
    two = accumulated_grads(config(assets, tmp_path / "two", batch_size=2, grad_accum=2, **common))
    four = accumulated_grads(config(assets, tmp_path / "four", batch_size=1, grad_accum=4, **common))
    assert one.keys() == two.keys() == four.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-6)


def test_lora_fine_tunes_follow_the_seed(assets, tmp_path):
    def final(name: str, seed: int) -> dict[str, torch.Tensor]:
        result = train(config(assets, tmp_path / name, lora_r=4, lr=5e-2, max_steps=2, seed=seed))
        return kvroute.load_model(result.final_checkpoint).state_dict()

    a, b, c = final("a", 5), final("b", 5), final("c", 6)
    key = "model.layers.0.self_attn.q_proj.weight"
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert not torch.equal(a[key], c[key])


def test_qa_validation_split_does_not_follow_the_seed(assets):
    from kvroute.data.qa import load_qa_splits
    from kvroute.models import load_tokenizer

    tok = load_tokenizer(str(assets["model"]))
    splits = [load_qa_splits([str(assets["qa"])], tok, 48, 0.25, seed=s)[1] for s in (0, 7)]
    assert [r.question for r in splits[0].records] == [r.question for r in splits[1].records]


def test_one_loss_under_a_plan_for_search_calibration_and_training():
    """mean_loss is the transformers loss on plain chunks, counts only labelled tokens of dict batches,
    and is what search (search.mean_loss) and training's validation (evaluate_plans) report."""
    from conftest import tiny_model
    from kvroute import search
    from kvroute.train import evaluate_plans, mean_loss

    model = kvroute.apply(tiny_model("llama", layers=4), policy="rcla", plan="every:2")
    assert search.mean_loss is mean_loss
    chunks = torch.randint(3, 90, (5, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = sum(float(model(rows, labels=rows, use_cache=False).loss) * rows.shape[0] for rows in chunks.split(2))
    assert mean_loss(model, chunks, batch_size=2) == pytest.approx(reference / 5, rel=1e-5)  # equal rows: mean of means
    labels = chunks.clone()
    labels[:, :6] = -100  # the prompt half is not counted
    batches = [{"input_ids": chunks[:3], "labels": labels[:3]}, {"input_ids": chunks[3:], "labels": labels[3:]}]
    masked = mean_loss(model, batches)
    assert masked != pytest.approx(mean_loss(model, chunks))
    model.train()
    plans = evaluate_plans(model, model, batches, ["full", "every:2"])
    assert model.training and kvroute.get_router(model).plan.spec == "every:2"
    assert plans["every:2"] == mean_loss(model.eval(), batches)
    kvroute.set_plan(model, "full")
    assert plans["full"] == mean_loss(model, batches) != plans["every:2"]


def test_a_preset_definition_trains_without_touching_the_table():
    from kvroute.shapes import PRESETS, preset_config
    from kvroute.train import TrainConfig

    fields = dict(PRESETS["tiny"], hidden_size=32, intermediate_size=64, head_dim=8)
    before = {k: dict(v) for k, v in PRESETS.items()}
    cfg = preset_config(fields, vocab_size=50, layers=2)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (32, 2, 50)
    assert TrainConfig(data=["x.txt"], preset=fields, tokenizer="t").preset == fields
    assert PRESETS == before
    with pytest.raises(ValueError, match="--preset: a preset definition needs head_dim"):
        TrainConfig(data=["x.txt"], preset={k: v for k, v in fields.items() if k != "head_dim"}, tokenizer="t")
