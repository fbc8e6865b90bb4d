"""Sequence-level unlikelihood and on-policy distillation on greedy rollouts (kvroute.train.rollouts,
``--seq-unlikelihood``, ``--seq-distill``): the mask, the losses, the greedy rollout through a plan's
cache, and training with them, token-exact across micro-batches."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import kvroute
from kvroute.hf.patch import ROUTE_ARG
from kvroute.train import TrainConfig, greedy_rollout, repeated_ngram_mask, sequence_unlikelihood, train
from kvroute.train import read_metrics
from kvroute.train import rollouts
from textkit import make_model_dir, write_corpus
from train_helpers import accumulated_grads


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


def test_a_mix_rolls_out_on_the_passes_that_draw_a_plan_only(assets, tmp_path, monkeypatch):
    """``mix:rcla|plan:every:2``: the micro-batches that draw every:2 roll out under it and the R-CLA ones
    do not; the step's rollout gradient is the unlikelihood summed over the plan passes, divided by their
    continuation tokens, computed by hand."""
    from kvroute.train import _Run
    from kvroute.train.rollouts import rollout_loss

    mix = dict(routing="mix:rcla|plan:every:2", batch_size=2, grad_accum=4, seed=3)
    probe = _Run(config(assets, tmp_path / "probe", **mix))
    routes = [probe.router.sample() for _ in range(4)]
    (every2,) = probe.plan_of_route.values()
    drawn = [route == every2.source for route in routes]
    assert 0 < sum(drawn) < 4  # this seed draws both parts

    decoded = []
    real = rollouts.greedy_rollout

    def spy(model, prefix, length):
        from kvroute.hf.patch import get_router

        decoded.append(get_router(model).plan.spec)
        return real(model, prefix, length)

    monkeypatch.setattr("kvroute.train.loop.greedy_rollout", spy)
    one = _grads(assets, tmp_path / "one", **mix)
    assert decoded == ["every:2"] * sum(drawn)
    zero = _grads(assets, tmp_path / "zero", **{**mix, "seq_unlikelihood": 0.0})

    hand_run = _Run(config(assets, tmp_path / "hand", max_steps=1, **mix))  # the same start and batches
    model = hand_run.plain
    for k in (k for k, plan in enumerate(drawn) if plan):
        prompts = hand_run.batches(k)["input_ids"][:, :8]
        model.eval()
        kvroute.set_plan(model, "every:2")
        ids = real(model, prompts, 12)
        model.train()
        total, _, _ = rollout_loss(model, ids, 8, 2, every2.source)
        (total / (sum(drawn) * 2 * 12)).backward()
    # every:2 skips the K/V projections of layers 1 and 3: only the R-CLA passes' LM loss reaches them
    hand = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    assert one.keys() == zero.keys() and any(p.grad is None for p in model.parameters())
    for name in one:
        torch.testing.assert_close(one[name] - zero[name], hand[name], rtol=1e-3, atol=1e-6)
    assert any(hand[name].abs().sum() > 0 for name in one)


def _grads(assets, out: Path, **overrides) -> dict[str, torch.Tensor]:
    """The gradient one optimizer step would apply (no clipping, no step)."""
    return accumulated_grads(config(assets, out, grad_clip=0.0, max_steps=1, **overrides))


@pytest.mark.parametrize("per_row", [1, 2])
def test_rollout_term_is_the_weighted_mean_over_continuation_tokens(assets, tmp_path, per_row):
    """The step's gradient minus the LM's is W x d/dθ [summed unlikelihood / (rollouts x length)], computed
    by hand; with ``--seq-ul-per-row 2`` each 32-token row prompts at tokens 0 and 16, row by row."""
    from kvroute.hf.patch import get_router
    from kvroute.train import _Run
    from kvroute.train.rollouts import rollout_loss

    zero = _grads(assets, tmp_path / "w0", seq_unlikelihood=0.0, seq_ul_per_row=per_row)
    one = _grads(assets, tmp_path / "w1", seq_unlikelihood=1.0, seq_ul_per_row=per_row)
    two = _grads(assets, tmp_path / "w2", seq_unlikelihood=2.0, seq_ul_per_row=per_row)
    run = _Run(config(assets, tmp_path / "hand", max_steps=1))  # the same start, batch and plan
    model, batch = run.plain, run.batches(0)
    model.eval()
    prompts = torch.stack([batch["input_ids"][:, o:o + 8] for o in (0, 16)[:per_row]], 1).reshape(-1, 8)
    ids = greedy_rollout(model, prompts, 12)
    model.train()
    total, _, _ = rollout_loss(model, ids, 8, 2, get_router(model).plan.source)
    (total / (4 * per_row * 12)).backward()
    hand = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert hand.keys() == one.keys() and total.item() > 0
    for name in one:
        torch.testing.assert_close(one[name] - zero[name], hand[name], rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(two[name] - zero[name], 2 * hand[name], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("data", ["text", "mix", "mix-text-prompts", "text-distill", "mix-per-row"])
def test_rollout_loss_is_token_exact_across_micro_batches(assets, tmp_path, data):
    """One batch of 4 rows and 2 or 4 micro-batches of the same rows: the same gradient, also when
    padded QA rows too short to prompt a rollout share micro-batches with text rows, when
    ``--seq-ul-prompts text`` keeps QA rows long enough to prompt from rolling out, and with two
    prompts per row, of which QA rows have only the first."""
    from textkit import write_qa

    extra = dict(seq_distill=0.5) if data == "text-distill" else {}
    if data in ("mix-text-prompts", "mix-per-row"):  # the same rows; a 16-token prompt fits the 21-token QA rows
        extra = dict(data=[str(assets["corpus"]), str(write_qa(tmp_path / "qa.jsonl", n=16))], seq_len=48,
                     seq_ul_prefix=16, seed=0)
        if data == "mix-text-prompts":
            extra["seq_ul_prompts"] = "text"
        else:
            extra["seq_ul_per_row"] = 2
    if data == "mix":  # QA rows of 21 tokens: shorter than the 24-token prompt, so text rows alone roll out;
        # the first 4 rows are 2 text and 2 QA rows (checked below), so 2 x 2 has a QA-only micro-batch
        extra = dict(data=[str(assets["corpus"]), str(write_qa(tmp_path / "qa.jsonl", n=16))], seq_len=48,
                     seq_ul_prefix=24, seed=0)
        from kvroute.train import _Run

        lengths = _Run(config(assets, tmp_path / "probe", batch_size=4, **extra)).batches(0)["attention_mask"].sum(1)
        assert sorted(lengths.tolist()) == [21, 21, 48, 48]
    one = _grads(assets, tmp_path / "one", batch_size=4, **extra)
    two = _grads(assets, tmp_path / "two", batch_size=2, grad_accum=2, **extra)
    four = _grads(assets, tmp_path / "four", batch_size=1, grad_accum=4, **extra)
    zero = _grads(assets, tmp_path / "zero", batch_size=4, **{**extra, "seq_unlikelihood": 0.0, "seq_distill": 0.0})
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(one[n], zero[n]) for n in one)  # the rollout term reaches the gradient


@pytest.fixture
def prompted(monkeypatch) -> list[torch.Tensor]:
    """The prompts the training loop's rollouts get, in order (the rollouts still run)."""
    seen = []
    real = rollouts.greedy_rollout

    def spy(model, prefix, length):
        seen.append(prefix.clone())
        return real(model, prefix, length)

    monkeypatch.setattr("kvroute.train.loop.greedy_rollout", spy)
    return seen


