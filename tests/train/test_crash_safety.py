"""Nothing lost on a crash, with real process kills (SIGKILL): training resumes from the last complete
checkpoint and reproduces an uninterrupted run; a killed eval keeps the plans it finished."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import kvroute
from kvroute.train import TrainConfig, train
from kvroute.train import STATE_DIR, latest_checkpoint, read_metrics
from textkit import make_model_dir, write_corpus

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

STEPS = 30


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")


def _kvroute(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvroute", *args], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() == 0:
            return  # it finished before there was anything to kill (a resume with nothing left to do)
        if proc.poll() is not None:
            raise AssertionError(f"process ended before the kill (rc {proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_training_killed_while_checkpointing_resumes_exactly(tmp_path):
    model, corpus = make_model_dir(tmp_path / "model"), write_corpus(tmp_path / "corpus")
    common = dict(seq_len=32, batch_size=4, max_steps=STEPS, lr=1e-2, routing="rcla", p=0.5, eval_every=0,
                  save_every=1, keep_checkpoints=2, seed=1, device="cpu", cache_dir=str(tmp_path / "cache"),
                  precision="fp32")
    train(TrainConfig(data=[str(corpus)], model=str(model), output_dir=str(tmp_path / "whole"), quiet=True,
                      tensorboard=False, **common))
    want = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "whole") if "loss" in r]

    out = tmp_path / "killed"
    argv = ["train", str(model), "--data", str(corpus), "-o", str(out), "--quiet", "--no-tensorboard",
            "--seq-len", "32", "--batch-size", "4", "--max-steps", str(STEPS), "--lr", "1e-2", "--routing", "rcla",
            "--p", "0.5", "--eval-every", "0", "--save-every", "1", "--keep-checkpoints", "2", "--seed", "1",
            "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--precision", "fp32"]
    root = out / "checkpoints"
    rng = random.Random(0)
    kills = 0
    for round_ in range(3):
        done_before = latest_checkpoint(root)
        proc = _kvroute(*argv, *(["--resume"] if round_ else []))
        # once this run has written a checkpoint of its own, kill it at a random moment: with a
        # checkpoint every step, most moments fall inside a save
        _wait_for(lambda: latest_checkpoint(root) not in (None, done_before), proc)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            break  # it finished first
        _kill(proc)
        kills += 1
        latest = latest_checkpoint(root)
        assert latest is not None and (latest / STATE_DIR / "state.pt").is_file()
        kvroute.load_model(latest)  # a complete checkpoint: the weights load
    assert kills >= 1
    finish = _kvroute(*argv, "--resume")
    assert finish.wait(timeout=300) == 0, finish.stderr.read()[-3000:]
    got = [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r]
    assert got == want  # every step once, with the uninterrupted run's losses
    assert not any(p.name.startswith(".") for p in root.iterdir())  # no partial checkpoint left behind


def test_eval_killed_mid_run_keeps_the_finished_plans(tmp_path):
    model = make_model_dir(tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus", docs=60, length=400)
    out = tmp_path / "eval"
    plans = ["full", "every:2", "every:4"]
    proc = _kvroute("eval", str(model), "--plans", ",".join(plans), "--text", str(corpus), "--out", str(out),
                    "--window", "8", "--stride", "1", "--no-plot")
    results = out / "results.json"

    def finished_plans() -> set[str]:
        try:
            return {r["plan"] for r in json.loads(results.read_text())["rows"]}
        except (FileNotFoundError, json.JSONDecodeError):
            return set()

    _wait_for(lambda: bool(finished_plans()), proc, timeout=300)
    _kill(proc)
    doc = json.loads(results.read_text())  # never a half-written file
    done = {r["plan"] for r in doc["rows"]}
    assert done and done < set(plans), done  # killed mid-run, and what it finished is kept
    for plan in done:
        assert {r["metric"] for r in doc["rows"] if r["plan"] == plan} == {"loss", "perplexity"}
