"""Shared setup of the experiments: the from-scratch ones (pretrain.py, ablation.py) and their command line.

- the data split: training text = State of the Union 1790-2006 + Moby Dick minus the
  held-out chapters; held-out text = State of the Union 2007+ and Moby Dick chapters
  15, 30, ..., 135 (neither the tokenizer nor any model trains on them); :func:`sotu`
  is the one State of the Union split helper of every experiment;
- a byte-level BPE tokenizer (4,096 tokens) trained on the training split only;
- the model shape (a Qwen3-style preset definition, given to ``TrainConfig(preset=...)``);
- training through ``kvroute.train.train(TrainConfig(...))``, evaluation through
  ``kvroute.evaluate.evaluate(EvalConfig(...))``, each run skipped when finished;
- :func:`run_experiment`, the command line of every multi-run experiment (``--jobs``,
  ``--runs``, ``--threads``, plus a script's own options; finetune_sweep.py brings its own data).

CPU: the machine has 2 cores shared with other work, so every run uses one torch
thread and ``OMP_WAIT_POLICY=PASSIVE`` (busy-waiting OpenMP threads slow down
badly under contention).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from jobs import log, run_parallel  # noqa: E402  (scripts/jobs.py: the worker scheduler)

#: torch threads per run (``--threads``; :func:`run_experiment` sets them)
THREADS = 1

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "experiments"
DATA = RUNS / "data"
TRAIN_DIR = DATA / "train"
HELDOUT = {"sotu_2007plus": DATA / "heldout_sotu", "moby_heldout": DATA / "heldout_moby"}
TOKENIZER = RUNS / "tokenizer_bpe4096"
RESULTS = ROOT / "experiments" / "results"
IMG = ROOT / "docs" / "img"

SOTU = ROOT / "assets" / "text" / "sotu" / "data"
MOBY = ROOT / "assets" / "text" / "moby" / "data"
HELDOUT_SOTU_FROM = 2007
HELDOUT_MOBY_CHAPTERS = set(range(15, 136, 15))  # 15, 30, ..., 135
VOCAB = 4096

#: the model: Qwen3-style, 8 layers, hidden 128, GQA 4 query / 2 KV heads of 32 dims.
PRESET_FIELDS = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, max_position_embeddings=1024)
LAYERS = 8

#: the training budget shared by every compared run (equal tokens: 1,500 x 8 x 256 = 3,072,000).
#: sized on this machine: 2,000-3,700 tok/s for the 8-layer model on one thread (14-25 min a run).
#: lr 6e-3 beat 2e-3 in a 250-step probe of the standard model (train loss 5.97 against 6.01 at step 160).
TRAIN = dict(seq_len=256, batch_size=8, max_steps=int(os.environ.get("KVR_STEPS", "1500")), lr=6e-3,
             weight_decay=0.1, betas=(0.9, 0.99), grad_clip=1.0, warmup=0.05, schedule="cosine",
             min_lr_ratio=0.1, seed=0, val_fraction=0.02, eval_every=0, eval_batches=4)

#: held-out LM evaluation: sliding windows as long as the training context.
#: KVR_DEVICE=cuda runs the same scripts on a GPU (default: cpu, as measured here).
DEVICE = os.environ.get("KVR_DEVICE", "cpu")

EVAL = dict(window=256, stride=128, max_tokens=int(os.environ.get("KVR_EVAL_TOKENS", "20000")))


def machine() -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "device": DEVICE,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


# ----------------------------------------------------------------------------- data + tokenizer
def slug(spec: str) -> str:
    """A routing or plan spec as part of a run folder's name: letters, digits, ``.`` and ``=`` kept, the rest ``-``."""
    return "".join(c if c.isalnum() or c in ".=" else "-" for c in spec)


def _year(path: Path) -> int:
    return int(path.name.split("_", 1)[0])


def _chapter(path: Path) -> int:
    return int(path.stem.split("_", 1)[1])


def sotu(first: int, last: int) -> list[str]:
    """The State of the Union split: the files of the years ``first``..``last``, sorted.

    Example:
        >>> train, held = sotu(1790, 2006), sotu(2007, 2100)  # doctest: +SKIP
    """
    return [str(f) for f in sorted(SOTU.glob("*.txt")) if first <= _year(f) <= last]


def moby_chapters() -> list[Path]:
    """The chapter files of Moby Dick, in the book's order."""
    return sorted(MOBY.glob("chapter_*.txt"), key=_chapter)