def test_padded_rows_too_short_for_a_prompt_do_not_roll_out(assets, tmp_path, prompted):
    from textkit import write_qa

    seen = prompted
    qa = write_qa(tmp_path / "qa.jsonl", n=16)
    infos = []  # seed 1: the first micro-batch holds text and QA rows, the second QA rows only
    train(config(assets, tmp_path / "run", data=[str(assets["corpus"]), str(qa)], seq_len=48, seq_ul_prefix=24,
                 seed=1), callbacks=[infos.append])
    pad = kvroute.load_tokenizer(assets["model"]).pad_token_id
    assert [tuple(p.shape) for p in seen] == [(2, 24), (1, 21)]
    assert not (seen[0] == pad).any()  # the two text rows prompt with their first 24 tokens, never padding
    # a micro-batch of QA rows only rolls out one row at weight 0 (every process makes the same calls)
    assert infos[0].seq_unlikelihood > 0 and infos[0].repeated > 0
    assert infos[1].seq_unlikelihood == 0 and infos[1].repeated == 0 and math.isfinite(infos[1].loss)


@pytest.mark.parametrize("prompts, shapes", [("all", [(4, 16), (4, 16)]), ("text", [(2, 16), (1, 16)])])
def test_text_prompts_roll_out_from_running_text_only(assets, tmp_path, prompted, prompts, shapes):
    """``--seq-ul-prompts text``: QA rows long enough to prompt do not roll out; text rows do, each
    from its own first tokens. A micro-batch without a text row rolls out one row at weight 0."""
    from textkit import write_qa

    seen = prompted
    qa = write_qa(tmp_path / "qa.jsonl", n=16)
    infos = []  # seed 1: the first micro-batch holds 2 text and 2 QA rows (21 tokens), the second QA rows only
    run = config(assets, tmp_path / "run", data=[str(assets["corpus"]), str(qa)], seq_len=48, seq_ul_prefix=16,
                 seq_ul_prompts=prompts, seed=1)
    from kvroute.train import _Run

    probe = _Run(config(assets, tmp_path / "probe", data=run.data, seq_len=48, seed=1))
    first, second = probe.batches(0), probe.batches(1)
    assert sorted(first["attention_mask"].sum(1).tolist()) == [21, 21, 48, 48]
    assert second["attention_mask"].sum(1).tolist() == [21] * 4
    train(run, callbacks=[infos.append])
    assert [tuple(p.shape) for p in seen] == shapes
    if prompts == "text":
        text_rows = first["attention_mask"].sum(1) == 48
        assert torch.equal(seen[0], first["input_ids"][text_rows, :16])  # the two text rows' own prompts
        assert infos[1].seq_unlikelihood == 0 and infos[1].repeated == 0  # QA only: weight 0
    assert infos[0].seq_unlikelihood > 0 and infos[1].loss > 0


