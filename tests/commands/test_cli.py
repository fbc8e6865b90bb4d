"""Smoke test of the CLI: every subcommand's --help, train -> eval -> generate on a tiny model, and how a
torchrun rank ends."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from textkit import make_model_dir, make_tokenizer, write_corpus, write_qa

import kvroute
from kvroute.calibrate import CalibrationConfig, calibrate
from kvroute.cli import build_parser, main
from kvroute.models import save_checkpoint

COMMANDS = ["bench", "calibrate", "convert", "data", "eval", "generate", "plan", "serve", "train"]


def test_every_command_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kvroute " + command)


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


def test_train_eval_generate_end_to_end(tmp_path, capsys):
    model = make_model_dir(tmp_path / "tiny")
    corpus = write_corpus(tmp_path / "text")
    qa = write_qa(tmp_path / "qa.jsonl", n=4)
    run = tmp_path / "run"
    assert main([
        "train", str(model), "--data", str(corpus), "-o", str(run), "--routing", "rcla", "--p", "0.5",
        "--plan", "every:2", "--seq-len", "32", "--batch-size", "2", "--max-steps", "3",
        "--eval-every", "0", "--no-tensorboard", "--quiet", "--device", "cpu",
    ]) == 0
    final = run / "final"
    saved = json.loads((final / "config.json").read_text())["kvroute"]
    assert saved["plan"] == "every:2" and saved["policy"]["name"] == "rcla"

    out = tmp_path / "eval"
    code = main([
        "eval", str(final), "--plans", "full,every:2", "--text", str(corpus), "--qa", str(qa),
        "--window", "32", "--stride", "32", "--max-new-tokens", "4", "--out", str(out), "--no-plot",
    ])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["plan"] for r in rows} == {"full", "every:2"}
    assert {r["task"] for r in rows} == {"lm", "qa"}

    capsys.readouterr()
    assert main(["generate", str(final), "w3 w4 w5", "--plan", "every:4", "--max-new-tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert "plan every:4" in err and "under full" in err and "distinct-2 " in err
    assert "calibrated" not in err  # this checkpoint has no calibration


def test_generate_says_when_its_plan_is_calibrated(tmp_path, capsys):
    from transformers import AutoTokenizer

    model = kvroute.apply(tiny_model("llama", layers=4))
    data = torch.randint(3, 97, (24, 32), generator=torch.Generator().manual_seed(0))
    calibrate(model, "every:2", data, CalibrationConfig(tokens=1024, chunk_tokens=32, val_fraction=0.25),
              progress=False)
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"))
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tok)
    for plan, calibrated in (("every:2", True), ("every:4", False), ("full", False)):
        capsys.readouterr()
        assert main(["generate", str(ckpt), "w3 w4 w5", "--plan", plan, "--max-new-tokens", "4"]) == 0
        summary = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"plan {plan}:" in summary and "distinct-2 " in summary
        assert summary.endswith(", calibrated") is calibrated, summary


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "hi"]) == 2
    assert "not found" in capsys.readouterr().err


RANK_SCRIPT = """
import atexit, sys
import torch.distributed as dist
if sys.argv[1] != "-":  # a two-process group; rank 1 only joins it
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=int(sys.argv[2]), world_size=2)
    dist.barrier()
    if sys.argv[2] == "1":
        import os
        os._exit(0)
atexit.register(print, "interpreter finalized")
from kvroute.cli import main
code = main(sys.argv[3:])
print("main returned", code)
sys.exit(code)
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
@pytest.mark.parametrize("group", [True, False])
def test_a_rank_leaves_without_finalizing_python(tmp_path, group):
    """A rank of a two-process group (a torchrun rank) ends its process with os._exit once its output is
    flushed: a gloo rank that let Python finalize aborted now and then after its work was done. Outside a
    group, main returns its code as usual."""

    def kvroute(*argv: str) -> subprocess.CompletedProcess:
        store = str(tmp_path / f"store-{argv[0]}") if group else "-"  # a fresh FileStore per command
        peer = (subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, store, "1"], stdout=subprocess.DEVNULL)
                if group else None)
        done = subprocess.run([sys.executable, "-c", RANK_SCRIPT, store, "0", *argv], capture_output=True,
                              text=True, timeout=120)
        if peer is not None:
            assert peer.wait(timeout=120) == 0
        return done

    done = kvroute("data", "fictional-qa", "--out", str(tmp_path / "qa"), "--train", "3", "--test", "2")
    assert done.returncode == 0, done.stderr
    assert "(3 records)" in done.stdout  # what the command printed was flushed
    assert len((tmp_path / "qa" / "train.jsonl").read_text().splitlines()) == 3  # what it wrote is complete
    assert ("main returned" in done.stdout) is not group
    assert ("interpreter finalized" in done.stdout) is not group
    bad = kvroute("eval", str(tmp_path / "missing"), "--text", str(tmp_path / "qa" / "train.jsonl"))
    assert bad.returncode == 2
    assert "kvroute eval: error:" in bad.stderr
    assert ("main returned 2" in bad.stdout) is not group
