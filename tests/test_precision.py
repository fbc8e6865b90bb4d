"""`--precision auto`: bf16 autocast only where the hardware runs bfloat16 natively."""

import json

import pytest
import torch
from textkit import make_model_dir, write_corpus

from kvroute import precision
from kvroute.calibrate import CalibrationConfig


def _cpuinfo(tmp_path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
    return str(path)


@pytest.mark.parametrize("flags, fast", [("avx2 avx512f", False), ("avx512f amx_tile amx_bf16", True),
                                         ("avx512_bf16", True), ("", False)])
def test_cpu_flags(tmp_path, flags, fast):
    assert precision.cpu_has_fast_bf16.__wrapped__(_cpuinfo(tmp_path, flags)) is fast


def test_unreadable_cpuinfo_means_fp32(tmp_path):
    assert precision.cpu_has_fast_bf16.__wrapped__(str(tmp_path / "missing")) is False


def test_cpu_model_reads_the_first_processor(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2\n\n"
                    "processor\t: 1\nmodel name\t: other\nflags\t\t: amx_bf16\n")
    assert precision.cpu_model.__wrapped__(str(path)) == "AMD EPYC 7B13"
    assert precision.cpu_has_fast_bf16.__wrapped__(str(path)) is False  # the first processor's flags
    monkeypatch.setattr(precision.platform, "processor", lambda: "")
    assert precision.cpu_model.__wrapped__(str(tmp_path / "missing")) == "unknown"
    monkeypatch.setattr(precision.platform, "processor", lambda: "arm")
    assert precision.cpu_model.__wrapped__(str(tmp_path / "missing")) == "arm"


@pytest.mark.parametrize("fast, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_the_hardware(monkeypatch, fast, expected):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    assert precision.resolve_precision("auto", "cpu") == expected
    assert precision.resolve_precision("fp32", "cpu") == "fp32"  # explicit choices are kept
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    with precision.autocast("auto", "cpu"):
        out = torch.ones(4, 4) @ torch.ones(4, 4)
    assert out.dtype == (torch.bfloat16 if fast else torch.float32)


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16"):
        precision.resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="--precision"):
        CalibrationConfig(precision="half")


@pytest.mark.parametrize("fast", [True, False])
def test_train_defaults_to_auto_and_records_what_it_ran(tmp_path, monkeypatch, fast):
    from kvroute.train import TrainConfig, train

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    model, corpus = make_model_dir(tmp_path / "model"), write_corpus(tmp_path / "corpus")
    assert TrainConfig(data=[str(corpus)], model=str(model)).precision == "auto"
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(data=[str(corpus)], model=str(model), precision="fp16")
    out = tmp_path / "run"
    train(TrainConfig(data=[str(corpus)], model=str(model), output_dir=str(out), max_steps=1, seq_len=32,
                      batch_size=2, eval_every=0, device="cpu", quiet=True, tensorboard=False))
    assert json.loads((out / "run_config.json").read_text())["precision_resolved"] == ("bf16" if fast else "fp32")
