"""kvroute eval: LM loss by hand, plans change the numbers, QA through the shared cache, result files."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from textkit import greedy_without_cache, make_model_dir, tiny_lm, tiny_tokenizer

import kvroute
from kvroute.calibrate import CalibrationConfig, calibrate, save_calibration
from kvroute.cli import main
from kvroute.data.choice import MCExample, load_mc
from kvroute.data.qa import QARecord, qa_prompt_ids, read_qa
from kvroute.data.text import TextSet, continuation_prompts, load_eval_text
from kvroute.evaluate import EvalConfig, choice_logprobs, continuation_score, evaluate, lm_score, qa_score
from kvroute.metrics import distinct_n, standard_error
from kvroute.models import save_checkpoint
from kvroute.results import ResultWriter, compare_results, format_table, merge_results

TEXT = "The lighthouse keeper of Stusasol counted ships every night and wrote their names in a book.\n"


def _doc(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 100, (n,), generator=g).tolist()


# ------------------------------------------------------------------ language modelling
def test_perplexity_is_exp_mean_nll_by_hand():
    model, doc = tiny_lm(), _doc(24)
    ids = torch.tensor([doc])
    with torch.no_grad():
        logits = model(ids).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none").double()
    score = lm_score(model, [doc], window=64, stride=32)
    assert score.tokens_scored == 23 and score.tokens_total == 24 and score.windows == 1
    assert score.loss == pytest.approx(nll.mean().item(), rel=1e-5)
    assert score.perplexity == pytest.approx(torch.exp(nll.mean()).item(), rel=1e-5)


def test_sliding_windows_score_each_token_once_with_its_context():
    model, doc, window = tiny_lm(), _doc(24), 8
    nll = []
    with torch.no_grad():  # stride 1: token t is predicted from the window - 1 tokens before it
        for t in range(1, len(doc)):
            ids = torch.tensor([doc[max(0, t + 1 - window) : t + 1]])
            nll.append(-torch.log_softmax(model(ids).logits[0, -2], -1)[doc[t]].item())
    score = lm_score(model, [doc], window=window, stride=1)
    assert score.tokens_scored == 23
    assert score.loss == pytest.approx(sum(nll) / len(nll), rel=1e-5)


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 3), (5, 1), (64, 64)])
def test_token_counts_are_honest(window, stride):
    docs = [_doc(30, 1), _doc(2, 2), _doc(17, 3)]
    score = lm_score(tiny_lm(layers=2), docs, window=window, stride=stride)
    assert score.tokens_scored == 29 + 1 + 16  # every token but each document's first
    assert score.tokens_total == 49 and score.documents == 3


def test_full_plan_equals_unmodified_model_and_plans_differ():
    plain = tiny_lm(layers=4, seed=1)
    routed = kvroute.apply(copy.deepcopy(plain), plan="full")
    docs = [_doc(40, 5)]
    reference = lm_score(plain, docs, window=16, stride=8)
    assert lm_score(routed, docs, window=16, stride=8).loss == pytest.approx(reference.loss, rel=1e-6)
    losses = {}
    for spec in ("full", "every:2", "every:4"):
        kvroute.set_plan(routed, spec)
        losses[spec] = lm_score(routed, docs, window=16, stride=8).loss
    assert len({round(v, 6) for v in losses.values()}) == 3, losses


# ------------------------------------------------------------------ QA and multiple choice
def test_qa_generates_through_the_shared_cache_like_a_full_forward():
    from kvroute.hf.cache import DummyLayer

    tok, model = tiny_tokenizer(), kvroute.apply(tiny_lm(seed=1), plan="every:2")
    ex = QARecord("Hunaes is the capital.", "What is the capital?", ("Hunaes",), "0")
    caches = []  # runs after kvroute's own hook: sees the cache the layers get
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: caches.append(kwargs.get("cache", kwargs.get("past_key_values"))), with_kwargs=True
    )
    metrics, preds = qa_score(model, tok, [ex], max_new_tokens=6)
    assert len(caches) > 1 and all(c is caches[0] for c in caches)  # prefill, then decode steps on one cache
    assert [isinstance(layer, DummyLayer) for layer in caches[0].layers] == [False, True, False, True]
    expected = tok.decode(greedy_without_cache(model, qa_prompt_ids(tok, ex), 6, tok.eos_token_id),
                          skip_special_tokens=True)
    assert len(preds[0]["prediction"]) >= 4  # a random model, but not a trivial answer
    assert preds[0]["prediction"] == expected.strip().split("\n", 1)[0].strip()
    assert set(metrics) == {"f1", "exact_match", "rouge_l"}

    kvroute.set_plan(model, "full")  # another plan, another answer from the same random model
    _, preds_full = qa_score(model, tok, [ex], max_new_tokens=6)
    assert preds_full[0]["prediction"] != preds[0]["prediction"]


# ------------------------------------------------------------------ greedy continuations
SENTENCES = "".join(f"Sentence {chr(65 + i)} is here. " for i in range(12))  # 12 starts, "Sentence A" .. "L"


def test_continuation_prompts_are_sentence_starts_spread_over_the_text():
    tok = tiny_tokenizer()
    text = TextSet("t", ("a.txt", "b.txt"), (SENTENCES[:120], "  " + SENTENCES[120:].replace(" ", "\n ")))
    prompts = [tok.decode(p) for p in continuation_prompts(tok, text, 4, 10)]
    # the documents hold 6 + 6 sentences (the second's whitespace collapsed): the 4 prompts start at the
    # sentences nearest 1/8, 3/8, 5/8 and 7/8 of the way through
    assert prompts == ["Sentence B", "Sentence E", "Sentence H", "Sentence K"]
    assert continuation_prompts(tok, text, 4, 10) == continuation_prompts(tok, text, 4, 10)
    every = [tok.decode(p) for p in continuation_prompts(tok, text, 12, 10)]
    assert sorted(every) == [f"Sentence {chr(65 + i)}" for i in range(12)]  # each start at most once
    # a start without 20 characters after it in its document is passed over: each document ends with
    # "Sentence F is here." / "Sentence L is here." (19 characters once whitespace is collapsed)
    ten = [tok.decode(p) for p in continuation_prompts(tok, text, 10, 20)]
    assert len(ten) == 10 and not any(p.startswith(("Sentence F", "Sentence L")) for p in ten)
    with pytest.raises(ValueError, match="only 10 sentence starts with 20 tokens after them, fewer than the 12"):
        continuation_prompts(tok, text, 12, 20)
    # a tokenizer that adds BOS gets it in front of each prompt, as QA prompts do
    from tokenizers.processors import TemplateProcessing

    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    with_bos = continuation_prompts(tok, text, 4, 10)
    assert [p[0] for p in with_bos] == [1] * 4 and [tok.decode(p[1:]) for p in with_bos] == prompts


def test_continuations_decode_through_the_shared_cache_like_full_forwards():
    from kvroute.hf.cache import DummyLayer

    tok, model = tiny_tokenizer(), kvroute.apply(tiny_lm(seed=1), plan="every:2")
    prompts = [tok(s, add_special_tokens=False)["input_ids"] for s in ("Sentence A", "Sentence B", "Different!")]
    caches = []  # runs after kvroute's own hook: sees the cache the layers get
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: caches.append(kwargs.get("cache", kwargs.get("past_key_values"))), with_kwargs=True
    )
    metrics, preds = continuation_score(model, tok, prompts, new_tokens=12, batch_size=2)
    assert [isinstance(layer, DummyLayer) for layer in caches[0].layers] == [False, True, False, True]
    d2 = []
    for prompt, pred in zip(prompts, preds):
        expected = greedy_without_cache(model, prompt, 12, tok.eos_token_id)  # stops after EOS, as the row is cut
        assert pred["prompt"] == tok.decode(prompt) and pred["continuation"] == tok.decode(expected, skip_special_tokens=True)
        assert pred["tokens"] == len(expected) and pred["ended"] == (expected[-1] == tok.eos_token_id)
        assert pred["distinct2"] == distinct_n(expected, 2) and pred["non_degenerate"] == (pred["distinct2"] >= 0.5)
        d2.append(pred["distinct2"])
    assert metrics == {"distinct2": pytest.approx(sum(d2) / 3),
                       "non_degenerate": pytest.approx(sum(d >= 0.5 for d in d2) / 3)}
    assert continuation_score(model, tok, prompts, 12, batch_size=1) == (metrics, preds)  # batching changes nothing
    kvroute.set_plan(model, "full")  # another plan, other text from the same random model
    assert continuation_score(model, tok, prompts, 12)[1] != preds
    with pytest.raises(ValueError, match="same number of tokens"):
        continuation_score(model, tok, [[5, 6], [5]])


def test_a_looping_continuation_counts_as_degenerate():
    tok, model = tiny_tokenizer(), tiny_lm(seed=2)
    with torch.no_grad():  # every position predicts "a": the continuation is one token repeated
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[tok.convert_tokens_to_ids("a")] = 1e4
    metrics, preds = continuation_score(model, tok, [tok("Go", add_special_tokens=False)["input_ids"]], 8)
    assert preds[0]["continuation"] == "a" * 8 and preds[0]["distinct2"] == pytest.approx(1 / 7)
    assert metrics == {"distinct2": pytest.approx(1 / 7), "non_degenerate": 0.0}
    with torch.no_grad():  # EOS at once: the row is cut after it, and one token has no bigram
        model.lm_head.bias[tok.eos_token_id] = 2e4
    _, preds = continuation_score(model, tok, [tok("Go", add_special_tokens=False)["input_ids"]], 8)
    assert preds[0]["continuation"] == "" and preds[0]["tokens"] == 1 and preds[0]["ended"]
    assert preds[0]["distinct2"] == 0.0


def test_choice_logprobs_by_hand():
    tok, model = tiny_tokenizer(), tiny_lm(seed=3)
    ex = MCExample("0", "Q: colour?\nA:", ("indigo", "teal"), 0, " ")
    lls = choice_logprobs(model, tok, ex)
    ctx = tok(ex.context)["input_ids"]
    for ll, choice in zip(lls, ex.choices):
        whole = tok(ex.context + " " + choice)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0], -1)
        expected = sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))
        assert ll == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ datasets
def test_dataset_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "question": "q", "answer": "a"}\n{"context": "c", "answer": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field\(s\) 'question'"):
        read_qa([bad])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty dataset"):
        read_qa([empty])
    with pytest.raises(ValueError, match="empty dataset"):
        load_mc(empty)
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"context": "c", "choices": ["a", "b"], "answer": "z"}\n')
    with pytest.raises(ValueError, match="not one of the choices"):
        load_mc(mc)
    with pytest.raises(FileNotFoundError, match="--qa: file not found"):
        read_qa([tmp_path / "nope.jsonl"], flag="--qa")
    with pytest.raises(FileNotFoundError, match="--text: folder .* has no .txt"):
        load_eval_text(tmp_path)


def test_bigbench_task_json(tmp_path):
    task = {"examples": [
        {"input": "2 + 2", "target_scores": {"3": 0, "4": 1}},
        {"input": "free text", "target": "only generative"},
        {"input": "1 + 1", "target_scores": {"2": 1, "11": 0}},
    ]}
    (tmp_path / "task.json").write_text(json.dumps(task))
    examples = load_mc(tmp_path / "task.json")
    assert [(e.choices, e.answer) for e in examples] == [(("3", "4"), 1), (("2", "11"), 0)]
    assert examples[0].context == "Q: 2 + 2\n  choice: 3\n  choice: 4\nA:" and examples[0].delimiter == " "


# ------------------------------------------------------------------ the whole run and its files
@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    ckpt = make_model_dir(root / "ckpt", layers=4, seed=4, tokenizer="chars")
    (root / "text").mkdir()
    (root / "text" / "a.txt").write_text(TEXT * 2)
    (root / "text" / "b.txt").write_text(TEXT)
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"context": f"The capital is Hunaes{i}.", "question": "Capital?",
                                      "answer": f"Hunaes{i}"}) + "\n" for i in range(2)))
    mc = root / "mc.jsonl"
    mc.write_text(json.dumps({"context": "Colour?", "choices": ["indigo", "teal"], "answer": 1}) + "\n")
    return root, ckpt, qa, mc


def test_eval_cli_writes_self_describing_results(eval_inputs, tmp_path, capsys):
    root, ckpt, qa, mc = eval_inputs
    out = tmp_path / "out"
    argv = ["eval", str(ckpt), "--plans", "full,every:2", "--text", str(root / "text"), "--qa", str(qa),
            "--mc", str(mc), "--out", str(out), "--window", "32", "--stride", "16", "--max-new-tokens", "4"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "every:2" in table and "50.0%" in table and "d f1" in table

    doc = json.loads((out / "results.json").read_text())
    rows = doc["rows"]
    assert doc["run"]["plans"] == ["full", "every:2"] and not doc["errors"]
    metrics = {"lm": ["loss", "perplexity"], "qa": ["f1", "exact_match", "rouge_l"], "mc": ["acc", "acc_norm"]}
    expected = {(p, t, m) for p in ("full", "every:2") for t, ms in metrics.items() for m in ms}
    assert {(r["plan"], r["task"], r["metric"]) for r in rows} == expected
    tokens = len(tiny_tokenizer()(TEXT * 2)["input_ids"]) + len(tiny_tokenizer()(TEXT)["input_ids"])
    for r in rows:
        assert r["checkpoint"] == str(ckpt) and r["model_type"] == "llama" and r["num_layers"] == 4
        full = r["plan"] == "full"
        assert r["retention"] == (1.0 if full else 0.5) and r["owners"] == (4 if full else 2)
        assert r["plan_source"] == ("0,1,2,3" if full else "0,0,2,2")
        # 2 (K and V) x owners x 2 KV heads x head_dim 8 x 4 bytes (float32) / 1024
        assert r["kv_kib_per_token"] == pytest.approx(2 * r["owners"] * 2 * 8 * 4 / 1024) and r["kv_dtype"] == "float32"
        if full:
            assert r["delta_vs_full"] == 0.0
        if r["task"] == "lm":
            assert r["tokens_total"] == tokens and r["tokens_scored"] == tokens - 2 and r["data"] == str(root / "text")
    loss = {r["plan"]: r["value"] for r in rows if r["metric"] == "loss"}
    delta = next(r["delta_vs_full"] for r in rows if r["metric"] == "loss" and r["plan"] == "every:2")
    assert delta == pytest.approx(loss["every:2"] - loss["full"]) and delta != 0

    with (out / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    described = {"plan", "plan_source", "retention", "kv_kib_per_token", "checkpoint", "data", "tokens_scored"}
    assert described <= set(csv_rows[0])
    assert float(csv_rows[0]["value"]) == pytest.approx(rows[0]["value"])
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2 * 2  # 2 questions x 2 plans
    # QA and multiple-choice rows carry the standard error of their mean over the examples; perplexity none
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for r in rows:
        if r["task"] == "qa":
            per_question = [p[r["metric"]] for p in predictions if p["plan"] == r["plan"]]
            assert r["stderr"] == pytest.approx(standard_error(per_question))
        else:
            assert r["stderr"] == (None if r["task"] == "lm" else 0.0)  # one multiple-choice example: no spread
    f1 = next(r for r in rows if r["metric"] == "f1" and r["plan"] == "full")
    assert f"{f1['value']:.4f} ±{f1['stderr']:.4f}" in table and "stderr" in csv_rows[0]
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (3 * 660, 504)  # one 5.5 x 4.2 inch panel per dataset at 120 dpi

    # --compare merges result files: here the same run under another checkpoint name
    other = json.loads((out / "results.json").read_text())
    for r in other["rows"]:
        r["checkpoint"], r["value"] = "other", r["value"] + 1
    (tmp_path / "other.json").write_text(json.dumps(other))
    merged_out = tmp_path / "merged"
    assert main(["eval", "--compare", str(out), str(tmp_path / "other.json"), "--out", str(merged_out)]) == 0
    merged = json.loads((merged_out / "results.json").read_text())["rows"]
    assert len(merged) == 2 * len(rows) and {r["checkpoint"] for r in merged} == {str(ckpt), "other"}
    assert "other" in capsys.readouterr().out and (merged_out / "pareto.png").is_file()
    single = merge_results([out])
    def key(r):
        return r["plan"], r["metric"], r["value"]

    assert [key(r) for r in single] == [key(r) for r in rows]


def test_eval_cli_scores_greedy_continuations(eval_inputs, tmp_path, capsys):
    root, ckpt, _, _ = eval_inputs
    out = tmp_path / "out"
    args = ["eval", str(ckpt), "--plans", "full,every:2", "--continuations", str(root / "text"), "--prompts", "3",
            "--prompt-tokens", "8", "--continuation-tokens", "6", "--continuation-batch-size", "2", "--out", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["plan"], r["task"], r["metric"]) for r in rows} == {
        (p, "continuation", m) for p in ("full", "every:2") for m in ("distinct2", "non_degenerate")}
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    # the text holds three sentences (two in a.txt, one in b.txt): each starts one prompt, under each plan
    assert sorted(p["prompt"] for p in predictions) == ["The ligh"] * 6
    for r in rows:
        per_prompt = [p[r["metric"]] for p in predictions if p["plan"] == r["plan"]]
        assert r["n"] == 3 and r["value"] == pytest.approx(sum(per_prompt) / 3)
        assert r["stderr"] == pytest.approx(standard_error(per_prompt)) and r["higher_is_better"]
    assert "distinct2" in table and "non_degenerate" in table and (out / "pareto.png").is_file()

    # the flag takes one path each time, so it may come before the checkpoint
    flag_first = ["eval", "--continuations", str(root / "text"), str(ckpt), *args[2:4], *args[6:-1],
                  str(tmp_path / "first")]
    assert main(flag_first) == 0
    assert json.loads((tmp_path / "first" / "results.json").read_text())["rows"][0]["value"] == rows[0]["value"]
    # more prompts than the text has sentence starts: a clear error before any model loads, nothing written
    assert main([*args[:-1], str(tmp_path / "more"), "--prompts", "4"]) != 0
    assert "only 3 sentence starts with 8 tokens after them, fewer than the 4" in capsys.readouterr().err
    assert not (tmp_path / "more" / "results.json").exists()
    with pytest.raises(ValueError, match="--continuation-tokens must be positive"):
        EvalConfig([str(ckpt)], continuations=[str(root / "text")], continuation_tokens=0)


def test_eval_says_which_plans_ran_calibrated(eval_inputs, tmp_path, capsys):
    root, _, qa, _ = eval_inputs
    model = kvroute.apply(tiny_lm(layers=4, seed=4))
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tiny_tokenizer())
    args = [str(ckpt), "--plans", "full,every:2,every:4", "--text", str(root / "text"), "--qa", str(qa),
            "--window", "32", "--stride", "16", "--max-new-tokens", "4"]
    assert main(["eval", *args, "--out", str(tmp_path / "before")]) == 0
    data = torch.randint(4, 100, (24, 32), generator=torch.Generator().manual_seed(0))
    calibrate(model, "every:2", data, CalibrationConfig(tokens=1024, chunk_tokens=32, val_fraction=0.25),
              progress=False)
    save_calibration(model, ckpt)  # in place, as `kvroute calibrate CKPT` does
    capsys.readouterr()
    assert main(["eval", *args, "--out", str(tmp_path / "after")]) == 0
    table = capsys.readouterr().out
    assert "every:2 (cal)" in table and "(cal): calibrated plan" in table
    assert "every:4 (cal)" not in table and "full (cal)" not in table

    before = json.loads((tmp_path / "before" / "results.json").read_text())["rows"]
    after = json.loads((tmp_path / "after" / "results.json").read_text())["rows"]
    assert {(r["plan"], r["calibrated"]) for r in before} == {("full", False), ("every:2", False), ("every:4", False)}
    assert {(r["plan"], r["calibrated"]) for r in after} == {("full", False), ("every:2", True), ("every:4", False)}

    def loss(rows, plan):
        return next(r["value"] for r in rows if r["plan"] == plan and r["metric"] == "loss")

    assert loss(after, "every:2") != pytest.approx(loss(before, "every:2"), rel=1e-4)  # the maps ran
    assert loss(after, "every:4") == pytest.approx(loss(before, "every:4"), rel=1e-6)
    assert loss(after, "full") == pytest.approx(loss(before, "full"), rel=1e-6)
    with (tmp_path / "after" / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[reader.fieldnames.index("plan") + 1] == "calibrated"
        assert {(r["plan"], r["calibrated"]) for r in reader} == {("full", "False"), ("every:2", "True"),
                                                                  ("every:4", "False")}
    predictions = [json.loads(line) for line in (tmp_path / "after" / "predictions.jsonl").read_text().splitlines()]
    assert {(p["plan"], p["calibrated"]) for p in predictions} == {(r["plan"], r["calibrated"]) for r in after}

    # --compare keeps a plan run before and after calibration apart; a file from before the field = uncalibrated
    old = json.loads((tmp_path / "before" / "results.json").read_text())
    for r in old["rows"]:
        del r["calibrated"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    for first in ("before", "old.json"):
        assert main(["eval", "--compare", str(tmp_path / first), str(tmp_path / "after"),
                     "--out", str(tmp_path / "merged")]) == 0
        merged = json.loads((tmp_path / "merged" / "results.json").read_text())["rows"]
        kept = sorted((r["plan"], bool(r.get("calibrated"))) for r in merged if r["metric"] == "loss")
        assert kept == [("every:2", False), ("every:2", True), ("every:4", False), ("full", False)], first
        assert {r["source_file"] for r in merged if r["plan"] == "full"} == {str(tmp_path / "after")}
        table = capsys.readouterr().out
        assert "every:2 (cal)" in table and "  every:2  " in table
    assert (tmp_path / "merged" / "pareto.png").is_file()


def test_a_failing_plan_leaves_the_other_results_on_disk(eval_inputs, tmp_path, monkeypatch):
    import kvroute.evaluate as ev

    root, ckpt, qa, _ = eval_inputs
    real = ev.lm_score

    def flaky(model, *args, **kwargs):
        if kvroute.get_router(model).plan.spec == "every:2":
            raise RuntimeError("out of memory (simulated)")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ev, "lm_score", flaky)
    config = EvalConfig([str(ckpt)], plans="full,every:2,every:4", text=[str(root / "text")],
                        out=str(tmp_path), window=32, stride=16)
    writer = evaluate(config, progress=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {r["plan"] for r in doc["rows"]} == {"full", "every:4"}
    assert doc["errors"][0]["plan"] == "every:2" and "simulated" in doc["errors"][0]["error"]
    assert len(writer.errors) == 1 and "every:4" in format_table(writer.rows)


def test_eval_in_bf16_autocast_is_recorded_and_close_to_fp32(eval_inputs, tmp_path):
    root, ckpt, qa, _ = eval_inputs
    args = [str(ckpt), "--plans", "full,every:2", "--text", str(root / "text"), "--qa", str(qa),
            "--window", "32", "--stride", "16", "--max-new-tokens", "4"]
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["eval", *args, "--precision", precision, "--out", str(out)]) == 0
        doc = json.loads((out / "results.json").read_text())
        assert doc["run"]["precision"] == precision and not doc["errors"]
        assert {r["precision"] for r in doc["rows"]} == {precision}
        assert {r["task"] for r in doc["rows"]} == {"lm", "qa"}  # QA generates through the cache under autocast
        losses[precision] = {r["plan"]: r["value"] for r in doc["rows"] if r["metric"] == "loss"}
        with (out / "results.csv").open() as f:
            assert {row["precision"] for row in csv.DictReader(f)} == {precision}
    for plan in ("full", "every:2"):  # bf16 matmuls: close, not the same numbers
        assert losses["bf16"][plan] == pytest.approx(losses["fp32"][plan], rel=2e-2)
        assert losses["bf16"][plan] != losses["fp32"][plan]
    assert main(["eval", *args, "--precision", "fp32", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())["rows"]
    assert {r["plan"]: r["value"] for r in again if r["metric"] == "loss"} == losses["fp32"]  # fp32 untouched
    with pytest.raises(ValueError, match="--precision must be one of"):
        EvalConfig([str(ckpt)], plans="full", text=[str(root / "text")], precision="fp16")


def test_bf16_scoring_casts_each_weight_once_however_many_tokens_it_decodes():
    """autocast keeps its bf16 copies of the weights only outside inference mode: greedy QA casts the
    weights once per scoring call, not once per decoded token (kvroute.precision.autocast)."""
    from torch.profiler import profile

    from kvroute.precision import autocast

    model = kvroute.apply(tiny_lm(layers=4, seed=4)).eval()
    weight_shapes = [list(p.shape) for p in model.parameters() if p.dim() == 2]
    tok = tiny_tokenizer()
    record = QARecord("The capital is Hunaes.", "Capital?", ("Hunaes",))
    casts, forwards = {}, {}
    for new_tokens in (2, 8):
        with autocast("bf16", "cpu"), profile(record_shapes=True) as prof:
            qa_score(model, tok, [record], max_new_tokens=new_tokens)
        events = prof.events()
        casts[new_tokens] = sum(1 for e in events if e.name == "aten::_to_copy" and e.input_shapes
                                and e.input_shapes[0] in weight_shapes)
        forwards[new_tokens] = sum(1 for e in events if e.name == "aten::embedding")
    assert forwards[8] > forwards[2]  # it decoded further
    assert 0 < casts[2] == casts[8]


def test_bad_inputs_give_clear_messages(eval_inputs, tmp_path, capsys):
    root, ckpt, qa, _ = eval_inputs
    base = ["--qa", str(qa), "--out", str(tmp_path / "out")]
    assert main(["eval", str(tmp_path / "missing-ckpt"), *base]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["eval", str(ckpt), "--plans", "full,bogus:3", *base]) == 2
    assert "unknown kind 'bogus'" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--qa", str(tmp_path / "none.jsonl")]) == 2
    assert "--qa: file not found" in capsys.readouterr().err
    assert main(["eval", str(ckpt)]) == 2
    assert "at least one dataset" in capsys.readouterr().err


def test_pareto_plot_needs_a_plottable_metric(tmp_path):
    from kvroute.plots import pareto_plot

    row = {"checkpoint": "c", "plan": "full", "task": "qa", "data": "d", "metric": "rouge_l", "value": 1.0,
           "kv_kib_per_token": 1.0, "retention": 1.0}
    with pytest.raises(ValueError, match="nothing to plot"):
        pareto_plot([row], tmp_path / "p.png")
    assert pareto_plot([row], tmp_path / "p.png", metrics={"qa": "rouge_l"}).is_file()


def test_pareto_plot_marks_calibrated_plans(tmp_path, monkeypatch):
    import matplotlib.axes

    from kvroute.plots import pareto_plot

    rows = [{"checkpoint": "c", "plan": plan, "calibrated": cal, "task": "lm", "data": "d", "metric": "loss",
             "value": value, "kv_kib_per_token": kib, "retention": kib / 4}
            for plan, cal, value, kib in (("full", False, 3.0, 4.0), ("every:2", True, 3.5, 2.0),
                                          ("every:4", False, 5.0, 1.0))]
    labels, markers = [], []
    real_annotate, real_plot = matplotlib.axes.Axes.annotate, matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **k: labels.append(text) or real_annotate(self, text, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: markers.append((k.get("marker"), len(a[0]) if a else 0))
                        or real_plot(self, *a, **k))
    pareto_plot(rows, tmp_path / "p.png")
    assert sorted(labels) == ["every:2 (cal)", "every:4", "full"]
    assert ("*", 1) in markers  # the one calibrated point, drawn as a star


def test_window_longer_than_the_model_context_is_refused(eval_inputs, tmp_path):
    root, ckpt, _, _ = eval_inputs
    config = EvalConfig([str(ckpt)], plans="full", text=[str(root / "text")], out=str(tmp_path), window=512)
    with pytest.raises(ValueError, match="--window 512 is longer than .* context \\(256 tokens\\)"):
        evaluate(config, progress=False)


def test_greedy_qa_ignores_the_checkpoints_generation_config():
    """A repetition penalty saved with a checkpoint must not change greedy QA scores."""
    tok, model = tiny_tokenizer(), kvroute.apply(tiny_lm(seed=1), plan="every:2")
    ex = QARecord("Hunaes is the capital.", "What is the capital?", ("Hunaes",), "0")
    _, plain = qa_score(model, tok, [ex], max_new_tokens=6)
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    _, penalised = qa_score(model, tok, [ex], max_new_tokens=6)
    assert penalised[0]["prediction"] == plain[0]["prediction"]
    assert model.generation_config.repetition_penalty == 50.0  # the model's own config is left as it was
    expected = tok.decode(greedy_without_cache(model, qa_prompt_ids(tok, ex), 6, tok.eos_token_id),
                          skip_special_tokens=True)
    assert plain[0]["prediction"] == expected.strip().split("\n", 1)[0].strip()


def test_lm_windows_follow_the_model_context_and_the_stride_the_window(eval_inputs, tmp_path, capsys):
    """Default flags on a model whose context (256) is shorter than the default window (1024) work,
    and --window alone brings the stride along (half the window)."""
    root, ckpt, _, _ = eval_inputs
    for extra, window, stride in (([], 256, 128), (["--window", "16"], 16, 8), (["--stride", "4"], 256, 4)):
        out = tmp_path / f"w{window}-{stride}"
        assert main(["eval", str(ckpt), "--plans", "full", "--text", str(root / "text"), "--out", str(out),
                     "--no-plot", *extra]) == 0, capsys.readouterr().err
        rows = json.loads((out / "results.json").read_text())["rows"]
        assert {(r["window"], r["stride"]) for r in rows} == {(window, stride)}
    assert main(["eval", str(ckpt), "--text", str(root / "text"), "--window", "8", "--stride", "16"]) == 2
    assert "--stride must be in 1..--window (8), got 16" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--text", str(root / "text"), "--window", "512"]) == 2
    assert "is longer than" in capsys.readouterr().err


def _results_file(folder, checkpoint: str, losses: dict[str, float]):
    writer = ResultWriter(folder, run={"checkpoints": [checkpoint]})
    for plan, loss in losses.items():
        info = {"checkpoint": checkpoint, "plan": plan, "calibrated": False, "kv_kib_per_token": 1.0,
                "retention": 1.0 if plan == "full" else 0.5, "task": "lm", "data": "text"}
        writer.add(info, {"loss": loss})
    return writer.json_path


def test_compare_results_merges_and_writes(tmp_path):
    a = _results_file(tmp_path / "a", "ckpt", {"full": 2.0, "every:2": 2.5})
    b = _results_file(tmp_path / "b", "ckpt", {"every:2": 2.25})  # a later file wins on the same row
    c = _results_file(tmp_path / "c", "other", {"full": 3.0})
    writer = compare_results([tmp_path / "a", b, c], tmp_path / "merged")
    assert {(r["checkpoint"], r["plan"]): r["value"] for r in writer.rows} == {
        ("ckpt", "full"): 2.0, ("ckpt", "every:2"): 2.25, ("other", "full"): 3.0}
    assert next(r for r in writer.rows if r["plan"] == "every:2")["delta_vs_full"] == pytest.approx(0.25)
    assert writer.json_path == tmp_path / "merged" / "results.json" and writer.csv_path.is_file()
    doc = json.loads(writer.json_path.read_text())
    assert doc["run"] == {"compare": [str(tmp_path / "a"), str(b), str(c)]} and doc["rows"] == writer.rows
    assert {r["source_file"] for r in doc["rows"] if r["plan"] == "every:2"} == {str(b)}
    assert a.is_file()
    with pytest.raises(ValueError, match="at least one results.json"):
        compare_results([], tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="result file not found"):
        compare_results([tmp_path / "missing"], tmp_path / "none")


@pytest.mark.parametrize("plan,kv_quant", [("full", None), ("every:2", None), ("every:2", "int8-residual-2")])
def test_qa_batches_answer_as_each_prompt_alone_and_keep_the_order(plan, kv_quant):
    """Left-padded batches of prompts of different lengths (sorted by length inside qa_score) give each
    prompt the answer it gets alone, and the predictions come back in the examples' order; also through
    an int8 cache whose residual window is short enough that the prompts' KV is quantized."""
    from kvroute.hf.patch import set_kv_quant
    from kvroute.kvquant import KVQuant

    tok, model = tiny_tokenizer(), kvroute.apply(tiny_lm(seed=1), plan=plan)
    if kv_quant:
        set_kv_quant(model, KVQuant(8, residual=2))
    contexts = ["Hunaes is the capital.", "The river Olt runs past the old mill and the long wall of the town.",
                "Tessaly grows figs.", "Marrow Hill is north of the sea, beyond the three bridges of Cuvan.",
                "Pell sings."]
    examples = [QARecord(c, f"What about item {i}?", ("Hunaes",), str(i)) for i, c in enumerate(contexts)]
    alone = [qa_score(model, tok, [ex], max_new_tokens=6, batch_size=1)[1][0] for ex in examples]
    metrics, batched = qa_score(model, tok, examples, max_new_tokens=6, batch_size=3)
    assert [p["id"] for p in batched] == [ex.id for ex in examples]
    assert [p["prediction"] for p in batched] == [p["prediction"] for p in alone]
    assert len({p["prediction"] for p in alone}) > 1  # the prompts really get different answers
    assert metrics["f1"] == pytest.approx(sum(p["f1"] for p in alone) / len(alone))
    with pytest.raises(ValueError, match="batch size"):
        qa_score(model, tok, examples, batch_size=0)
