"""Flags generated from the config dataclasses: one flag per field, --config FILE, precedence, errors."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import types

import pytest

from kvroute.calibrate import CalibrationConfig
from kvroute.cli import build_parser, main
from kvroute.config_cli import config_from_args, field_docs, flag_dests
from kvroute.evaluate import EvalConfig
from kvroute.train import TrainConfig

#: command -> the config dataclass its flags come from
CONFIGS = {"train": TrainConfig, "eval": EvalConfig, "calibrate": CalibrationConfig}


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[command]


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_field_has_a_flag_and_every_flag_a_field(command):
    cli_only = set(importlib.import_module(f"kvroute.commands.{command}").CLI_ONLY)
    fields = {f.name for f in dataclasses.fields(CONFIGS[command])}
    dests = flag_dests(_subparser(command))
    assert fields - dests == set(), "config fields without a flag"
    assert dests - fields - {"_run"} == cli_only, "flags that are no config field (declare them in CLI_ONLY)"
    assert cli_only <= dests, "CLI_ONLY names a flag the command does not have"


@pytest.mark.parametrize("cls", list(CONFIGS.values()), ids=list(CONFIGS))
def test_every_field_is_documented(cls):
    docs = field_docs(cls)
    assert [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)] == []


def _train_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_no_flags_gives_the_dataclass_defaults():
    config = config_from_args(TrainConfig, _train_args("m", "--data", "d"))
    assert config == TrainConfig(data=["d"], model="m")


def test_flags_map_to_fields():
    args = _train_args("m", "--data", "a", "b", "-o", "out", "--betas", "0.8", "0.9", "--no-tensorboard",
                       "--pair-maps", "--resume", "--schedule", "linear")
    config = config_from_args(TrainConfig, args)
    assert config.data == ["a", "b"] and config.output_dir == "out" and config.betas == (0.8, 0.9)
    assert not config.tensorboard and config.pair_maps and config.resume == "latest"
    assert config.schedule == "linear"
    with pytest.raises(SystemExit):
        _train_args("m", "--data", "d", "--schedule", "step")  # Literal choices are enforced


def test_config_file_toml_and_flags_override_it(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('data = ["a.txt"]\nmax_steps = 7\nlr = 0.5\nbetas = [0.8, 0.9]\n"seq-len" = 64\n'
                    'tensorboard = false\n')
    config = config_from_args(TrainConfig, _train_args("m", "--config", str(path), "--lr", "0.25"))
    assert config.data == ["a.txt"] and config.max_steps == 7 and config.seq_len == 64
    assert config.lr == 0.25  # the flag wins over the file
    assert config.betas == (0.8, 0.9) and config.tensorboard is False


def test_config_file_yaml(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: [a.txt, b.txt]\nrouting: cla:2\nmax_steps: 3\n")
    config = config_from_args(TrainConfig, _train_args("--config", str(path), "--max-steps", "5"))
    assert config.model == "m" and config.data == ["a.txt", "b.txt"] and config.routing == "cla:2"
    assert config.max_steps == 5


def test_unknown_key_in_config_file_is_an_error_naming_it(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('data = ["a.txt"]\nmax_stepz = 3\n')
    assert main(["train", "m", "--config", str(path)]) == 2
    assert "unknown option 'max_stepz'" in capsys.readouterr().err


def test_bad_config_files(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{}")
    for path, message in ((tmp_path / "missing.toml", "no such file"), (tmp_path / "run.json", "expected a .toml")):
        assert main(["train", "m", "--data", "d", "--config", str(path)]) == 2
        assert message in capsys.readouterr().err
    assert main(["train", "m"]) == 2
    assert "--data: required" in capsys.readouterr().err


def _fake_train(monkeypatch) -> list[TrainConfig]:
    import kvroute.train

    seen: list[TrainConfig] = []

    def fake(config):
        seen.append(config)
        return types.SimpleNamespace(main_process=True, eval_loss={}, steps=0, final_checkpoint="x")

    monkeypatch.setattr(kvroute.train, "train", fake)
    return seen


def test_preset_flag(monkeypatch, capsys):
    seen = _fake_train(monkeypatch)
    assert main(["train", "--preset", "tiny", "--tokenizer", "t", "--data", "d", "--layers", "2"]) == 0
    assert seen[0].preset == "tiny" and seen[0].layers == 2 and seen[0].model is None
    assert "deprecated" not in capsys.readouterr().err


def test_config_preset_still_works_with_a_notice(monkeypatch, capsys, tmp_path):
    seen = _fake_train(monkeypatch)
    monkeypatch.chdir(tmp_path)  # no file named like the preset here
    assert main(["train", "--config", "tiny", "--tokenizer", "t", "--data", "d"]) == 0
    assert seen[0].preset == "tiny"
    err = capsys.readouterr().err
    assert "--config tiny" in err and "--preset tiny" in err


def test_eval_and_calibrate_read_config_files(tmp_path):
    from kvroute.config_cli import config_values

    path = tmp_path / "eval.toml"
    path.write_text('plans = "full,every:2"\ntext = ["a.txt"]\nwindow = 64\n')
    args = build_parser().parse_args(["eval", "ckpt", "--config", str(path), "--text", "b", "--text", "c"])
    values = config_values(EvalConfig, args)
    assert values == {"checkpoints": ["ckpt"], "plans": "full,every:2", "text": ["b", "c"], "window": 64}
    path = tmp_path / "cal.toml"
    path.write_text("tokens = 4096\nquery = false\n")
    args = build_parser().parse_args(["calibrate", "ckpt", "--data", "d", "--config", str(path), "--steps", "3"])
    assert config_from_args(CalibrationConfig, args) == CalibrationConfig(tokens=4096, query=False, steps=3)


def test_eval_without_checkpoints_names_the_problem(capsys):
    assert main(["eval", "--text", "t"]) == 2
    assert "give at least one checkpoint" in capsys.readouterr().err
