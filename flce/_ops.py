"""flce's C++ ops as PyTorch sees them: fake kernels (torch.compile, meta tensors) and autograd.

The ops are defined in binding/flce_ops.cpp (TORCH_LIBRARY(flce)). This module only describes
them to PyTorch; the user-facing API is in flce/functional.py.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.flce.*)

REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}
STRATEGIES = {"auto": 0, "grad_in_forward": 1, "recompute": 2}
STRATEGY_NAMES = {code: name for name, code in STRATEGIES.items()}
REDUCTION_NONE = REDUCTIONS["none"]
GRAD_IN_FORWARD = STRATEGIES["grad_in_forward"]

# Order of the int list returned by torch.ops.flce.plan (PlanField in the binding).
PLAN_FIELDS = (
    "strategy",
    "forward_token_chunk",
    "dw_group_tokens",
    "backward_token_chunk",
    "backward_vocab_chunk",
    "forward_workspace_bytes",
    "backward_workspace_bytes",
    "min_budget_bytes",
    "forward_vocab_chunk",
    "backward_order",
    "gemm_scratch_bytes",
    "fused_logits",
    "compact_backward_blocks",
    "compact_forward_blocks",
    "shifted_terms",
)
# flce::FusedLogits
FUSED_LOGITS = {"off": 0, "auto": 1, "always": 2}
FUSED_LOGITS_NAMES = {code: name for name, code in FUSED_LOGITS.items()}
# flce::BackwardOrder
BACKWARD_ORDERS = {"vocab_outer": 0, "token_outer": 1}
BACKWARD_ORDER_NAMES = {code: name for name, code in BACKWARD_ORDERS.items()}
# Order of the metrics tensor (flce::Metric).
METRIC_NAMES = ("max_logit", "logit_norm", "entropy", "lse_squared", "accuracy", "valid_tokens")


# The plan depends only on Python scalars, so torch.compile evaluates it once while tracing and
# bakes the result into the graph as constants (no graph break, no op in the graph).
@torch.compiler.assume_constant_result
def compute_plan(
    num_tokens: int,
    vocab_size: int,
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
    reduction: int,
    has_bias: bool,
    grad_x: bool,
    grad_weight: bool,
    grad_bias: bool,
    grad_lse: bool,
    memory_budget: int,
    strategy: int,
    has_softcap: bool = False,
    has_weighted_smoothing: bool = False,
    compute_metrics: bool = False,
) -> list[int]:
    return list(
        torch.ops.flce.plan(
            int(num_tokens),
            int(vocab_size),
            int(hidden_size),
            dtype,
            device,
            reduction,
            has_bias,
            grad_x,
            grad_weight,
            grad_bias,
            grad_lse,
            int(memory_budget),
            strategy,
            bool(has_softcap),
            bool(has_weighted_smoothing),
            bool(compute_metrics),
        )
    )


# ------------------------------------------------------------------------------------------
# Fake kernels: the shapes the C++ ops produce.


def _f32(like: torch.Tensor, shape) -> torch.Tensor:
    return like.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("flce::lce_forward")
def _lce_forward_fake(
    x,
    weight,
    bias,
    target,
    class_weight,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    plan,
    grad_x,
    grad_weight,
    grad_bias,
    compute_metrics,
):
    n, d = x.shape
    v = weight.shape[0]
    return (
        _f32(x, (n,) if reduction == REDUCTION_NONE else ()),
        _f32(x, (n,)),
        _f32(x, (len(METRIC_NAMES) if compute_metrics else 0,)),
        x.new_empty((n, d) if grad_x else (0,)),
        x.new_empty((v, d) if grad_weight else (0,)),
        x.new_empty((v,) if grad_bias else (0,)),
    )


@torch.library.register_fake("flce::lce_backward")
def _lce_backward_fake(
    x,
    weight,
    bias,
    target,
    class_weight,
    lse,
    grad_loss,
    grad_lse,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    plan,
    grad_x,
    grad_weight,
    grad_bias,
):
    n, d = x.shape
    v = weight.shape[0]
    return (
        x.new_empty((n, d) if grad_x else (0,)),
        x.new_empty((v, d) if grad_weight else (0,)),
        x.new_empty((v,) if grad_bias else (0,)),
    )


def _ce_outputs_fake(logits, reduction, compute_metrics):
    n = logits.shape[0]
    return (
        _f32(logits, (n,) if reduction == REDUCTION_NONE else ()),
        _f32(logits, (n,)),
        _f32(logits, (len(METRIC_NAMES) if compute_metrics else 0,)),
    )


@torch.library.register_fake("flce::ce_forward")
def _ce_forward_fake(
    logits,
    target,
    class_weight,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    compute_metrics,
):
    return _ce_outputs_fake(logits, reduction, compute_metrics)


# The in-place variant writes the gradient into `logits`; its outputs have the same shapes.
torch.library.register_fake("flce::ce_forward_inplace")(_ce_forward_fake)


@torch.library.register_fake("flce::ce_backward")
def _ce_backward_fake(
    logits,
    target,
    class_weight,
    grad_loss,
    grad_lse,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
):
    return logits.new_empty(logits.shape)


# ------------------------------------------------------------------------------------------
# Autograd of lce_forward.
#
# grad_in_forward: the forward already produced dx, dW, db for an upstream gradient of 1; the
# backward rescales them by the (scalar) upstream gradient, in place in eager mode so no second
# V x D buffer is allocated (the graph can then be backpropagated only once, as for any graph
# whose buffers were freed; calling the raw op directly, its grad outputs get rescaled too).
# recompute: the backward recomputes the logits blockwise from the saved x, W and LSE.


def _rescale(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad * scale, in place in eager mode. While tracing (torch.compile, AOTAutograd) it stays
    functional: the tracer must not see a mutation of a forward output, and Inductor reuses the
    dead buffer by itself.

    In eager mode a one-element scale goes through flce's scale_ kernel, which reads the scale on
    the device and skips the pass when it is 1 (a plain loss.backward()): no host sync, and no
    read and write of the V x D gradient."""
    if type(grad) is torch.Tensor and not torch.compiler.is_compiling():
        if scale.numel() == 1 and grad.is_contiguous():
            torch.ops.flce.scale_(grad, scale)
            return grad
        return grad.mul_(scale)
    return grad * scale


