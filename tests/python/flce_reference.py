"""Independent float64 reference: PyTorch's own cross_entropy on float64 copies of the inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Relative error bounds per input dtype (loss, gradients) used when no same-dtype PyTorch
# baseline is computed. bf16 / fp16 gradients are stored in the input dtype, so their error is
# dominated by that rounding (2^-8 and 2^-11 relative).
TOL = {
    torch.float32: (1e-5, 1e-4),
    torch.float64: (1e-5, 1e-4),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1e-2, 3e-2),
}


def transform(r, logit_scale=1.0, softcap=None):
    z = r * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z


def ce_from_logits(
    z, y, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, class_weight=None
):
    """Loss of logits z [*, V] (float64), with flce's z-loss (divided like the loss for mean)."""
    v = z.shape[-1]
    z2 = z.reshape(-1, v)
    y1 = y.reshape(-1).long()
    w = None if class_weight is None else class_weight.double()
    per = F.cross_entropy(
        z2,
        y1,
        weight=w,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    lse = torch.logsumexp(z2, dim=-1)
    valid = y1 != ignore_index
    per = per + z_loss * lse.square() * valid
    if reduction == "none":
        return per.reshape(y.shape), lse.reshape(y.shape)
    if reduction == "sum":
        return per.sum(), lse.reshape(y.shape)
    if w is None:
        denom = valid.sum().double()
    else:
        denom = torch.where(valid, w[y1.clamp(0, v - 1)], 0.0).sum()
    loss = per.sum() / denom if denom > 0 else per.sum() * 0.0
    return loss, lse.reshape(y.shape)


def linear_ce(x, weight, y, bias=None, *, shift=0, logit_scale=1.0, softcap=None, **options):
    """(loss, lse) of transform(x W^T + b) in float64; x, weight, bias are used as given (call
    on float64 leaves to get reference gradients)."""
    if shift:
        ignore = options.get("ignore_index", -100)
        y = torch.cat((y[..., shift:], torch.full_like(y[..., :shift], ignore)), dim=-1)
    z = transform(F.linear(x, weight, bias), logit_scale, softcap)
    return ce_from_logits(z, y, **options)


def leaves64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_(True) for t in tensors]


def rel_err(a, b) -> float:
    a = a.detach().double()
    b = b.detach().double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff if denom == 0 else diff / denom


def random_labels(shape, vocab, device, ignore_index=-100, ignore_frac=0.2, dtype=torch.int64):
    y = torch.randint(0, vocab, shape, device=device)
    mask = torch.rand(shape, device=device) < ignore_frac
    return torch.where(mask, torch.full_like(y, ignore_index), y).to(dtype)


def make_inputs(n_shape, vocab, hidden, device, dtype=torch.float32, bias=False, logit_std=2.0):
    """x [*n_shape, D], weight [V, D], optional bias, scaled so the logits have std ~logit_std."""
    x = torch.randn(*n_shape, hidden, device=device).to(dtype)
    w = (torch.randn(vocab, hidden, device=device) * logit_std / hidden**0.5).to(dtype)
    b = (torch.randn(vocab, device=device) * 0.5).to(dtype) if bias else None
    return x, w, b
