"""The ecosystem's trainers on routed models: HF Trainer, TRL's SFTTrainer and reference models, PEFT LoRA
applied before or after routing. Training draws R-CLA routes, eval runs the plan, a saved result loads routed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import record_routes
from textkit import tiny_lm, tiny_tokenizer

import kvroute

pytest.importorskip("accelerate")
datasets = pytest.importorskip("datasets")

LAYERS = 6
IDENTITY = tuple(range(LAYERS))


def routed(seed: int = 1):
    return kvroute.apply(tiny_lm(layers=LAYERS, seed=0), policy="rcla:p=0.5", plan="every:2", seed=seed)


def token_rows(n: int = 16, length: int = 12) -> "datasets.Dataset":
    ids = torch.randint(3, 60, (n, length), generator=torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class RouteLog:
    """A TrainerCallback that records the route of each step's last forward pass."""

    def __init__(self, model) -> None:
        from transformers import TrainerCallback

        outer = self
        self.routes: list[tuple[int, ...]] = []
        passes = record_routes(model)

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                outer.routes.append(passes[-1])

        self.callback = _Callback()


def assert_routed_training(routes: list[tuple[int, ...]]) -> None:
    assert len(routes) >= 3 and len(set(routes)) > 1 and any(r != IDENTITY for r in routes)


def assert_eval_runs_the_plan(model) -> None:
    model.eval()
    routes = record_routes(model)
    with torch.no_grad():
        model(torch.randint(3, 60, (1, 8)), use_cache=False)
    assert routes == [(0, 0, 2, 2, 4, 4)]


def training_args(out: Path, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, **extra)


def test_hf_trainer_trains_routed_and_saves_the_routing(tmp_path):
    from transformers import Trainer

    model = routed()
    log = RouteLog(model)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=token_rows(), data_collator=collate,
                      callbacks=[log.callback])
    trainer.train()
    assert_routed_training(log.routes)
    assert_eval_runs_the_plan(model)
    trainer.save_model(str(tmp_path / "final"))
    loaded = kvroute.load(tmp_path / "final")
    router = kvroute.get_router(loaded)
    assert router.plan.spec == "every:2" and router.policy.spec.startswith("rcla")


def test_trl_sft_trainer_trains_routed(tmp_path):
    trl = pytest.importorskip("trl")

    model = routed()
    log = RouteLog(model)
    config = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3,
                           report_to=[], use_cpu=True, save_strategy="no", remove_unused_columns=False,
                           dataset_kwargs={"skip_prepare_dataset": True})
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=token_rows(), data_collator=collate,
                             processing_class=tiny_tokenizer(), callbacks=[log.callback])
    trainer.train()
    assert_routed_training(log.routes)
    assert_eval_runs_the_plan(model)


def test_trl_reference_model_routes_on_its_own():
    """TRL's reference model is a deep copy: it must carry its own router and plan."""
    trl = pytest.importorskip("trl")

    model = routed()
    reference = trl.create_reference_model(model)
    assert kvroute.get_router(reference) is not kvroute.get_router(model)
    kvroute.set_plan(reference, "full")
    ids = torch.randint(3, 60, (1, 10))
    with torch.no_grad():
        shared = model.eval()(ids, use_cache=False).logits
        full = reference(ids, use_cache=False).logits
    assert kvroute.get_router(model).plan.spec == "every:2"
    assert (shared - full).abs().max() > 1e-4  # the reference ran its own plan, not the model's


@pytest.mark.parametrize("order", ["route then lora", "lora then route"])
def test_peft_lora_trains_routed_in_either_order(tmp_path, order):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    if order == "route then lora":
        model = get_peft_model(routed(), lora)
    else:
        model = kvroute.apply(get_peft_model(tiny_lm(layers=LAYERS, seed=0), lora), policy="rcla:p=0.5",
                              plan="every:2", seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    log = RouteLog(model)
    Trainer(model=model, args=training_args(tmp_path), train_dataset=token_rows(), data_collator=collate,
            callbacks=[log.callback]).train()
    assert_routed_training(log.routes)
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the adapters learned
    assert_eval_runs_the_plan(model)
    merged = model.merge_and_unload()
    kvroute.save_checkpoint(merged, tmp_path / "merged")
    loaded = kvroute.load(tmp_path / "merged")
    assert kvroute.get_router(loaded).plan.spec == "every:2"
    ids = torch.randint(3, 60, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, use_cache=False).logits, merged.eval()(ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-5)