def _lce_setup_context(ctx, inputs, output):
    (
        x,
        weight,
        bias,
        target,
        class_weight,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        plan,
        grad_x,
        grad_weight,
        grad_bias,
        _compute_metrics,
    ) = inputs
    _loss, lse, metrics, gx, gw, gb = output
    ctx.mark_non_differentiable(metrics, gx, gw, gb)
    # Unused outputs get None, not zeros: materializing them would fill [V, D] buffers for the
    # non-differentiable gradient outputs on every backward.
    ctx.set_materialize_grads(False)
    ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale)
    ctx.plan = list(plan)
    ctx.grad_in_forward = plan[0] == GRAD_IN_FORWARD
    ctx.has_bias = bias is not None
    if ctx.grad_in_forward:
        ctx.computed = (grad_x, grad_weight, grad_bias)
        ctx.consumed = False
        if torch.compiler.is_compiling():
            ctx.save_for_backward(gx, gw, gb)
            ctx.eager_grads = None
        else:
            # Held outside save_for_backward and dropped when used, so the backward hands autograd
            # the only reference and AccumulateGrad can adopt the buffer rather than copy V x D.
            ctx.eager_grads = [gx, gw, gb]
    else:
        ctx.save_for_backward(x, weight, bias, target, class_weight, lse)


