"""nn.Module wrappers of the functional API."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as F


class LinearCrossEntropyLoss(nn.Module):
    """Fused linear cross-entropy as a loss module: forward(x, weight, target, bias=None).

    Options are those of flce.linear_cross_entropy and are fixed at construction.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        class_weight: torch.Tensor | None = None,
        shift: bool | int = False,
        memory_budget: int | None = None,
        strategy: str = "auto",
    ):
        super().__init__()
        # Checked now so a bad option fails at construction, not at the first step.
        F._loss_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale)
        F._shift_amount(shift)
        F._budget(memory_budget)
        F._strategy_code(strategy)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.shift = shift
        self.memory_budget = memory_budget
        self.strategy = strategy
        self.register_buffer("class_weight", class_weight)

    def loss_options(self) -> dict:
        return {
            "ignore_index": self.ignore_index,
            "reduction": self.reduction,
            "label_smoothing": self.label_smoothing,
            "z_loss": self.z_loss,
            "softcap": self.softcap,
            "logit_scale": self.logit_scale,
            "class_weight": self.class_weight,
            "shift": self.shift,
            "memory_budget": self.memory_budget,
            "strategy": self.strategy,
        }

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return F.linear_cross_entropy(x, weight, target, bias, **self.loss_options())

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, logit_scale={self.logit_scale}, shift={self.shift}, "
            f"strategy={self.strategy!r}"
        )


class LinearCrossEntropy(LinearCrossEntropyLoss):
    """An LM head that owns its weight [out_features, in_features] (like nn.Linear) and fuses
    the loss: forward(x, target) -> loss; forward(x) -> logits (plain F.linear, for generation).

    init_method(weight) replaces nn.Linear's default initialization. monitoring=True fills
    self.metrics (a dict of python floats: max_logit, logit_norm, entropy, lse_squared,
    accuracy, valid_tokens) on every loss call; reading them synchronizes with the device once
    per call.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        init_method=None,
        device=None,
        dtype=None,
        monitoring: bool = False,
        **loss_options,
    ):
        super().__init__(**loss_options)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.init_method = init_method
        self.monitoring = monitoring
        self.metrics: dict[str, float] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init_method is not None:
            self.init_method(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        if target is None:
            return nn.functional.linear(x, self.weight, self.bias)
        if not self.monitoring:
            return F.linear_cross_entropy(x, self.weight, target, self.bias, **self.loss_options())
        loss, metrics = F.linear_cross_entropy(
            x, self.weight, target, self.bias, return_metrics=True, **self.loss_options()
        )
        self.metrics = {name: float(value) for name, value in metrics.items()}
        return loss

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, monitoring={self.monitoring}, " + super().extra_repr()
        )


class CrossEntropyLoss(nn.Module):
    """Drop-in for torch.nn.CrossEntropyLoss with class-index targets, computed by flce's online
    softmax (plus optional z_loss and softcap). Input [N, C], [C] or [N, C, d1, ...] (classes in
    dim 1, as in PyTorch); the loss is float32."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__()
        F._loss_options(ignore_index, reduction, label_smoothing, z_loss, softcap, 1.0)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        F._check_tensor("input", input)
        F._check_tensor("target", target)
        if target.is_floating_point():
            raise TypeError(
                "target: flce.CrossEntropyLoss takes class indices (int64 or int32), "
                f"got a {target.dtype} tensor (class probabilities are not supported)"
            )
        if input.dim() > 2:  # PyTorch puts the classes in dim 1
            input = input.movedim(1, -1)
        return F.cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
        )
