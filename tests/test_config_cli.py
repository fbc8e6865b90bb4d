"""Flags generated from the config dataclasses: one flag per field, --config FILE, precedence, errors."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import types

import pytest

from kvroute.bench import BenchConfig
from kvroute.calibrate import CalibrationConfig
from kvroute.cli import build_parser, main
from kvroute.config_cli import config_from_args, field_docs, flag_dests
from kvroute.evaluate import EvalConfig
from kvroute.search_run import SearchConfig
from kvroute.serving_bench import ServingBenchConfig
from kvroute.train import TrainConfig

#: command -> the config dataclasses its flags come from
CONFIGS = {"train": (TrainConfig,), "eval": (EvalConfig,), "calibrate": (CalibrationConfig,),
           "bench": (BenchConfig, ServingBenchConfig), "plan search": (SearchConfig,)}


def _subparser(command: str) -> argparse.ArgumentParser:
    """The parser of ``command``; ``"plan search"``: an action of a command."""
    parser = build_parser()
    for name in command.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_field_has_a_flag_and_every_flag_a_field(command):
    module = importlib.import_module(f"kvroute.commands.{command.split()[0]}")
    cli_only, renamed = set(module.CLI_ONLY), getattr(module, "FIELD_DESTS", {})
    fields = {renamed.get(f.name, f.name) for cls in CONFIGS[command] for f in dataclasses.fields(cls)}
    dests = flag_dests(_subparser(command))
    assert fields - dests == set(), "config fields without a flag"
    assert dests - fields - {"_run"} == cli_only, "flags that are no config field (declare them in CLI_ONLY)"
    assert cli_only <= dests, "CLI_ONLY names a flag the command does not have"


@pytest.mark.parametrize("cls", [c for classes in CONFIGS.values() for c in classes],
                         ids=[c.__name__ for classes in CONFIGS.values() for c in classes])
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


def _bench_config(*argv: str):
    from kvroute.commands.bench import config

    return config(build_parser().parse_args(["bench", *argv]))


def test_bench_flags_keep_their_spellings():
    config = _bench_config("ckpt", "--plans", "full,every:4", "--context", "512,2048", "--batch", "1,2",
                           "--new-tokens", "8", "--kv-budget", "1GiB", "--kv-quant", "none,int8", "--no-baseline",
                           "--random-weights", "--threads", "2", "--dtype", "bfloat16")
    assert config == BenchConfig(model="ckpt", plans=["full", "every:4"], contexts=[512, 2048], batches=[1, 2],
                                 new_tokens=8, kv_budget=2**30, kv_quant=["none", "int8"], baseline=False,
                                 random_weights=True, threads=2, dtype="bfloat16")
    assert _bench_config("--contexts", "64", "--batches", "4") == BenchConfig(contexts=[64], batches=[4])
    assert _bench_config() == BenchConfig()  # smollm2-135m, every:1,2,4,8, 32 new tokens, float32
    with pytest.raises(SystemExit):
        _bench_config("--context", "5x")  # argparse: expected comma-separated int values


def test_bench_vllm_flags_and_defaults(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    config = _bench_config(str(tmp_path), "--engine", "vllm", "--kv-cache-memory", "32MiB", "--requests", "4",
                           "--prompt-tokens", "16", "--max-num-seqs", "8", "--threads", "1", "--seed", "3")
    assert config == ServingBenchConfig(checkpoint=str(tmp_path), kv_cache_memory=32 * 2**20, requests=4,
                                        prompt_tokens=16, max_num_seqs=8, threads=1, seed=3)
    # the engine's own defaults where the flag is not given: 96 new tokens, bfloat16, full,every:2,every:4
    assert (config.new_tokens, config.dtype, config.plans) == (96, "bfloat16", ["full", "every:2", "every:4"])
    assert _bench_config(str(tmp_path), "--engine", "vllm", "--new-tokens", "5").new_tokens == 5
    with pytest.raises(FileNotFoundError, match="needs a checkpoint folder"):
        _bench_config("--engine", "vllm")  # the default model is a named shape, not a folder


def test_bench_config_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    path = tmp_path / "bench.toml"
    path.write_text(f'model = "{tmp_path}"\ncontexts = "256,512"\nbatches = [1, 4]\nkv_budget = "1MiB"\n'
                    'requests = 6\nnew_tokens = 4\n')  # fields of both engines' configs
    config = _bench_config("--config", str(path), "--batch", "2")
    assert config == BenchConfig(model=str(tmp_path), contexts=[256, 512], batches=[2], kv_budget=2**20,
                                 new_tokens=4)
    config = _bench_config("--config", str(path), "--engine", "vllm")
    assert config.checkpoint == str(tmp_path) and config.requests == 6 and config.new_tokens == 4
    path.write_text("contexts = [8]\nrequestz = 1\n")
    with pytest.raises(ValueError, match="unknown option 'requestz'"):
        _bench_config("--config", str(path))


def test_comma_list():
    from kvroute.config_cli import comma_list

    assert comma_list(int)("512, 1024,") == [512, 1024] and comma_list()("a,b") == ["a", "b"]
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated int values, got '1,x'"):
        comma_list(int)("1,x")
