"""Benchmark shapes and input generators (see BENCHMARKS.md at the project root of the docs)."""

from __future__ import annotations

import dataclasses
import math

import torch

IGNORE_INDEX = -100
IGNORED_FRACTION = 0.10


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    num_tokens: int  # N
    vocab_size: int  # V
    hidden_size: int  # D
    model: str = ""

    @property
    def flops_6nvd(self) -> float:
        return 6.0 * self.num_tokens * self.vocab_size * self.hidden_size


SHAPES = {
    s.name: s
    for s in (
        Shape("gemma2", 8192, 256000, 2304, "Gemma-2 2B (CCE paper's shape)"),
        Shape("llama3", 8192, 128256, 4096, "Llama-3 8B"),
        Shape("qwen-0.5b", 16384, 151936, 896, "Qwen2.5 0.5B (V >> D)"),
        Shape("llama3-4k", 4096, 128256, 4096, "QuACK's and Liger's published H200 shape"),
        Shape("llama-70b", 4096, 128256, 8192, "Llama-3 70B"),
    )
}
QUICK_SHAPE = "llama3-4k"

# lm: logit std ~4.5 and labels drawn from the model's own softmax, like a trained LM's head.
# flat: logit std 1 and uniform labels (softmax nearly uniform: nothing for a filter to skip).
# cce: Cut Cross-Entropy's generator, W[:N] = x, so each token has one dominant logit
#      (~sqrt(D)) and the softmax is very peaked (gradient filtering skips almost everything).
KINDS = ("lm", "flat", "cce")


def parse_shape(spec: str) -> Shape:
    """`name:N:V:D` -> Shape, for shapes outside the table (tests, experiments)."""
    parts = spec.split(":")
    if len(parts) != 4:
        raise ValueError(f"--shape: expected name:N:V:D, got {spec!r}")
    try:
        n, v, d = (int(p) for p in parts[1:])
    except ValueError:
        raise ValueError(f"--shape: N, V, D must be integers, got {spec!r}") from None
    if min(n, v, d) < 1:
        raise ValueError(f"--shape: N, V, D must be >= 1, got {spec!r}")
    return Shape(parts[0], n, v, d, "custom")


def _rows_per_chunk(vocab_size: int, bytes_per_elem: int, target_bytes: int) -> int:
    return max(1, target_bytes // (vocab_size * bytes_per_elem))


def _sample_from_logits(x: torch.Tensor, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One label per row of x drawn from softmax(x w^T), a token chunk at a time.

    Gumbel-max (argmax of logits + Gumbel noise) is an exact sample of the softmax and needs only
    elementwise work and an argmax, so the [N, V] logits are never held at once.
    """
    n, v = x.shape[0], w.shape[0]
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    step = _rows_per_chunk(v, 4, 512 << 20)
    for s in range(0, n, step):
        z = (x[s : s + step] @ w.T).float()
        u = torch.rand(z.shape, generator=gen, device=z.device, dtype=torch.float32)
        # -log(-log(u)) is the Gumbel noise; clamp keeps log finite at u = 0.
        z -= torch.log(-torch.log(u.clamp_(min=1e-20)))
        labels[s : s + step] = z.argmax(dim=1)
        del z, u
    return labels


def make_inputs(
    shape: Shape,
    kind: str,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, D], W [V, D] (dtype, requires_grad) and labels [N] int64, 10% set to IGNORE_INDEX."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    n, v, d = shape.num_tokens, shape.vocab_size, shape.hidden_size
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    x = torch.randn(n, d, generator=gen, device=device, dtype=torch.float32)
    w = torch.randn(v, d, generator=gen, device=device, dtype=torch.float32)
    if kind == "lm":
        w *= 4.5 / math.sqrt(d)
    elif kind == "flat":
        w *= 1.0 / math.sqrt(d)
    else:
        x *= d**-0.25
        w *= d**-0.25
        w[: min(n, v)] = x[: min(n, v)]
    x, w = x.to(dtype), w.to(dtype)
    if kind == "lm":
        labels = _sample_from_logits(x, w, gen)
    else:
        labels = torch.randint(0, v, (n,), generator=gen, device=device)
    # Exactly 10% ignored, at random positions (not a block: a block would favour some chunks).
    ignored = torch.randperm(n, generator=gen, device=device)[: round(n * IGNORED_FRACTION)]
    labels[ignored] = IGNORE_INDEX
    return x.requires_grad_(), w.requires_grad_(), labels
