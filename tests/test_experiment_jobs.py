"""The worker scheduler of the demo and the experiments (scripts/jobs.py): logs, failures, callbacks, limits,
needs, exclusive jobs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# loaded from its file: putting scripts/ on sys.path would expose its generic module names
_SPEC = importlib.util.spec_from_file_location(
    "kvroute_script_jobs", Path(__file__).resolve().parents[1] / "scripts" / "jobs.py")
_JOBS = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_JOBS)
run_parallel, last_line = _JOBS.run_parallel, _JOBS.last_line

SCRIPT = {
    "ok1": "print('hello from ok1')",
    "ok2": "import os; print('threads', os.environ['OMP_NUM_THREADS'])",
    "bad": "import sys; print('boom'); sys.exit(3)",
}


def test_runs_every_worker_logs_output_and_reports_failures(tmp_path):
    done = []
    failed = run_parallel(list(SCRIPT), lambda n: ["-c", SCRIPT[n]], lambda n: tmp_path / n, jobs=2, threads=3,
                          on_done=done.append, poll_s=0.05)
    assert failed == ["bad"]
    assert sorted(done) == ["ok1", "ok2"]  # on_done only for the workers that succeeded
    assert (tmp_path / "ok1" / "run.log").read_text().strip() == "hello from ok1"
    assert (tmp_path / "ok2" / "run.log").read_text().strip() == "threads 3"
    assert (tmp_path / "bad" / "run.log").read_text().strip() == "boom"


def test_at_most_jobs_workers_at_once(tmp_path):
    # each worker records how many siblings are alive next to it through marker files
    code = ("import pathlib, sys, time; d = pathlib.Path(sys.argv[1]); (d / sys.argv[2]).touch(); "
            "time.sleep(0.3); print(len(list(d.glob('w*')))); (d / sys.argv[2]).unlink()")
    marks = tmp_path / "marks"
    marks.mkdir()
    names = [f"w{i}" for i in range(4)]
    assert run_parallel(names, lambda n: ["-c", code, str(marks), n], lambda n: tmp_path / n, jobs=2,
                        poll_s=0.02) == []
    seen = [int((tmp_path / n / "run.log").read_text()) for n in names]
    assert max(seen) <= 2


def test_rejects_zero_jobs(tmp_path):
    with pytest.raises(ValueError, match="--jobs"):
        run_parallel(["a"], lambda n: ["-c", "pass"], lambda n: tmp_path / n, jobs=0)


# each worker appends "start"/"end" with a clock time to one shared file; the order shows what overlapped
TRACE = ("import os, pathlib, sys, time; f = pathlib.Path(sys.argv[1]); name = sys.argv[2]; "
         "f.open('a').write(f'{name} start {os.environ[\"OMP_NUM_THREADS\"]}\\n'); time.sleep(float(sys.argv[3])); "
         "f.open('a').write(f'{name} end\\n'); sys.exit(3 if name == 'bad' else 0)")


def _trace(tmp_path, names, sleeps=None, **kwargs):
    """Run the TRACE worker for each name (sleeping ``sleeps[name]`` seconds, 0.25 unless given); returns
    the failed names, the trace's events in order, and the seconds per job."""
    trace = tmp_path / "trace.txt"
    seconds = {}
    failed = run_parallel(names, lambda n: ["-c", TRACE, str(trace), n, str((sleeps or {}).get(n, 0.25))],
                          lambda n: tmp_path / n, poll_s=0.02, seconds=seconds, **kwargs)
    return failed, trace.read_text().split("\n")[:-1], seconds


def test_a_job_starts_only_after_what_it_needs_and_not_when_that_failed(tmp_path):
    failed, events, seconds = _trace(tmp_path, ["a", "bad", "b", "c", "d"], jobs=2,
                                     needs={"b": ["a"], "c": ["bad"], "d": ["c"]})
    assert failed == ["bad", "c", "d"]  # c needs bad, d needs c: neither starts
    assert events.index("b start 1") > events.index("a end")
    assert not any(e.startswith(("c ", "d ")) for e in events)
    assert sorted(seconds) == ["a", "b", "bad"] and all(s >= 0.2 for s in seconds.values())


def test_an_exclusive_job_runs_alone_with_every_thread(tmp_path):
    # x is listed first and can start at once; y and z wait for it, then run side by side with 2 threads each
    failed, events, _ = _trace(tmp_path, ["x", "y", "z"], jobs=2, threads=2, exclusive={"x"})
    assert failed == []
    assert events[:2] == ["x start 4", "x end"]
    assert "y start 2" in events[2:] and "z start 2" in events[2:]


def test_a_waiting_exclusive_job_holds_back_later_ones(tmp_path):
    # e needs a; once a ends, e waits for b to end, and c (listed after e) does not start before e has
    # a ends well before b, so e is ready while b still runs: the slot a freed must stay empty
    failed, events, _ = _trace(tmp_path, ["a", "b", "e", "c"], jobs=2, needs={"e": ["a"]}, exclusive={"e"},
                               sleeps={"a": 0.1, "b": 0.8})
    assert failed == []
    assert events.index("e start 2") > max(events.index("a end"), events.index("b end"))
    assert events.index("c start 1") > events.index("e end")


