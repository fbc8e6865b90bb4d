"""The demo's reuse of finished training runs (scripts/demo.py, ``stale_run``): a rerun reuses a run
only when its settings and its start are unchanged."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict
from pathlib import Path

from kvroute.train import TrainConfig
from textkit import make_model_dir, write_corpus

# loaded from its file: scripts/ is not a package
_SPEC = importlib.util.spec_from_file_location("kvroute_demo_script",
                                               Path(__file__).resolve().parents[1] / "scripts" / "demo.py")
_DEMO = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_DEMO)
stale_run, stale_calibration = _DEMO.stale_run, _DEMO.stale_calibration


def _finished(tmp_path: Path, **overrides) -> tuple[Path, TrainConfig]:
    """A run folder as a finished ``train()`` leaves it (run_config.json, final weights), and its config."""
    start = make_model_dir(tmp_path / "start")
    config = TrainConfig(model=str(start), data=[str(write_corpus(tmp_path / "corpus"))],
                         output_dir=str(tmp_path / "run"), max_steps=40, **overrides)
    run = Path(config.output_dir)
    (run / "final").mkdir(parents=True)
    (run / "final" / "model.safetensors").write_bytes(b"weights")
    (run / "run_config.json").write_text(json.dumps({**asdict(config), "precision_resolved": "fp32"}))
    return run, config


def test_an_unchanged_run_is_reused(tmp_path):
    run, config = _finished(tmp_path, seq_ul_prefix=16)
    assert stale_run(run, config) is None


def test_changed_settings_name_what_changed(tmp_path):
    run, config = _finished(tmp_path)
    shorter = TrainConfig(**{**asdict(config), "max_steps": 20})
    assert stale_run(run, shorter) == "its settings differ: max_steps 40 -> 20"


def test_a_setting_added_after_the_run_counts_at_its_default(tmp_path):
    run, config = _finished(tmp_path)
    saved = json.loads((run / "run_config.json").read_text())
    del saved["seq_ul_per_row"]  # as a run trained before the setting existed wrote it
    (run / "run_config.json").write_text(json.dumps(saved))
    assert stale_run(run, config) is None
    assert stale_run(run, TrainConfig(**{**asdict(config), "seq_ul_per_row": 4})) == (
        "its settings differ: seq_ul_per_row 1 -> 4")


def test_a_start_written_after_the_run_makes_it_stale(tmp_path):
    run, config = _finished(tmp_path)
    weights = run / "final" / "model.safetensors"
    start = next(Path(config.model).glob("*.safetensors"))
    os.utime(start, (weights.stat().st_mtime + 10,) * 2)  # an earlier stage retrained
    assert stale_run(run, config) == f"its start {config.model} was written after it"


def test_a_run_without_its_config_is_stale(tmp_path):
    run, config = _finished(tmp_path)
    (run / "run_config.json").unlink()
    assert stale_run(run, config) == "it has no run_config.json"


def _calibrated(tmp_path: Path, config) -> tuple[Path, Path]:
    """A checkpoint folder and the calibration of every:2 that ``kvroute.calibrate`` saved beside it."""
    import torch
    from transformers import AutoTokenizer

    import kvroute
    from conftest import tiny_model
    from kvroute.calibrate import calibrate
    from kvroute.calibration.store import CALIBRATION_FILE
    from kvroute.models import save_checkpoint
    from textkit import make_tokenizer

    model = kvroute.apply(tiny_model("llama", layers=4))
    data = torch.randint(3, 97, (24, 32), generator=torch.Generator().manual_seed(0))
    calibrate(model, "every:2", data, config, progress=False)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok")))
    return Path(ckpt), Path(ckpt) / CALIBRATION_FILE


def test_a_calibration_is_reused_only_with_its_settings_and_start(tmp_path):
    from dataclasses import replace

    from kvroute.calibrate import CalibrationConfig

    config = CalibrationConfig(tokens=1024, chunk_tokens=32, val_fraction=0.25, precision="fp32")
    ckpt, maps = _calibrated(tmp_path, config)
    assert stale_calibration(maps, ckpt, config) is None
    assert stale_calibration(maps, ckpt, replace(config, steps=10)) == "its settings differ: steps 0 -> 10"
    weights = next(ckpt.glob("model*.safetensors"))
    os.utime(weights, (maps.stat().st_mtime + 10,) * 2)  # the checkpoint was trained again
    assert stale_calibration(maps, ckpt, config) == f"its start {ckpt} was written after it"


def test_a_run_stopped_part_way_is_resumed_and_reporting_settings_do_not_count(tmp_path):
    run, config = _finished(tmp_path)
    (run / "final" / "model.safetensors").unlink()  # stopped before its final checkpoint
    assert stale_run(run, config) is None  # the demo resumes it (resume="latest")
    resumed = TrainConfig(**{**asdict(config), "resume": "latest", "quiet": True, "save_every": 7})
    (run / "run_config.json").write_text(json.dumps(asdict(resumed)))  # as the resumed run rewrites it
    assert stale_run(run, config) is None
    assert stale_run(run, TrainConfig(**{**asdict(config), "lr": 1e-3})).startswith("its settings differ: lr")
