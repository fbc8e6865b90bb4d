"""The lm-evaluation-harness adapter runs a local 5-example task under a sharing plan."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from textkit import make_model_dir, tiny_tokenizer  # noqa: E402

TASKS = Path(__file__).parent / "lm_eval_tasks"


def test_kvroute_model_runs_local_tasks_under_a_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import kvroute
    import kvroute.lm_eval_adapter  # noqa: F401  registers the "kvroute" model
    from kvroute.data.choice import MCExample
    from kvroute.evaluate import choice_logprobs

    ckpt = make_model_dir(tmp_path / "ckpt", layers=4, seed=6, tokenizer="chars")
    tasks = TaskManager(include_path=str(TASKS), include_defaults=False)  # no indexing of lm-eval's own tasks
    results = lm_eval.simple_evaluate(
        model="kvroute", model_args=f"pretrained={ckpt},plan=every:2", tasks=["kvroute_tiny_mc", "kvroute_tiny_qa"],
        task_manager=tasks, device="cpu", batch_size=1, log_samples=True,
    )
    assert results["results"]["kvroute_tiny_mc"]["acc,none"] in {0.0, 0.2, 0.4, 0.6, 0.8, 1.0}
    assert "exact_match,none" in results["results"]["kvroute_tiny_qa"]
    samples = results["samples"]["kvroute_tiny_mc"]
    assert len(samples) == 5 and len(results["samples"]["kvroute_tiny_qa"]) == 5

    # lm-eval's log-likelihoods are kvroute's under the same plan, and not those of the full cache
    model, tok = kvroute.load(ckpt, plan="every:2"), tiny_tokenizer()
    doc = samples[0]["doc"]
    prompt = f"Context: {doc['context']}\nQuestion: {doc['question']}\nAnswer:"  # the task's doc_to_text
    ex = MCExample("0", prompt, tuple(doc["choices"]), doc["label"])
    harness = [float(r[0][0]) for r in samples[0]["resps"]]
    assert harness == pytest.approx(choice_logprobs(model, tok, ex), rel=1e-4)
    kvroute.set_plan(model, "full")
    assert harness != pytest.approx(choice_logprobs(model, tok, ex), rel=1e-4)
