"""Liger-Kernel's fused linear cross-entropy signatures (liger_kernel.transformers).

Note Liger's argument order: the module's forward takes the weight first,
forward(lin_weight, _input, target, bias); the functional takes the input first.
lse_square_scale is flce's z_loss. With return_z_loss / return_token_accuracy the result is a
CrossEntropyOutput whose z_loss (the z-loss part of the loss, reduced like it) and
token_accuracy (over non-ignored tokens) are detached, for logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F


@dataclass
class CrossEntropyOutput:
    loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None


def liger_fused_linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    lse_square_scale: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    return_z_loss: bool = False,
    accum_dtype: torch.dtype | None = None,
    use_token_scaling: bool = False,
    return_token_accuracy: bool = False,
):
    """accum_dtype is accepted and ignored (flce accumulates in float32)."""
    del accum_dtype
    if use_token_scaling:
        raise NotImplementedError("use_token_scaling: token scaling is not supported by flce")
    if return_token_accuracy and reduction == "none":
        raise NotImplementedError(
            "return_token_accuracy: per-token accuracy (reduction='none') "
            "is not supported; use reduction 'mean' or 'sum'"
        )
    want_stats = return_z_loss or return_token_accuracy
    out = F.linear_cross_entropy(
        input,
        weight,
        target,
        bias,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=lse_square_scale,
        softcap=softcap,
        class_weight=ce_weight,
        return_metrics=want_stats and reduction != "none",
        return_lse=return_z_loss and reduction == "none",
    )
    if not want_stats:
        return out
    loss, extra = out
    z_loss = token_accuracy = None
    if reduction == "none":
        valid = (target != ignore_index).to(torch.float32)
        z_loss = lse_square_scale * extra.detach().square() * valid
    else:
        if return_z_loss:
            z_loss = lse_square_scale * extra["lse_squared"]
            if reduction == "sum":
                z_loss = z_loss * extra["valid_tokens"]
        if return_token_accuracy:
            token_accuracy = extra["accuracy"]
    return CrossEntropyOutput(loss=loss, z_loss=z_loss, token_accuracy=token_accuracy)


class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
    def __init__(
        self,
        ce_weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        lse_square_scale: float = 0.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        softcap: float | None = None,
        return_z_loss: bool = False,
        accum_dtype: torch.dtype | None = None,
        use_token_scaling: bool = False,
        return_token_accuracy: bool = False,
    ):
        super().__init__()
        F._loss_options(ignore_index, reduction, label_smoothing, lse_square_scale, softcap, 1.0)
        self.ce_weight = ce_weight
        self.ignore_index = ignore_index
        self.lse_square_scale = lse_square_scale
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.accum_dtype = accum_dtype
        self.use_token_scaling = use_token_scaling
        self.return_token_accuracy = return_token_accuracy

    def forward(self, lin_weight, _input, target, bias=None):
        return liger_fused_linear_cross_entropy(
            _input,
            lin_weight,
            target,
            bias,
            ce_weight=self.ce_weight,
            ignore_index=self.ignore_index,
            lse_square_scale=self.lse_square_scale,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            softcap=self.softcap,
            return_z_loss=self.return_z_loss,
            accum_dtype=self.accum_dtype,
            use_token_scaling=self.use_token_scaling,
            return_token_accuracy=self.return_token_accuracy,
        )