@pytest.mark.parametrize("per_row, prompts, shapes", [(2, "all", [(6, 16), (4, 16)]), (2, "text", [(4, 16), (1, 16)]),
                                                     (3, "text", [(6, 16), (1, 16)])])
def test_prompts_per_row_start_evenly_over_each_row(assets, tmp_path, prompted, per_row, prompts, shapes):
    """``--seq-ul-per-row K``: each row prompts at tokens 0, 48 // K, ... row by row, where its real (and with
    ``--seq-ul-prompts text`` trained) tokens cover the window: 21-token QA rows only at token 0."""
    from textkit import write_qa

    from kvroute.train import _Run

    run = config(assets, tmp_path / "run", data=[str(assets["corpus"]), str(write_qa(tmp_path / "qa.jsonl", n=16))],
                 seq_len=48, seq_ul_prefix=16, seq_ul_prompts=prompts, seq_ul_per_row=per_row, seed=1)
    first = _Run(config(assets, tmp_path / "probe", data=run.data, seq_len=48, seed=1)).batches(0)
    assert run.rollout_offsets == ((0, 24) if per_row == 2 else (0, 16, 32))
    infos = []
    train(run, callbacks=[infos.append])
    assert [tuple(p.shape) for p in prompted] == shapes
    text_rows = first["attention_mask"].sum(1) == 48  # 2 text rows and 2 QA rows of 21 tokens
    windows = [[first["input_ids"][r, o:o + 16] for o in run.rollout_offsets] for r in range(4)]
    expected = [w for r in range(4) for k, w in enumerate(windows[r]) if text_rows[r] or (prompts == "all" and k == 0)]
    assert torch.equal(prompted[0], torch.stack(expected))
    assert infos[0].seq_unlikelihood > 0 and math.isfinite(infos[1].loss)