def _lce_backward(ctx, grad_loss, grad_lse, _grad_metrics, _ggx, _ggw, _ggb):
    n_rest = 13  # non-differentiable inputs after x, weight, bias
    if ctx.grad_in_forward:
        if ctx.consumed:
            raise RuntimeError(
                "flce: the gradients computed in the forward (strategy grad_in_forward) were "
                "already used by a previous backward; to backpropagate twice use "
                "strategy='recompute'"
            )
        ctx.consumed = True
        if grad_loss is None:  # the loss does not reach the output: zero gradients
            ctx.eager_grads = None
            return (None, None, None, *([None] * n_rest))
        if ctx.eager_grads is not None:
            gx, gw, gb = ctx.eager_grads
            ctx.eager_grads = None
        else:
            gx, gw, gb = ctx.saved_tensors
        scale = grad_loss.to(torch.float32)
        out = [
            _rescale(t, scale) if computed else None
            for t, computed in zip((gx, gw, gb), ctx.computed)
        ]
        return (*out, *([None] * n_rest))

    x, weight, bias, target, class_weight, lse = ctx.saved_tensors
    want_x, want_w, want_b = ctx.needs_input_grad[:3]
    want_b = want_b and ctx.has_bias
    if not (want_x or want_w or want_b):
        return (None, None, None, *([None] * n_rest))
    grad_lse = None if grad_lse is None else grad_lse.to(torch.float32)
    if grad_loss is None:
        grad_loss = lse.new_zeros(lse.shape if ctx.options[1] == REDUCTION_NONE else ())
    dx, dw, db = torch.ops.flce.lce_backward(
        x,
        weight,
        bias,
        target,
        class_weight,
        lse,
        grad_loss.to(torch.float32),
        grad_lse,
        *ctx.options,
        ctx.plan,
        want_x,
        want_w,
        want_b,
    )
    return (
        dx if want_x else None,
        dw if want_w else None,
        db if want_b else None,
        *([None] * n_rest),
    )


@torch.library.register_fake("flce::scale_")
def _scale_fake(grad, scale):
    return None


torch.library.register_autograd(
    "flce::lce_forward", _lce_backward, setup_context=_lce_setup_context
)


# ------------------------------------------------------------------------------------------
# Autograd of ce_forward (cross-entropy on given logits): the backward recomputes the softmax
# from the saved logits.


def _ce_setup_context(ctx, inputs, output):
    (
        logits,
        target,
        class_weight,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        _compute_metrics,
    ) = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale)
    ctx.save_for_backward(logits, target, class_weight)


def _ce_backward(ctx, grad_loss, grad_lse, _grad_metrics):
    logits, target, class_weight = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 10
    if grad_loss is None:
        grad_loss = logits.new_zeros(
            (logits.shape[0],) if ctx.options[1] == REDUCTION_NONE else (), dtype=torch.float32
        )
    grad_lse = None if grad_lse is None else grad_lse.to(torch.float32)
    grad = torch.ops.flce.ce_backward(
        logits, target, class_weight, grad_loss.to(torch.float32), grad_lse, *ctx.options
    )
    return (grad, *([None] * 9))


torch.library.register_autograd("flce::ce_forward", _ce_backward, setup_context=_ce_setup_context)


class InplaceCrossEntropy(torch.autograd.Function):
    """Cross-entropy whose forward overwrites the logits with their gradient (upstream 1).

    The backward only rescales that buffer, so no second [N, V] tensor exists. The op mutates
    its input, which register_autograd does not cover, hence an autograd.Function.
    """

    @staticmethod
    def forward(ctx, logits, target, class_weight, options, compute_metrics):
        buffer = logits.detach()  # shares storage and version counter with logits
        loss, lse, metrics = torch.ops.flce.ce_forward_inplace(
            buffer, target, class_weight, *options, compute_metrics
        )
        ctx.mark_non_differentiable(lse, metrics)
        ctx.per_token = options[1] == REDUCTION_NONE
        ctx.consumed = False
        ctx.save_for_backward(buffer)
        return loss, lse, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_metrics):
        if ctx.consumed:
            raise RuntimeError(
                "flce: cross_entropy(inplace_backward=True) can be backpropagated "
                "only once; use inplace_backward=False to backpropagate twice"
            )
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        scale = grad_loss.to(torch.float32)
        grad = _rescale(grad, scale.unsqueeze(-1) if ctx.per_token else scale)
        return grad, None, None, None, None
