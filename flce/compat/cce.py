"""Cut Cross-Entropy's signature (apple/ml-cross-entropy, cut_cross_entropy.linear_cross_entropy).

Semantics follow CCE: with shift k, position t of e predicts targets[..., t + k]; reduction
"none" returns targets' shape with the loss of predicting target j at index j (the first k
entries are 0), and the returned lse covers the positions that predict something
([..., T - k]).
"""

from __future__ import annotations

import torch

from .. import functional as F


def linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: bool | int = False,
    return_lse: bool = False,
    filter_eps: float | str | None = "auto",
    accum_e_fp32: bool = False,
    accum_c_fp32: bool = False,
    filter_e_grad: bool = True,
    filter_c_grad: bool = True,
    impl: str = "cce",
    vocab_parallel_options=None,
):
    """CE(e @ c.T + bias, targets) computed by flce; filter_eps, accum_*, filter_*_grad and impl
    are accepted and ignored (flce never filters and always accumulates in float32)."""
    del filter_eps, accum_e_fp32, accum_c_fp32, filter_e_grad, filter_c_grad, impl
    if vocab_parallel_options is not None:
        raise NotImplementedError("vocab_parallel_options: vocabulary parallelism is not supported")
    k = F._shift_amount(shift)
    if k:
        F._check_tensor("targets", targets)
        if k >= targets.shape[-1]:
            raise ValueError(
                f"shift: expected a value in [0, {targets.shape[-1]}) (targets.shape[-1]), got {k}"
            )
    out = F.linear_cross_entropy(
        e,
        c,
        targets,
        bias,
        ignore_index=ignore_index,
        softcap=softcap,
        reduction=reduction,
        shift=k,
        return_lse=return_lse,
    )
    loss, lse = out if return_lse else (out, None)
    if k:
        if reduction == "none":  # CCE reports the loss at the predicted target's position
            loss = torch.cat((loss.new_zeros((*loss.shape[:-1], k)), loss[..., :-k]), dim=-1)
        if lse is not None:
            lse = lse[..., :-k]
    return (loss, lse) if return_lse else loss
