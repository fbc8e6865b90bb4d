"""Result files of ``kvroute eval``: rows, JSON and CSV, the terminal table, merging.

A row is one metric of one checkpoint under one plan on one dataset, and carries
everything needed to read it alone: checkpoint and model, plan spec, whether the
plan ran with a calibration (``calibrated``, :mod:`kvroute.calibrate`), source map,
retention, KV KiB per token, task, data, counts, the value, and its change against
the same checkpoint's ``full`` plan on the same data and metric.

Files (rewritten atomically after every plan and dataset):
- ``results.json``: ``{"kvroute_version", "created", "run", "rows", "errors"}``;
- ``results.csv``: the rows, one per line, same columns;
- ``predictions.jsonl``: every QA answer with its scores.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kvroute.data.jsonl import read_json
from kvroute.plan import KVShape, SharingPlan

#: metric -> whether higher is better
METRICS: dict[str, bool] = {
    "loss": False, "perplexity": False,
    "f1": True, "exact_match": True, "rouge_l": True,
    "acc": True, "acc_norm": True,
    "distinct2": True, "non_degenerate": True,
}
#: the metric a plot shows for each task
PRIMARY = {"lm": "loss", "qa": "f1", "mc": "acc", "continuation": "distinct2"}
COLUMNS = [
    "checkpoint", "model_type", "num_layers", "dtype", "precision", "plan", "calibrated", "plan_source", "owners",
    "retention", "kv_kib_per_token", "kv_dtype", "task", "data", "metric", "value", "stderr", "higher_is_better",
    "delta_vs_full", "delta_pct_vs_full", "n", "tokens_scored", "tokens_total", "window", "stride", "seconds",
]
_KEY = ("checkpoint", "plan", "calibrated", "task", "data", "metric")
CALIBRATED_MARK = " (cal)"


def plan_label(row: dict[str, Any]) -> str:
    """The plan as tables and plots show it: ``every:2 (cal)`` when it ran calibrated, ``every:2 + int8``
    with a quantized KV cache."""
    quant = row.get("kv_quant")
    return (str(row["plan"]) + (CALIBRATED_MARK if row.get("calibrated") else "")
            + (f" + {quant}" if quant not in (None, "none") else ""))


def kv_kib_per_token(plan: SharingPlan, shape: KVShape, dtype: str, kv_quant: Any = None) -> float:
    """KV KiB one token costs under ``plan`` (quantized past the residual window with ``kv_quant``)."""
    return plan.kv_bytes_per_token(shape, dtype, kv_quant) / 1024


def with_deltas(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with ``delta_vs_full`` (value - full) and ``delta_pct_vs_full`` filled in.

    The reference is the row of the same checkpoint, task, data and metric whose
    plan keeps every layer (retention 1) in full precision (no ``kv_quant``); None where
    there is no such row.
    """
    full = {(r["checkpoint"], r["task"], r["data"], r["metric"]): r["value"]
            for r in rows if float(r["retention"]) == 1.0 and r.get("kv_quant") in (None, "none")}
    out = []
    for r in rows:
        ref = full.get((r["checkpoint"], r["task"], r["data"], r["metric"]))
        delta = None if ref is None else r["value"] - ref
        pct = None if ref is None or ref == 0 else 100 * delta / abs(ref)
        out.append({**r, "delta_vs_full": delta, "delta_pct_vs_full": pct})
    return out


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    writer = csv.DictWriter(buf, fieldnames=COLUMNS + extra, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in COLUMNS + extra})
    return buf.getvalue()


