"""The float64 reference every method's accuracy is measured against.

Computed once per (shape, data kind) on the benchmark device, chunked over tokens so that only a
[chunk, V] float64 block of logits exists at a time, and reused for every method.
"""

from __future__ import annotations

import dataclasses

import torch

from .data import IGNORE_INDEX


@dataclasses.dataclass
class Reference:
    loss: float
    grad_x: torch.Tensor  # [N, D] float32 (float64 result, rounded once)
    grad_weight: torch.Tensor  # [V, D] float32
    valid_tokens: int


def reference(
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None = None,
    chunk_bytes: int = 1 << 30,
) -> Reference:
    """Mean cross-entropy of (softcapped) x w^T and its gradients, in float64."""
    n, d = x.shape
    v = w.shape[0]
    valid = labels != IGNORE_INDEX
    n_valid = int(valid.sum())
    w64 = w.detach().double()
    grad_w64 = torch.zeros_like(w64)
    grad_x = torch.empty(n, d, dtype=torch.float32, device=x.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    scale = 1.0 / max(n_valid, 1)
    step = max(1, chunk_bytes // (v * 8))
    for s in range(0, n, step):
        x64 = x.detach()[s : s + step].double()
        y = labels[s : s + step]
        ok = valid[s : s + step]
        z = x64 @ w64.T
        if softcap:
            t = torch.tanh(z / softcap)
            z = softcap * t
        lse = torch.logsumexp(z, dim=1)
        safe_y = torch.where(ok, y, torch.zeros_like(y))
        target = z.gather(1, safe_y[:, None])[:, 0]
        loss_sum += torch.where(ok, lse - target, torch.zeros_like(lse)).sum()
        # dL/dz = (softmax - onehot) / n_valid on valid rows, 0 on ignored rows.
        g = torch.exp_(z.sub_(lse[:, None]))
        g[torch.arange(g.shape[0], device=g.device), safe_y] -= 1.0
        g *= (ok.double() * scale)[:, None]
        if softcap:
            g *= 1.0 - t * t
            del t
        grad_x[s : s + step] = (g @ w64).float()
        grad_w64.addmm_(g.T, x64)
        del z, g, x64
    loss = float(loss_sum) * scale if n_valid else 0.0
    grad_w = grad_w64.float()
    del grad_w64, w64
    return Reference(loss, grad_x, grad_w, n_valid)


def relative_error(got: torch.Tensor, ref: torch.Tensor, chunk_rows: int = 16384) -> float:
    """||got - ref|| / ||ref|| accumulated in float64 over row chunks (no full-size temporary)."""
    if got.shape != ref.shape:
        raise ValueError(f"gradient: expected shape {list(ref.shape)}, got {list(got.shape)}")
    num = torch.zeros((), dtype=torch.float64, device=ref.device)
    den = torch.zeros((), dtype=torch.float64, device=ref.device)
    for s in range(0, ref.shape[0], chunk_rows):
        r = ref[s : s + chunk_rows].double()
        num += (got[s : s + chunk_rows].double() - r).square().sum()
        den += r.square().sum()
    return float(num.sqrt() / den.sqrt()) if float(den) > 0 else float(num.sqrt())