def prepare_data() -> dict:
    """Copy the text files into train/ and held-out folders (once); returns the split summary."""
    manifest = DATA / "split.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    if not SOTU.is_dir() or not MOBY.is_dir():
        raise FileNotFoundError("assets/text/{sotu,moby}/data missing: run scripts/fetch_assets.py")
    tmp = DATA.with_name("data.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    split: dict[str, list[str]] = {"train": [], "sotu_2007plus": [], "moby_heldout": []}
    for folder in ("train", "heldout_sotu", "heldout_moby"):
        (tmp / folder).mkdir(parents=True)
    for name in sotu(1700, 2100):
        f = Path(name)
        held = _year(f) >= HELDOUT_SOTU_FROM
        shutil.copy(f, tmp / ("heldout_sotu" if held else "train") / f"sotu_{f.name}")
        split["sotu_2007plus" if held else "train"].append(f"sotu/{f.name}")
    for f in moby_chapters():
        held = _chapter(f) in HELDOUT_MOBY_CHAPTERS
        shutil.copy(f, tmp / ("heldout_moby" if held else "train") / f"moby_{f.name}")
        split["moby_heldout" if held else "train"].append(f"moby/{f.name}")
    summary = {k: {"files": len(v), "chars": sum(p.stat().st_size for p in (tmp / d).glob("*.txt"))}
               for k, v, d in [("train", split["train"], "train"),
                               ("sotu_2007plus", split["sotu_2007plus"], "heldout_sotu"),
                               ("moby_heldout", split["moby_heldout"], "heldout_moby")]}
    summary["heldout_files"] = {"sotu_2007plus": split["sotu_2007plus"], "moby_heldout": split["moby_heldout"]}
    (tmp / "split.json").write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(DATA, ignore_errors=True)
    tmp.rename(DATA)
    return summary


def train_tokenizer() -> Path:
    """Byte-level BPE with VOCAB tokens on the training split; saved as a PreTrainedTokenizerFast folder.

    ``<|endoftext|>`` is EOS, PAD and BOS; the post-processor puts it before every
    encoded text (as training sees a document after the previous one's EOS); training
    tokenizes with ``add_special_tokens=False`` and separates documents with EOS.
    """
    if (TOKENIZER / "tokenizer.json").is_file():
        return TOKENIZER
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[eos], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    files = sorted(str(p) for p in TRAIN_DIR.glob("*.txt"))
    tok.train(files, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{eos} $A", pair=f"{eos} $A {eos} $B", special_tokens=[(eos, tok.token_to_id(eos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos,
                                   model_max_length=PRESET_FIELDS["max_position_embeddings"])
    tmp = TOKENIZER.with_name(TOKENIZER.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    tmp.rename(TOKENIZER)
    return TOKENIZER


def setup() -> dict:
    """Data split + tokenizer; returns the split summary."""
    summary = prepare_data()
    train_tokenizer()
    return summary


# ----------------------------------------------------------------------------- train + eval
def run_key(routing: str, p: float | None = None, layers: int = LAYERS, **overrides) -> dict:
    """Every setting a training run depends on: a finished run (or result entry) is reused only if its key matches."""
    return {"routing": routing, "p": p, "layers": layers, "device": DEVICE, **TRAIN, **overrides,
            "betas": list(overrides.get("betas", TRAIN["betas"]))}


def train_run(name: str, routing: str, p: float | None = None, layers: int = LAYERS, **overrides) -> dict:
    """Train one model (skipped when its ``final/`` exists); returns its summary (wall time etc.)."""
    from kvroute.train import TrainConfig, train

    out = RUNS / name
    summary_file = out / "summary.json"
    key = run_key(routing, p, layers, **overrides)
    if (out / "final" / "config.json").is_file() and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        if summary.get("key") == key:
            log(f"{name}: done already ({out / 'final'})")
            return summary
        log(f"{name}: the finished run in {out} has other settings; training it again")
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(data=[str(TRAIN_DIR)], output_dir=str(out), preset=dict(PRESET_FIELDS), layers=layers,
                      tokenizer=str(TOKENIZER), routing=routing, p=p, device=DEVICE, tensorboard=False,
                      quiet=True, log_every=10, eval_plans=overrides.pop("eval_plans", "full,every:2,every:4"),
                      **{**TRAIN, **overrides})
    log(f"{name}: training routing={routing} p={p} layers={layers} steps={cfg.max_steps} "
        f"tokens={cfg.max_steps * cfg.batch_size * cfg.seq_len}")
    start = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - start
    summary = {"name": name, "routing": cfg.policy.spec, "p": p, "layers": layers, "seed": cfg.seed,
               "steps": result.steps,
               "tokens": result.steps * cfg.batch_size * cfg.seq_len, "wall_s": round(wall, 1),
               "final_train_loss_mean_last10": sum(result.losses[-10:]) / max(1, len(result.losses[-10:])),
               "val_loss_in_training": result.eval_loss, "checkpoint": str(result.final_checkpoint), "key": key}
    summary_file.write_text(json.dumps(summary, indent=1) + "\n")
    log(f"{name}: done in {wall:.0f}s, in-training val loss {result.eval_loss}")
    return summary


def loss_milestones(name: str, thresholds: tuple[float, ...] = (6.0, 5.5, 5.0), window: int = 5) -> dict | None:
    """First logged training step at which the mean of the last ``window`` logged train losses is below each
    threshold (``None``: never), from ``runs/experiments/NAME/train.csv``; ``None`` without that file."""
    path = RUNS / name / "train.csv"
    if not path.is_file():
        return None
    with path.open() as f:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    out = {}
    for t in thresholds:
        out[f"{t:g}"] = next((rows[i][0] for i in range(window - 1, len(rows))
                              if sum(v for _, v in rows[i - window + 1:i + 1]) / window < t), None)
    return out


def eval_run(name: str, plans: list[str]) -> list[dict]:
    """Held-out LM loss of one run under ``plans`` (cached in the run folder); returns result rows."""
    from kvroute.evaluate import EvalConfig, evaluate

    out = RUNS / name / "heldout_eval"
    key = {"plans": plans, **EVAL, "text": [str(p) for p in HELDOUT.values()]}
    done = out / "results.json"
    if done.is_file() and (out / "key.json").is_file() and json.loads((out / "key.json").read_text()) == key:
        return json.loads(done.read_text())["rows"]
    shutil.rmtree(out, ignore_errors=True)
    log(f"{name}: held-out eval under {','.join(plans)}")
    start = time.perf_counter()
    writer = evaluate(EvalConfig(checkpoints=[str(RUNS / name / "final")], plans=plans,
                                 text=[str(p) for p in HELDOUT.values()], out=str(out), device=DEVICE,
                                 **EVAL), progress=False)
    if writer.errors:
        raise RuntimeError(f"{name}: eval errors {writer.errors}")
    (out / "key.json").write_text(json.dumps(key) + "\n")
    log(f"{name}: eval done in {time.perf_counter() - start:.0f}s")
    return json.loads(done.read_text())["rows"]


def carried_entries(results_file: Path, names: list[str], key_of: Callable[[str], dict]) -> dict[str, dict]:
    """The entries of ``results_file`` (a committed result JSON) still valid now: same run key, same eval settings."""
    if not results_file.is_file():
        return {}
    previous = json.loads(results_file.read_text())
    if previous.get("eval") != EVAL:
        return {}
    runs = previous.get("runs", {})
    return {n: runs[n] for n in names if n in runs and runs[n].get("key") == key_of(n)}


def run_experiment(script: str, names: list[str], run_one: Callable[..., dict],
                   collect: Callable[[dict[str, dict]], None], argv: list[str] | None = None,
                   results_file: Path | None = None, key_of: Callable[[str], dict] | None = None, *,
                   add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                   setup: Callable[[], object] | None = setup, runs_dir: Path = RUNS) -> None:
    """The experiments' command line: run ``names`` (``--jobs N`` at a time), then ``collect`` their results.

    ``run_one(name, **options)`` trains and scores one run (both cached, so calling it
    again for a finished run only reads its files); ``options`` are the script's own
    command-line options, which ``add_arguments(parser)`` declares (none without it).
    With ``--jobs 1`` the runs go one after the other in this process; with more, each
    run is a worker process (``--one NAME`` plus ``--threads`` and the script's own
    options as given, log in ``runs_dir/NAME/run.log``). ``collect`` gets the results so
    far after each finished run (a crash loses nothing). A failed worker is reported and
    the script exits non-zero after the others are collected. ``--threads N`` sets torch's
    threads (and OpenMP's, in workers) per run.

    ``setup()`` runs once before any run and in each worker: by default the data split
    and the BPE tokenizer that the from-scratch experiments share; ``None`` skips it
    (a script with data of its own passes its own).

    With ``--runs`` (a subset), the other runs' entries are carried over from
    ``results_file`` where ``key_of(name)`` still matches their training settings and
    the eval settings are unchanged, so adding runs (new seeds) to a committed result
    needs neither the old run folders nor retraining. Without ``--runs`` every run is
    trained or read from its folder.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each (default 1)")
    common.add_argument("--runs", default=",".join(names), help="comma-separated subset of the runs")
    common.add_argument("--threads", type=int, default=THREADS, help=f"torch threads per run (default {THREADS})")
    common.add_argument("--one", help=argparse.SUPPRESS)  # worker: run this one and exit
    own = argparse.ArgumentParser(add_help=False)
    if add_arguments is not None:
        add_arguments(own)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = argparse.ArgumentParser(description=Path(script).name, parents=[common, own]).parse_args(argv)
    forwarded = common.parse_known_args(argv)[1]  # the script's own options, as given: passed on to workers
    options = vars(own.parse_args(forwarded))
    torch.set_num_threads(args.threads)
    if args.one:
        if args.one not in names:
            raise SystemExit(f"unknown run {args.one!r}; expected one of {', '.join(names)}")
        if setup is not None:
            setup()
        run_one(args.one, **options)
        return
    chosen = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; expected some of {', '.join(names)}")
    start = time.time()
    if setup is not None:
        setup()  # once, before any worker: what the runs share
    carried: dict[str, dict] = {}
    if results_file is not None and key_of is not None and set(chosen) != set(names):
        carried = carried_entries(results_file, [n for n in names if n not in chosen], key_of)
        if carried:
            log(f"{Path(script).stem}: carrying {len(carried)} finished runs over from {results_file.name}: "
                f"{', '.join(carried)}")
    results: dict[str, dict] = {}

    def finish(name: str) -> None:  # the run is done: read its result, collect everything so far
        results[name] = run_one(name, **options)
        merged = {**carried, **results}
        collect({n: merged[n] for n in names if n in merged})

    failed: list[str] = []
    if args.jobs > 1:
        failed = run_parallel(chosen, lambda n: [script, "--one", n, "--threads", str(args.threads), *forwarded],
                              lambda n: runs_dir / n, args.jobs, args.threads, on_done=finish)
    else:
        for name in chosen:
            finish(name)
    log(f"{Path(script).stem}: {len(results)} runs done in {time.time() - start:.0f}s")
    if failed:
        raise SystemExit(f"{Path(script).stem}: failed runs {failed}")


def loss_table(rows: list[dict]) -> dict:
    """plan -> {dataset name -> loss, 'mean' -> token-weighted mean over datasets, 'kv_kib_per_token'}."""
    names = {str(p): n for n, p in HELDOUT.items()}
    table: dict[str, dict] = {}
    for r in rows:
        if r["metric"] != "loss":
            continue
        entry = table.setdefault(r["plan"], {"kv_kib_per_token": r["kv_kib_per_token"], "owners": r["owners"],
                                             "_w": 0.0, "_sum": 0.0})
        entry[names.get(str(r["data"]), str(r["data"]))] = r["value"]
        entry["_w"] += r["tokens_scored"]
        entry["_sum"] += r["value"] * r["tokens_scored"]
    for entry in table.values():
        entry["mean"] = entry.pop("_sum") / entry.pop("_w")
    return table


def write_json(path: Path, data: dict | list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append result rows to a JSON list file (created if missing), keeping every earlier run's rows.

    Runs side by side append to the same file: the read and the write happen under an exclusive lock
    (``PATH.lock``), so one run's rows never overwrite another's; the file is replaced atomically.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.is_file() else []
        partial = path.with_name(path.name + ".partial")
        write_json(partial, old + rows)
        partial.replace(path)
    print(f"appended to {path}")


def plot_lines(lines: list[dict], out: Path, title: str) -> Path:
    """Held-out loss against KV KiB/token: one panel per dataset (+ the token-weighted mean).

    ``lines``: ``{"label" (None: not in the legend), "table" (from :func:`loss_table`), "style" (matplotlib
    fmt), "color", "plans", "annotate"}``.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = ["mean", *HELDOUT]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.3), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for line in lines:
            pts = sorted(((v["kv_kib_per_token"], v[panel], plan) for plan, v in line["table"].items()
                          if plan in line.get("plans", line["table"])), key=lambda t: t[0])
            if not pts:
                continue
            (h,) = ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], line.get("style", "o-"),
                           label=line["label"], **({"color": line["color"]} if "color" in line else {}))
            for x, y, plan in pts:
                if line.get("annotate", True):
                    ax.annotate(plan, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                                color=h.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV cache, KiB per token (fp32)")
        ax.set_ylabel("held-out loss (nats/token, lower is better)")
        ax.set_title(f"{title}: {panel}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