class ResultWriter:
    """Collects rows and rewrites the result files after every addition.

    Args:
        out_dir: folder for the files.
        run: what produced the rows (the eval config), stored in ``results.json``.
    """

    def __init__(self, out_dir: str | Path, run: dict[str, Any] | None = None) -> None:
        from kvroute import __version__

        self.out = Path(out_dir)
        self.meta = {"kvroute_version": __version__,
                     "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": run or {}}
        self.rows: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.json_path, self.csv_path = self.out / "results.json", self.out / "results.csv"
        self.predictions_path = self.out / "predictions.jsonl"
        self._predictions: list[str] = []

    def add(self, info: dict[str, Any], metrics: dict[str, float], predictions: list[dict] | None = None,
            stderr: dict[str, float] | None = None) -> None:
        """Add one row per metric (``info`` holds the shared columns) and write the files.

        ``stderr``: the standard error of each metric's mean over examples, where it is one (QA, multiple
        choice, continuations).
        """
        for name, value in metrics.items():
            spread = (stderr or {}).get(name)
            self.rows.append({**info, "metric": name, "value": float(value),
                              "stderr": None if spread is None else float(spread),
                              "higher_is_better": METRICS.get(name, True)})
        for p in predictions or []:
            keep = {k: info.get(k) for k in ("checkpoint", "plan", "calibrated", "data")}
            self._predictions.append(json.dumps({**keep, **p}, ensure_ascii=False))
        self.flush()

    def add_error(self, error: dict[str, Any]) -> None:
        self.errors.append(error)
        self.flush()

    def flush(self) -> None:
        self.rows = with_deltas(self.rows)
        doc = {**self.meta, "rows": self.rows, "errors": self.errors}
        _atomic_write(self.json_path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        _atomic_write(self.csv_path, rows_to_csv(self.rows))
        if self._predictions:
            _atomic_write(self.predictions_path, "\n".join(self._predictions) + "\n")


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a ``results.json`` written by :class:`ResultWriter`."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    doc = read_json(p, "result file", "not a kvroute results.json")
    if not isinstance(doc, dict) or "rows" not in doc:
        raise ValueError(f"{p}: not a kvroute results.json (no 'rows')")
    return doc


def merge_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Rows of several result files; a later file wins for the same checkpoint, plan, data and metric.

    A plan run with and without a calibration gives two rows (before/after ``kvroute calibrate``);
    rows of files older than the ``calibrated`` field count as uncalibrated.
    """
    if not paths:
        raise ValueError("--compare needs at least one results.json")
    merged: dict[tuple, dict[str, Any]] = {}
    for path in paths:
        for row in load_results(path)["rows"]:
            key = tuple(bool(row.get(k)) if k == "calibrated" else row.get(k) for k in _KEY)
            merged[key] = {**row, "source_file": str(path)}
    return with_deltas(list(merged.values()))


def compare_results(paths: list[str | Path], out_dir: str | Path) -> ResultWriter:
    """Merge result files (:func:`merge_results`) and write the merged ``results.json`` and ``results.csv``.

    Args:
        paths: ``results.json`` files or the folders holding them; a later one wins on the same row.
        out_dir: folder for the merged files; the run records the files merged (``{"compare": [...]}``).

    Returns:
        The writer, with the merged ``rows`` and the paths it wrote.

    Example:
        >>> writer = compare_results(["runs/a", "runs/b/results.json"], "runs/ab")  # doctest: +SKIP
        >>> print(format_table(writer.rows))                                        # doctest: +SKIP
    """
    rows = merge_results(paths)
    writer = ResultWriter(out_dir, run={"compare": [str(p) for p in paths]})
    writer.rows = rows
    writer.flush()
    return writer


def _fmt(value: float | None, metric: str, signed: bool = False, stderr: float | None = None) -> str:
    if value is None:
        return "-"
    digits = 2 if metric == "perplexity" else 4
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return text if stderr is None else f"{text} ±{stderr:.{digits}f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """One block per dataset; one line per checkpoint and plan.

    Columns: checkpoint, plan (``every:2 (cal)`` when it ran calibrated), retention,
    KV KiB/token, then each metric (``± standard error`` over the examples where the row has
    one: QA, multiple choice) with its change against the same checkpoint's full cache (``d metric``).
    """
    if not rows:
        return "(no results)"
    blocks: dict[tuple[str, str], dict[tuple[str, str], dict[str, dict[str, Any]]]] = {}
    for r in rows:
        lines_of = blocks.setdefault((r["task"], str(r["data"])), {})
        lines_of.setdefault((str(r["checkpoint"]), plan_label(r)), {})[r["metric"]] = r
    out = []
    for (task, data), lines_of in blocks.items():
        metrics = list(dict.fromkeys(m for by_metric in lines_of.values() for m in by_metric))
        higher = [m for m in metrics if METRICS.get(m, True)]
        lower = [m for m in metrics if not METRICS.get(m, True)]
        notes = [f"{', '.join(ms)}: {word} is better" for ms, word in ((higher, "higher"), (lower, "lower")) if ms]
        if any(label.endswith(CALIBRATED_MARK) for _, label in lines_of):
            notes.append(f"{CALIBRATED_MARK.strip()}: calibrated plan")
        out.append(f"{task} {data} ({'; '.join(notes)})")
        table = [["checkpoint", "plan", "retention", "KV KiB/tok"] + [h for m in metrics for h in (m, f"d {m}")]]
        order = sorted(lines_of.items(), key=lambda kv: (kv[0][0], -float(next(iter(kv[1].values()))["retention"])))
        for (ckpt, plan), by_metric in order:
            first = next(iter(by_metric.values()))
            cells = [ckpt, plan, f"{100 * float(first['retention']):.1f}%", f"{float(first['kv_kib_per_token']):.2f}"]
            for m in metrics:
                r = by_metric.get(m, {})
                cells += [_fmt(r.get("value"), m, stderr=r.get("stderr")), _fmt(r.get("delta_vs_full"), m, signed=True)]
            table.append(cells)
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for i, row in enumerate(table):
            cells = [c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
            out.append("  " + "  ".join(cells).rstrip())
            if i == 0:
                out.append("  " + "  ".join("-" * w for w in widths))
        out.append("")
    return "\n".join(out).rstrip() + "\n"
