"""Sequence-level unlikelihood (kvroute.train.rollouts, ``--seq-unlikelihood``): the mask, the loss, the
greedy rollout through a plan's cache, and training with it, token-exact across micro-batches."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import kvroute
from kvroute.train import TrainConfig, greedy_rollout, repeated_ngram_mask, sequence_unlikelihood, train
from kvroute.train import read_metrics
from kvroute.train import rollouts
from textkit import make_model_dir, write_corpus


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rollouts")
    return {"model": make_model_dir(root / "model"), "corpus": write_corpus(root / "corpus"), "cache": root / "cache"}


def config(assets, out: Path, **overrides) -> TrainConfig:
    fields = dict(data=[str(assets["corpus"])], model=str(assets["model"]), output_dir=str(out), seq_len=32,
                  batch_size=4, max_steps=2, lr=1e-2, routing="plan:every:2", eval_every=0, tensorboard=False,
                  quiet=True, cache_dir=str(assets["cache"]), device="cpu", precision="fp32",
                  seq_unlikelihood=1.0, seq_ul_prefix=8, seq_ul_length=12, seq_ul_ngram=2)
    fields.update(overrides)
    return TrainConfig(**fields)


def test_repeated_ngram_mask_marks_repeats_after_the_prefix_only():
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 4, 1, 2],
                        [1, 2, 1, 2, 9, 8, 7, 6, 5]])
    assert repeated_ngram_mask(ids, start=0, n=3).int().tolist() == [
        [0, 0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0]]
    # from position 4 on: row 0's (1, 2) at 3-4 counts from 4, (2, 3) at 4-5 and (1, 2) at 7-8 fully;
    # row 1's repeat (1, 2) at 2-3 lies before the start
    assert repeated_ngram_mask(ids, start=4, n=2).int().tolist() == [
        [0, 0, 0, 0, 1, 1, 0, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 0, 0]]
    # a continuation that copies the prefix counts
    assert repeated_ngram_mask(torch.tensor([[5, 6, 5, 6]]), start=2, n=2).int().tolist() == [[0, 0, 1, 1]]
    with pytest.raises(ValueError, match="n-gram"):
        repeated_ngram_mask(ids, start=0, n=0)


def test_sequence_unlikelihood_is_minus_log_one_minus_p_of_the_marked_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 6)
    ids = torch.tensor([[2, 3, 2, 3]])
    mask = torch.tensor([[False, False, True, True]])
    p = logits.softmax(-1)
    expected = [-math.log1p(-float(p[0, 1, 2])), -math.log1p(-float(p[0, 2, 3]))]
    torch.testing.assert_close(sequence_unlikelihood(logits, ids, mask), torch.tensor(sum(expected)))
    torch.testing.assert_close(sequence_unlikelihood(logits, ids, mask, "mean"), torch.tensor(sum(expected) / 2))
    # position 0 is never scored; nothing marked is zero
    assert sequence_unlikelihood(logits, ids, torch.tensor([[True, False, False, False]])).item() == 0.0


@pytest.mark.parametrize("plan", ["full", "every:2"])
def test_greedy_rollout_equals_greedy_generate_through_the_plan_cache(assets, plan):
    from transformers import GenerationConfig

    model = kvroute.load(assets["model"], plan=plan)
    model.eval()
    prefix = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    got = greedy_rollout(model, prefix, 9)
    gen = GenerationConfig(max_new_tokens=9, min_new_tokens=9, do_sample=False, num_beams=1, pad_token_id=0,
                           eos_token_id=model.config.eos_token_id)
    want = model.generate(prefix, attention_mask=torch.ones_like(prefix), generation_config=gen)
    assert got.shape == (2, 14)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="rollout length"):
        greedy_rollout(model, prefix, 0)


def test_training_adds_the_rollout_term_and_logs_it(assets, tmp_path):
    infos = []
    train(config(assets, tmp_path / "run"), callbacks=[infos.append])
    assert all(0 < i.repeated <= 1 and i.seq_unlikelihood > 0 for i in infos)  # a tiny model loops
    for i in infos:
        assert i.loss == pytest.approx(i.lm_loss + 1.0 * i.seq_unlikelihood, rel=1e-5)
    header = (tmp_path / "run" / "train.csv").read_text().splitlines()[0].split(",")
    assert {"seq_unlikelihood", "repeated"} <= set(header)
    assert all(r["repeated"] > 0 for r in read_metrics(tmp_path / "run") if "loss" in r)
    off = []
    train(config(assets, tmp_path / "off", seq_unlikelihood=0.0), callbacks=[off.append])
    assert all(i.seq_unlikelihood == 0 and i.repeated == 0 for i in off)
    assert off[0].lm_loss == pytest.approx(infos[0].lm_loss, rel=1e-6)  # the same first LM pass


def test_rollouts_decode_under_the_plan_each_pass_draws(assets, tmp_path, monkeypatch):
    """Each micro-batch's rollout runs in eval mode under its drawn plan; the model's plan and mode come back."""
    from kvroute.hf.patch import get_router

    seen = []
    real = rollouts.greedy_rollout

    def spy(model, prefix, length):
        router = get_router(model)
        seen.append((router.plan.spec, model.training, prefix.shape[1]))
        return real(model, prefix, length)

    monkeypatch.setattr("kvroute.train.loop.greedy_rollout", spy)
    from kvroute.train import _Run

    run = _Run(config(assets, tmp_path / "run", routing="plan:every:2+full", grad_accum=3, seed=4))
    run.model.train()
    info = run.train_step()
    served = {p.source: p.spec for p in run.plan_of_route.values()}
    assert [s[0] for s in seen] == [served[tuple(r)] for r in info.routes]
    assert len(set(s[0] for s in seen)) == 2  # both plans drawn with this seed
    assert all(not training and width == 8 for _, training, width in seen)
    assert get_router(run.plain).plan.spec == "every:2" and run.model.training


def test_rollout_loss_is_token_exact_across_micro_batches(assets, tmp_path):
    """One batch of 4 rows and 2 or 4 micro-batches of the same rows: the same gradient."""
    from kvroute.train import _Run

    def grads(**overrides) -> dict[str, torch.Tensor]:
        run = _Run(config(assets, tmp_path / str(len(list(tmp_path.iterdir()))), grad_clip=0.0, max_steps=1,
                          **overrides))
        run.optimizer.step = lambda *a, **k: None
        run.optimizer.zero_grad = lambda *a, **k: None
        run.model.train()
        run.train_step()
        return {n: p.grad.clone() for n, p in run.plain.named_parameters() if p.grad is not None}

    one = grads(batch_size=4)
    two = grads(batch_size=2, grad_accum=2)
    four = grads(batch_size=1, grad_accum=4)
    zero = grads(batch_size=4, seq_unlikelihood=0.0)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(one[n], zero[n]) for n in one)  # the rollout term reaches the gradient


def test_rollouts_on_padded_qa_rows_stay_inside_every_row(assets, tmp_path):
    from textkit import write_qa

    qa = write_qa(tmp_path / "qa.jsonl")
    infos = []
    train(config(assets, tmp_path / "run", data=[str(assets["corpus"]), str(qa)], seq_len=64, seq_ul_prefix=40),
          callbacks=[infos.append])
    assert all(i.seq_unlikelihood >= 0 and math.isfinite(i.loss) for i in infos)


@pytest.mark.parametrize("overrides, match", [
    (dict(routing="rcla"), "needs --routing plan:SPEC"),
    (dict(routing="none"), "needs --routing plan:SPEC"),
    (dict(seq_unlikelihood=-1.0), "--seq-unlikelihood must be >= 0"),
    (dict(seq_ul_prefix=32), "--seq-ul-prefix 32 must be shorter than --seq-len 32"),
    (dict(seq_ul_length=0), "--seq-ul-length must be a positive integer"),
    (dict(seq_ul_ngram=0), "--seq-ul-ngram must be a positive integer"),
])
def test_bad_settings_fail_on_construction(assets, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        config(assets, tmp_path / "run", **overrides)


def test_rollouts_longer_than_the_model_fail_before_work(assets, tmp_path):
    limit = kvroute.load_model(assets["model"]).config.max_position_embeddings
    with pytest.raises(ValueError, match="--seq-ul-prefix \\+ --seq-ul-length"):
        train(config(assets, tmp_path / "run", seq_ul_length=limit))
    assert not (tmp_path / "run").exists()


def test_rollouts_train_a_lora_model_and_with_gradient_checkpointing(assets, tmp_path):
    for name, extra in {"lora": dict(lora_r=4), "ckpt": dict(gradient_checkpointing=True)}.items():
        infos = []
        train(config(assets, tmp_path / name, **extra), callbacks=[infos.append])
        assert all(i.seq_unlikelihood > 0 and math.isfinite(i.loss) for i in infos), name
        assert kvroute.load(tmp_path / name / "final").config.kvroute["plan"] == "every:2"
