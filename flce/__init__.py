"""flce: fused linear cross-entropy for LLM training without materializing the [N, V] logits.

    loss = flce.linear_cross_entropy(hidden, lm_head.weight, labels, shift=True)

See flce.functional for the options and their exact semantics.
"""

from . import _ops  # noqa: F401  (registers fake kernels and autograd of torch.ops.flce.*)
from .functional import (
    cross_entropy,
    cuda_available,
    default_memory_budget,
    linear_cross_entropy,
    plan,
)
from .modules import CrossEntropyLoss, LinearCrossEntropy, LinearCrossEntropyLoss


def patch(model, **options):
    """Makes a Hugging Face causal LM compute its training loss with flce (see
    flce.integrations.transformers.patch). Imported lazily so flce does not need transformers."""
    from .integrations.transformers import patch as _patch

    return _patch(model, **options)


__all__ = [
    "CrossEntropyLoss",
    "LinearCrossEntropy",
    "LinearCrossEntropyLoss",
    "cross_entropy",
    "cuda_available",
    "default_memory_budget",
    "linear_cross_entropy",
    "patch",
    "plan",
]
