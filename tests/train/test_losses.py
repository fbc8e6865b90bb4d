"""The fused next-token losses against the unfused reference: values and gradients, masks, dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvroute.data.qa import IGNORE_INDEX
from kvroute.train import causal_lm_loss, distill_kl, next_token_losses
from kvroute.train import losses


def reference(logits, labels, teacher):
    """The unfused form: F.cross_entropy, and a KL over log-softmaxes, on fp32 copies (sums)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                         reduction="sum")
    s = logits[:, :-1][mask].float().log_softmax(-1)
    t = teacher[:, :-1][mask].float().log_softmax(-1)
    return ce, (t.exp() * (t - s)).sum()


def batch(dtype=torch.float32, vocab=37, length=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, length, vocab, generator=g) * 3).to(dtype)
    teacher = (torch.randn(3, length, vocab, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (3, length), generator=g)
    labels[1, :50] = IGNORE_INDEX  # a QA record: only its answer is scored
    labels[2, 20:25] = IGNORE_INDEX
    return logits, teacher, labels


@pytest.mark.parametrize("with_teacher", [True, False])
def test_fused_losses_and_gradients_equal_the_unfused_form(monkeypatch, with_teacher):
    logits, teacher, labels = batch()  # 3 x 70 positions: more than two chunks of 32, as SmolLM2's on a CPU
    monkeypatch.setattr(losses, "CPU_CHUNK_BYTES", 32 * 4 * logits.shape[-1])
    size = losses.chunk_positions(logits.device, logits.shape[-1])
    assert labels[:, 1:].ne(IGNORE_INDEX).sum() > 2 * size
    rows = (labels[:, 1:].flatten() != IGNORE_INDEX).nonzero()[:, 0]
    rows = rows + rows // 69
    assert {type(part) for *_, part in losses._chunks(rows, size)} == {slice, torch.Tensor}  # both ways of reading rows
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ce, kl = next_token_losses(a, labels, teacher if with_teacher else None, "sum")
    ref_ce, ref_kl = reference(b, labels, teacher)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-6, atol=1e-4)
    if with_teacher:
        torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=1e-4)
        (0.3 * ce + 1.7 * kl).backward()  # different weights: each loss's gradient is its own
        (0.3 * ref_ce + 1.7 * ref_kl).backward()
    else:
        assert kl.item() == 0.0
        ce.backward()
        ref_ce.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert a.grad[1, :49].abs().sum() == 0 and a.grad[:, -1].abs().sum() == 0  # unscored positions: no gradient
    assert b.grad[1, :49].abs().sum() == 0


@pytest.mark.parametrize("positions", [1, 7, 10_000])
def test_any_chunk_size_gives_the_same_losses_and_gradients(monkeypatch, positions):
    """One position per chunk, a ragged last chunk, or one chunk for everything (as on an accelerator)."""
    logits, teacher, labels = batch()
    monkeypatch.setattr(losses, "CPU_CHUNK_BYTES", positions * 4 * logits.shape[-1])
    assert losses.chunk_positions(logits.device, logits.shape[-1]) == positions
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ce, kl = next_token_losses(a, labels, teacher, "sum")
    ref_ce, ref_kl = reference(b, labels, teacher)
    torch.testing.assert_close(torch.stack([ce, kl]), torch.stack([ref_ce, ref_kl]), rtol=1e-5, atol=1e-4)
    (ce + kl).backward()
    (ref_ce + ref_kl).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_chunks_fit_the_cache_on_a_cpu_and_are_large_on_an_accelerator():
    assert losses.chunk_positions(torch.device("cpu"), 49152) == 32
    assert losses.chunk_positions(torch.device("cuda"), 49152) == 1365
    assert losses.chunk_positions(torch.device("cpu"), 10 ** 9) == 1


def test_per_position_gradients_reach_their_own_position():
    """The per-position outputs carry their own gradients, as a weighted sum over positions needs."""
    logits, teacher, labels = batch(length=9)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    weights = torch.rand(3, 8, generator=torch.Generator().manual_seed(1))
    ce, kl = losses._NextTokenLosses.apply(a, labels, teacher)
    ((ce * weights).sum() + (kl * weights.flip(0)).sum()).backward()
    mask = labels[:, 1:] != IGNORE_INDEX
    s, t = b[:, :-1].log_softmax(-1), teacher[:, :-1].log_softmax(-1)
    ref_ce = -s.gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0] * mask
    ref_kl = (t.exp() * (t - s)).sum(-1) * mask
    ((ref_ce * weights).sum() + (ref_kl * weights.flip(0)).sum()).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_bf16_logits_keep_fp32_work_and_get_a_bf16_gradient():
    logits, teacher, labels = batch(torch.bfloat16, vocab=301)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ce, kl = next_token_losses(a, labels, teacher, "mean")
    assert ce.dtype == kl.dtype == torch.float32
    count = labels[:, 1:].ne(IGNORE_INDEX).sum()
    ref_ce, ref_kl = reference(b, labels, teacher)
    torch.testing.assert_close(ce, ref_ce / count)
    torch.testing.assert_close(kl, ref_kl / count)
    (ce + kl).backward()
    ((ref_ce + ref_kl) / count).backward()
    assert a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=2 ** -8 * float(b.grad.abs().max()))  # one bf16 step


def test_wrappers_and_bad_input():
    logits, teacher, labels = batch()
    ref_ce, ref_kl = reference(logits, labels, teacher)
    count = labels[:, 1:].ne(IGNORE_INDEX).sum()
    torch.testing.assert_close(causal_lm_loss(logits, labels), ref_ce / count)
    torch.testing.assert_close(distill_kl(logits, teacher, labels, "sum"), ref_kl, rtol=1e-5, atol=1e-4)
    assert distill_kl(logits, logits, labels).item() == 0.0
    nothing = torch.full_like(labels, IGNORE_INDEX)
    assert causal_lm_loss(logits, nothing, "sum").item() == 0.0
    assert causal_lm_loss(logits, nothing).isnan()  # as F.cross_entropy's mean of nothing
    with pytest.raises(ValueError, match="reduction"):
        next_token_losses(logits, labels, reduction="none")
    with pytest.raises(ValueError, match="do not match"):
        next_token_losses(logits, labels, teacher[:, :-1])
