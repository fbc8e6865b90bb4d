"""Where a calibrated shared layer's error comes from, and what cross-head value maps would add.

For layer ``l`` reading layer ``l-1``'s KV (on full-cache inputs, as a pairwise map sees them),
fits the value map in closed form after the logit-aware query map, as ``kvroute calibrate``
does, and reports the held-out relative error of the layer's attention output,
``|y - x M|^2 / |y|^2`` (y: the layer's own full-cache output), for these inputs ``x``:

- ``identity``: the owner's KV as is, no map;
- ``per-head``: the product's value map (one ``D x D`` map per query head);
- ``cross-head``: one ``(H_kv D) x D`` map per query head over the values of every KV head
  (what GQA would make cheap in the HF path; vLLM could not fold it);
- ``own-pattern``: the layer's own attention pattern over the owner's values (the error left if
  the query map were perfect);
- ``own-values``: the (mapped) pattern over the layer's own values (the error left if the value
  map were perfect).

A diagnostic of the closed-form fit itself, so it uses the fit's internals
(``kvroute.calibration.fit``) rather than only the public API.

    .venv/bin/python experiments/calibration_ceiling.py [--checkpoint assets/smollm2-135m]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import kvroute  # noqa: E402
from kvroute.calibrate import RIDGES, CalibrationConfig, _capture, _split, calibration_data  # noqa: E402
from kvroute.calibration.fit import _attend, _attention_layers, _LayerFit, _logits, _rotate, apply_rope  # noqa: E402
from kvroute.models import load_tokenizer  # noqa: E402
from kvroute.plan import SharingPlan  # noqa: E402
from common import sotu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("per-head", "cross-head", "own-pattern", "own-values")


def best_error(train: list[torch.Tensor], val: list[torch.Tensor]) -> float:
    """Held-out relative error of the ridge regression x -> y, the ridge chosen on the held-out part."""
    gram, cross, _ = train
    vgram, vcross, vyy = val
    scale = gram.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(gram.shape[-1], dtype=torch.float64)
    errors = []
    for ridge in RIDGES:
        m = torch.linalg.solve(gram + ridge * scale, cross)
        err = torch.einsum("hij,hik,hkj->h", m, vgram, m) - 2 * torch.einsum("hij,hij->h", m, vcross) + vyy
        errors.append((err.sum() / vyy.sum()).item())
    return min(errors)


@torch.no_grad()
def layer_errors(fit: _LayerFit) -> dict[str, float]:
    query = fit.query_map()
    H, D = fit.H, fit.D
    stats: dict[str, dict[str, list]] = {}
    identity = total = 0.0
    for part_name, part in (("train", fit.train), ("val", fit.val)):
        acc: dict[str, list] = {}
        for q_own, k_own, v_own, q_plan, k_o, v_o in fit._batches(part):
            own = _logits(fit.att_l, q_own, k_own, fit.mask).softmax(-1)
            y = _attend(own, v_own).transpose(0, 1).reshape(H, -1, D)
            mapped = _logits(fit.att_l, apply_rope(_rotate(q_plan, query), fit.cos, fit.sin), k_o, fit.mask).softmax(-1)
            every_head = v_o.transpose(1, 2).reshape(v_o.shape[0], 1, v_o.shape[2], -1)  # (B, 1, T, H_kv D)
            inputs = {"per-head": _attend(mapped, v_o), "cross-head": mapped @ every_head,
                      "own-pattern": _attend(own, v_o), "own-values": _attend(mapped, v_own)}
            for name, x in inputs.items():
                x = x.transpose(0, 1).reshape(H, -1, x.shape[-1])
                a = acc.setdefault(name, [0.0, 0.0, 0.0])
                a[0] += (x.transpose(1, 2) @ x).double()
                a[1] += (x.transpose(1, 2) @ y).double()
                a[2] += (y * y).sum((1, 2)).double()
            if part_name == "val":
                plain = _attend(_logits(fit.att_l, apply_rope(q_plan, fit.cos, fit.sin), k_o,
                                          fit.mask).softmax(-1), v_o)
                identity += ((y - plain.transpose(0, 1).reshape(H, -1, D)) ** 2).sum().item()
                total += (y * y).sum().item()
        stats[part_name] = acc
    return {"identity": identity / total, **{v: best_error(stats["train"][v], stats["val"][v]) for v in VARIANTS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "assets" / "smollm2-135m"))
    ap.add_argument("--layers", default="1,5,9,15,21,27,29", help="layers l, each reading layer l-1")
    ap.add_argument("--tokens", type=int, default=4096, help="SOTU 1990-2006 tokens (a quarter held out)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "calibration_ceiling.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = kvroute.load(args.checkpoint).eval()
    chunks = calibration_data(load_tokenizer(args.checkpoint), sotu(1990, 2006), args.tokens, 256)
    train, val = _split(chunks, 0.25)
    config = CalibrationConfig(tokens=args.tokens)
    captured = _capture(model, SharingPlan.for_model("full", model.config), torch.cat([train, val]), 4)
    layers = _attention_layers(model)
    rows = []
    for l in (int(x) for x in args.layers.split(",")):
        fit = _LayerFit(layers[l], layers[l - 1], captured.inputs[l], captured.inputs[l], captured.inputs[l - 1],
                        captured.cos[l], captured.sin[l], train.shape[0], config)
        row = {"layer": l, "source": l - 1, **layer_errors(fit)}
        rows.append(row)
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("identity", *VARIANTS)}
    print("mean  " + "  ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "mean": mean}, indent=1) + "\n")


if __name__ == "__main__":
    main()