@pytest.mark.parametrize("needs, match", [({"z": ["a"]}, "'z' is not a job"), ({"a": ["z"]}, "'z', which is not"),
                                          ({"a": ["b"]}, "must be listed before it")])
def test_bad_needs_are_refused_before_anything_starts(tmp_path, needs, match):
    with pytest.raises(ValueError, match=match):
        run_parallel(["a", "b"], lambda n: ["-c", "pass"], lambda n: tmp_path / n, jobs=2, needs=needs)
    assert not (tmp_path / "a").exists()


def test_last_line_is_a_progress_bar_s_latest_redraw(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("loading\ntrain:  10%|#  | 8/80\rtrain:  11%|#  | 9/80\r")
    assert last_line(log) == "train:  11%|#  | 9/80"
    assert last_line(log, width=5) == "train"
    assert last_line(tmp_path / "missing.log") == ""


# experiments/common.py sets OpenMP's environment on import, so it is exercised in a child process
CARRY = """
import json, sys
sys.path.insert(0, sys.argv[1])
import common as c
key_of = lambda n: c.run_key("rcla", 0.75, 8, seed=int(n[-1]))
runs = {"s0": {"key": key_of("s0"), "loss": 1.0}, "s1": {"key": c.run_key("rcla", 0.5, 8, seed=1), "loss": 2.0},
        "s2": {"key": key_of("s2"), "loss": 3.0}}
path = c.Path(sys.argv[2])
out = {}
for name, eval_settings in (("same", c.EVAL), ("other_eval", {**c.EVAL, "window": 1})):
    path.write_text(json.dumps({"eval": eval_settings, "runs": runs}))
    out[name] = c.carried_entries(path, ["s0", "s1", "s2", "s3"], key_of)
out["missing"] = c.carried_entries(path.with_name("none.json"), ["s0"], key_of)
print(json.dumps(out))
"""


def test_carried_entries_keep_only_runs_whose_settings_still_match(tmp_path):
    experiments = Path(__file__).resolve().parents[1] / "experiments"
    proc = subprocess.run([sys.executable, "-c", CARRY, str(experiments), str(tmp_path / "r.json")],
                          capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(out["same"]) == ["s0", "s2"]  # s1 was trained with another p; s3 is not in the file
    assert out["same"]["s2"]["loss"] == 3.0
    assert out["other_eval"] == {} and out["missing"] == {}


# an experiment of two runs through common.run_experiment, with an option of its own; KVR_TEST_SETUP picks setup
EXPERIMENT = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, os.environ["KVR_TEST_EXPERIMENTS"])  # workers inherit the environment
import common as c
import torch

OUT = Path(os.environ["KVR_TEST_OUT"])
c.prepare_data = lambda: sys.exit("common's setup ran")  # the default setup's first step


def own_setup():
    with (OUT / "setup.log").open("a") as f:
        f.write(f"{os.getpid()}\\n")


def add_arguments(parser):
    parser.add_argument("--level", type=int, default=1)
    parser.add_argument("--tag", default="none")


def run_one(name, level, tag):
    done = OUT / name / "result.json"
    if not done.is_file():  # cached, as an experiment's runs are
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"level": level, "tag": tag, "pid": os.getpid(),
                                    "threads": torch.get_num_threads()}))
    return json.loads(done.read_text())


def collect(runs):
    (OUT / "collected.json").write_text(json.dumps({"pid": os.getpid(), "runs": runs}))


setup = {"none": None, "own": own_setup}[os.environ["KVR_TEST_SETUP"]]
c.run_experiment(__file__, ["a", "b"], run_one, collect, add_arguments=add_arguments, setup=setup, runs_dir=OUT)
"""


def run_experiment_script(tmp_path, setup, *args):
    script = tmp_path / "experiment.py"
    script.write_text(EXPERIMENT)
    experiments = Path(__file__).resolve().parents[1] / "experiments"
    env = {**os.environ, "KVR_TEST_EXPERIMENTS": str(experiments), "KVR_TEST_OUT": str(tmp_path),
           "KVR_TEST_SETUP": setup}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((tmp_path / "collected.json").read_text())


def test_run_experiment_passes_the_scripts_options_to_its_workers(tmp_path):
    out = run_experiment_script(tmp_path, "none", "--jobs", "2", "--level", "3", "--tag=hi", "--threads", "2")
    runs = out["runs"]
    assert list(runs) == ["a", "b"]
    for name, r in runs.items():
        assert (r["level"], r["tag"], r["threads"]) == (3, "hi", 2), name  # the worker got the options
        assert r["pid"] != out["pid"]  # trained in a worker process, collected by the main one
        assert (tmp_path / name / "run.log").is_file()  # runs_dir
    assert not (tmp_path / "setup.log").exists()  # setup=None: neither common's setup nor any other


def test_run_experiment_runs_a_scripts_own_setup_once(tmp_path):
    out = run_experiment_script(tmp_path, "own", "--runs", "b")
    assert list(out["runs"]) == ["b"]
    r = out["runs"]["b"]
    assert (r["level"], r["tag"], r["pid"], r["threads"]) == (1, "none", out["pid"], 1)  # --jobs 1: in process
    assert (tmp_path / "setup.log").read_text().split() == [str(out["pid"])]  # instead of common's