@pytest.mark.parametrize("overrides, match", [
    (dict(seq_ul_prompts="prose"), "--seq-ul-prompts must be one of all, text"),
    (dict(seq_ul_per_row=0), "--seq-ul-per-row must be a positive integer"),
    (dict(seq_ul_per_row=8), r"--seq-ul-per-row 8 prompts of --seq-ul-prefix 8 tokens start at \[0, 4, .*, 28\]: the last"),
    (dict(routing="rcla"), "needs --routing plan:SPEC"),
    (dict(routing="none"), "needs --routing plan:SPEC"),
    (dict(routing="mix:rcla|cla:2"), "needs --routing plan:SPEC"),  # a mix that names no plan
    (dict(seq_unlikelihood=-1.0), "--seq-unlikelihood must be >= 0"),
    (dict(seq_distill=-1.0), "--seq-distill must be >= 0"),
    (dict(seq_unlikelihood=0.0, seq_distill=1.0, routing="rcla"), "^--seq-distill trains on greedy text .* needs"),
    (dict(seq_distill=1.0, routing="none"), "^--seq-unlikelihood and --seq-distill trains on greedy text"),
    (dict(seq_unlikelihood=0.0, seq_distill=1.0, seq_ul_prefix=32), "--seq-ul-prefix 32 must be shorter"),
    (dict(seq_ul_prefix=32), "--seq-ul-prefix 32 must be shorter than --seq-len 32"),
    (dict(seq_ul_length=0), "--seq-ul-length must be a positive integer"),
    (dict(seq_ul_ngram=0), "--seq-ul-ngram must be a positive integer"),
])
def test_bad_settings_fail_on_construction(assets, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        config(assets, tmp_path / "run", **overrides)


def test_text_prompts_need_text_in_the_data(assets, tmp_path):
    from textkit import write_qa

    with pytest.raises(ValueError, match="--seq-ul-prompts text rolls out from running text"):
        config(assets, tmp_path / "run", data=[str(write_qa(tmp_path / "qa.jsonl"))], seq_ul_prompts="text")


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


def test_rollout_distillation_is_the_teachers_kl_up_to_the_first_repeat():
    """``rollout_loss`` with teacher logits: KL(teacher || student) summed over the positions that
    predict a continuation token up to and including the row's first marked (repeating) one, computed
    by hand; none without a teacher."""
    from kvroute.train.rollouts import rollout_loss

    torch.manual_seed(0)
    vocab, start = 9, 3
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8],   # no repeat: tokens 3-7 count
                        [1, 2, 3, 4, 5, 1, 2, 7]])  # (1, 2) repeats at 5-6: tokens 3-5 count
    student, teacher = torch.randn(2, 8, vocab), torch.randn(2, 8, vocab)

    class Fixed(torch.nn.Module):  # a "model" whose logits are given
        def forward(self, input_ids, use_cache, **kwargs):
            return type("Out", (), {"logits": student})()

    ul, marked, kl = rollout_loss(Fixed(), ids, start, 2, (0,), teacher)
    assert marked == 2 and ul.item() > 0
    s, t = student.log_softmax(-1), teacher.log_softmax(-1)
    counted = {0: range(2, 7), 1: range(2, 5)}  # the positions predicting tokens 3-7 and 3-5
    want = sum(float((t[b, i].exp() * (t[b, i] - s[b, i])).sum()) for b, rows in counted.items() for i in rows)
    assert kl.item() == pytest.approx(want, rel=1e-5) and kl.item() > 0
    assert rollout_loss(Fixed(), ids, start, 2, (0,))[2].item() == 0.0
    same = rollout_loss(Fixed(), ids, start, 2, (0,), student.clone())[2]
    assert same.item() == pytest.approx(0.0, abs=1e-5)  # a student that is its teacher


@pytest.mark.parametrize("teacher", ["self", "base"])
def test_rollout_distillation_gradient_is_the_weighted_mean_kl_over_continuation_tokens(assets, tmp_path, teacher):
    """``--seq-distill W``: the step's gradient minus the LM's is W x d/dθ [summed KL to the full-cache
    teacher over the rollouts' continuation tokens up to each row's first repeat / (rows x length)],
    computed by hand. At the first step the frozen start (``--distill-from base``) is the model itself,
    so both teachers give it."""
    from kvroute.hf.patch import get_router
    from kvroute.train import _Run
    from kvroute.train.rollouts import rollout_loss

    flags = dict(seq_unlikelihood=0.0, distill_from=teacher)
    zero = _grads(assets, tmp_path / "w0", **flags)
    one = _grads(assets, tmp_path / "w1", seq_distill=1.0, **flags)
    run = _Run(config(assets, tmp_path / "hand", max_steps=1, seq_distill=1.0, **flags))
    assert (run.base is not None) == (teacher == "base")
    model, batch = run.plain, run.batches(0)
    model.eval()
    ids = greedy_rollout(model, batch["input_ids"][:, :8], 12)
    model.train()
    router = get_router(model)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False, **{ROUTE_ARG: router.identity()}).logits
    _, _, kl = rollout_loss(model, ids, 8, 2, router.plan.source, full)
    (kl / (4 * 12)).backward()
    hand = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert hand.keys() == one.keys() and kl.item() > 0
    for name in one:
        torch.testing.assert_close(one[name] - zero[name], hand[name], rtol=1e-3, atol=1e-6)


def test_training_logs_the_rollout_distillation(assets, tmp_path):
    infos = []
    train(config(assets, tmp_path / "run", seq_distill=0.5), callbacks=[infos.append])
    for i in infos:
        assert i.seq_distill > 0 and i.repeated > 0
        assert i.loss == pytest.approx(i.lm_loss + i.seq_unlikelihood + 0.5 * i.seq_distill, rel=1e-5)
    header = (tmp_path / "run" / "train.csv").read_text().splitlines()[0].split(",")
    assert "seq_distill" in header
    assert all(r["seq_distill"] > 0 for r in read_metrics(tmp_path / "run") if "loss" in r)
