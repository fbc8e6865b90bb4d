"""Plan search: the owner set with a given number of owners that minimizes loss on calibration text
(or on the answers of QA records, for a plan chosen for the task it will serve).

The paper deploys uniform plans (every k-th layer keeps its cache); layers are not
interchangeable, so for the same KV bytes another owner set can do much better.
The search is greedy with an optional beam, then a local refinement:

1. greedy *addition* from the mandatory owners (layer 0) when the target is at most
   half the layers, greedy *removal* from the full plan otherwise; each step keeps the
   ``beam`` best owner sets;
2. refinement: move one owner to a free neighbouring layer while that lowers the loss;
3. the result is never worse than the evenly spaced plan with the same owner count
   (``every:k`` where one matches) on the search chunks: that plan is a candidate too.

Every plan's loss is computed once (cached by owner set). The search is deterministic:
fixed chunks, eval mode, ties broken by the owner tuple. :mod:`kvroute.search_run` runs it
on a checkpoint (``kvroute plan search``).

Example:
    >>> result = search_plan(model, chunks, owners=8)          # doctest: +SKIP
    >>> result.plan.spec                                      # doctest: +SKIP
    'layers:0,1,21,22,24,25,27,28'
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from kvroute.budget import mandatory_owners
from kvroute.hf.patch import get_router, set_plan
from kvroute.plan import KVShape, SharingPlan
from kvroute.train.losses import mean_loss  # noqa: F401  (re-exported: search.mean_loss)

Owners = tuple[int, ...]


# ------------------------------------------------------------------- calibration data
def calibration_chunks(
    tokenizer: Any, texts: list[str], chunk_tokens: int = 256, max_chunks: int | None = None
) -> torch.Tensor:
    """Tokenize ``texts`` (joined by EOS) and cut them into non-overlapping chunks.

    With ``max_chunks`` fewer than available, the chunks kept are evenly spaced over the text.

    Returns:
        ``(N, chunk_tokens)`` token ids, in text order.
    """
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
    n = len(ids) // chunk_tokens
    if n == 0:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one chunk of {chunk_tokens}")
    chunks = torch.tensor(ids[: n * chunk_tokens]).view(n, chunk_tokens)
    return chunks[evenly_spaced(n, max_chunks)]


def evenly_spaced(n: int, keep: int | None) -> list[int]:
    """Indices of ``keep`` of ``n`` items spread evenly from the first (all of them when ``keep`` is None or >= n)."""
    return list(range(n)) if keep is None or keep >= n else [i * n // keep for i in range(keep)]


# ------------------------------------------------------------------------- scoring
#: what a search scores: ``(N, T)`` token ids (every token labelled), or labelled batches
#: (``input_ids``, ``labels``, ``attention_mask``: :func:`kvroute.data.qa.answer_batches`)
SearchData = torch.Tensor | list[dict[str, torch.Tensor]]


class PlanScorer:
    """Mean next-token loss of a routed model under a plan, cached per owner set.

    Args:
        model: a routed model (``kvroute.apply``); put in eval mode, plan changed in place.
        chunks: ``(N, T)`` token ids, or labelled batches (:data:`SearchData`).
        batch_size: chunks per forward pass (labelled batches are scored as they are).
        autocast: a context manager each forward runs in (:func:`kvroute.precision.autocast`).
    """

    def __init__(self, model: torch.nn.Module, chunks: SearchData, batch_size: int = 8,
                 autocast: Callable = contextlib.nullcontext) -> None:
        self.model = model.eval()
        self.chunks = chunks
        self.batch_size = batch_size
        self.autocast = autocast
        self.shape = KVShape.from_config(model.config)
        self.cache: dict[Owners, float] = {}

    def plan(self, owners: Iterable[int]) -> SharingPlan:
        return SharingPlan.from_owners(sorted(owners), self.shape.num_layers, self.shape.layer_types)

    def loss(self, owners: Iterable[int]) -> float:
        key = tuple(sorted(owners))
        if key not in self.cache:
            set_plan(self.model, self.plan(key))
            self.cache[key] = mean_loss(self.model, self.chunks, self.batch_size, self.autocast)
        return self.cache[key]

    def best(self, candidates: Iterable[Owners], keep: int, desc: str, progress: bool) -> list[Owners]:
        """The ``keep`` lowest-loss owner sets among ``candidates`` (ties: smaller tuple first)."""
        unique = sorted(set(candidates))
        scored = [(self.loss(c), c) for c in tqdm(unique, desc=desc, leave=False, disable=not progress)]
        return [c for _, c in sorted(scored)[:keep]]


# -------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    """A searched plan and how it compares with uniform plans of the same KV bytes.

    Attributes:
        plan: the searched plan (spec ``layers:...``).
        loss: its loss on the search chunks.
        rows: comparison table: ``{"plan", "owners", "retention", "loss", "heldout_loss"}`` per plan.
        evaluations: distinct plans evaluated.
    """

    plan: SharingPlan
    loss: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0

    def table(self) -> str:
        """The comparison as a markdown table (perplexity is exp(loss))."""
        heldout = any(r.get("heldout_loss") is not None for r in self.rows)
        head = "| plan | owners | retention | search loss | search ppl |" + (" held-out loss | held-out ppl |" if heldout else "")
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in self.rows:
            cells = [r["plan"], str(r["owners"]), f"{100 * r['retention']:.1f}%", f"{r['loss']:.4f}", _ppl(r["loss"])]
            if heldout:
                h = r.get("heldout_loss")
                cells += [f"{h:.4f}" if h is not None else "-", _ppl(h) if h is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _ppl(loss: float) -> str:
    return f"{math.exp(loss):,.1f}" if loss < 50 else "inf"


def uniform_plans(num_layers: int, owners: int, layer_types: tuple[str, ...] | None = None) -> list[SharingPlan]:
    """The uniform plan with exactly ``owners`` owners: the smallest ``every:k`` that matches, else ``keep:F``."""
    plans = []
    for k in range(1, num_layers + 1):
        plan = SharingPlan.from_spec(f"every:{k}", num_layers, layer_types)
        if len(plan.owners) == owners:
            plans.append(plan)
            break
    if not plans:
        plan = SharingPlan.from_spec(f"keep:{owners / num_layers:.6g}", num_layers, layer_types)
        if len(plan.owners) == owners:
            plans.append(plan)
    return plans


def search_plan(
    model: torch.nn.Module,
    chunks: SearchData,
    owners: int,
    heldout: SearchData | None = None,
    beam: int = 1,
    shortlist: int | None = None,
    refine: int = 20,
    batch_size: int = 8,
    progress: bool = True,
    autocast: Callable = contextlib.nullcontext,
) -> SearchResult:
    """Search the owner set of size ``owners`` with the lowest loss on ``chunks``.

    Works on any routed model: R-CLA-trained, or untrained (post hoc, the KVSharer setting).
    The model's plan is restored afterwards.

    Args:
        model: a routed model (``kvroute.load`` or ``kvroute.apply``).
        chunks: ``(N, T)`` calibration token ids the search minimizes the loss on, or labelled
            batches (:data:`SearchData`: the loss on QA answers, say).
        owners: exact number of owner layers (see :func:`kvroute.budget.owners_for_budget`).
        heldout: optional data of the same kind, only scored for the comparison table.
        beam: owner sets kept per greedy step.
        shortlist: if set, each greedy step after the first only tries the ``shortlist`` layers
            that did best in the previous step (lazy greedy: far fewer plans evaluated).
        refine: at most this many rounds of moving single owners to neighbouring layers (0: none).
        batch_size: chunks per forward pass (labelled batches are scored as they are).
        progress: show tqdm progress bars.
        autocast: a context manager each forward runs in (:func:`kvroute.precision.autocast`).

    Returns:
        The plan (spec ``layers:...``) and a table against ``full`` and uniform plans with the same owner count.
    """
    shape = KVShape.from_config(model.config)
    layers = shape.num_layers
    must = tuple(mandatory_owners(shape))
    if not len(must) <= owners <= layers:
        raise ValueError(f"owners must be between {len(must)} and {layers}, got {owners}")
    if beam < 1:
        raise ValueError(f"beam must be at least 1, got {beam}")
    if shortlist is not None and shortlist < 1:
        raise ValueError(f"shortlist must be at least 1, got {shortlist}")
    previous = get_router(model).plan
    scorer = PlanScorer(model, chunks, batch_size, autocast)
    try:
        best = _greedy(scorer, must, layers, owners, beam, shortlist, progress)
        best = _refine(scorer, best, must, layers, refine, progress)
        baselines = uniform_plans(layers, owners, shape.layer_types)
        for plan in baselines:  # never worse than the uniform plan on the search chunks
            if (scorer.loss(plan.owners), plan.owners) < (scorer.loss(best), best):
                best = plan.owners
        result_plan = scorer.plan(best)
        rows = []
        reference = [SharingPlan.from_spec("full", layers, shape.layer_types)] if owners < layers else []
        for plan in [*reference, *baselines, result_plan]:
            row = {"plan": plan.spec, "owners": len(plan.owners), "retention": plan.retention,
                   "loss": scorer.loss(plan.owners), "heldout_loss": None}
            rows.append(row)
        evaluations = len(scorer.cache)
        if heldout is not None:
            held = PlanScorer(model, heldout, batch_size, autocast)
            for row, plan in zip(rows, [*reference, *baselines, result_plan]):
                row["heldout_loss"] = held.loss(plan.owners)
        return SearchResult(result_plan, scorer.loss(best), rows, evaluations)
    finally:
        set_plan(model, previous)


def _greedy(
    scorer: PlanScorer, must: Owners, layers: int, owners: int, beam: int, shortlist: int | None, progress: bool
) -> Owners:
    adding = owners <= layers // 2  # add from the mandatory owners, else remove from the full plan
    frontier = [must] if adding else [tuple(range(layers))]
    last: dict[int, float] = {}  # layer -> loss when it was last added (removed): the shortlist ranking
    while len(frontier[0]) != owners:
        size = len(frontier[0]) + (1 if adding else -1)
        cands: dict[Owners, int] = {}
        for s in frontier:
            moves = [x for x in range(layers) if x not in s] if adding else [r for r in s if r not in must]
            if shortlist and last:
                moves = sorted(moves, key=lambda x: (last.get(x, math.inf), x))[:shortlist]
            for x in moves:
                cands[tuple(sorted((*s, x))) if adding else tuple(y for y in s if y != x)] = x
        frontier = scorer.best(cands, beam, f"{'add' if adding else 'remove'}: {size}/{owners} owners", progress)
        step: dict[int, float] = {}
        for cand, x in cands.items():
            step[x] = min(step.get(x, math.inf), scorer.loss(cand))
        last.update(step)
    return frontier[0]


def _refine(scorer: PlanScorer, best: Owners, must: Owners, layers: int, rounds: int, progress: bool) -> Owners:
    for r in range(rounds):
        cands = [best]
        for o in best:
            if o in must:
                continue
            for x in (o - 1, o + 1):
                if 0 <= x < layers and x not in best:
                    cands.append(tuple(sorted((*[y for y in best if y != o], x))))
        top = scorer.best(cands, 1, f"refine: round {r + 1}", progress)[0]
        if scorer.loss(top) >= scorer.loss(best):
            break
        best = top
    return best
