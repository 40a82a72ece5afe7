"""The functional API: fused linear cross-entropy, cross-entropy on logits, and the planner.

Semantics (include/flce/flce.h): with r = x W^T + b, z = logit_scale * r, optionally
z = softcap * tanh(z / softcap), the loss is torch.nn.functional.cross_entropy(z, target,
weight=class_weight, ignore_index, reduction, label_smoothing) plus z_loss * lse^2 per valid
token (divided like the loss under reduction="mean"). Softmax statistics and accumulation are
float32 whatever the input dtype; the loss, lse and metrics are float32 tensors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from . import _ops

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LABEL_DTYPES = (torch.int64, torch.int32)


def default_memory_budget(num_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """The working memory a call gets when memory_budget is None, in bytes:
    min(N * V * 2, V * D * 4) + 512 MiB, what any method that computes each logit once must hold
    (the 16-bit logits of all tokens, or an fp32 dW accumulator) plus 512 MiB."""
    return int(torch.ops.flce.default_memory_budget(num_tokens, vocab_size, hidden_size))


def cuda_available() -> bool:
    """True when the CUDA backend was compiled into flce._C."""
    return bool(torch.ops.flce.cuda_available())


# ------------------------------------------------------------------------------------------
# Argument checks. Every message names the argument, what it got and what was expected.


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _check_device(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{name}: expected device {ref.device} ({ref_name}.device), got {t.device}"
        )


def _float_option(name: str, value, *, low=None, high=None, allow_low=True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not -math.inf < value < math.inf:  # also false for NaN
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if low is not None and (value < low or (value == low and not allow_low)):
        bound = ">=" if allow_low else ">"
        raise ValueError(f"{name}: expected a number {bound} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: expected a number <= {high}, got {value}")
    return value


def _int_option(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    return int(value)


def _reduction_code(reduction) -> int:
    if reduction not in _ops.REDUCTIONS:
        raise ValueError(f"reduction: expected one of 'mean', 'sum', 'none', got {reduction!r}")
    return _ops.REDUCTIONS[reduction]


def _strategy_code(strategy) -> int:
    if strategy not in _ops.STRATEGIES:
        raise ValueError(
            f"strategy: expected one of 'auto', 'grad_in_forward', 'recompute', got {strategy!r}"
        )
    return _ops.STRATEGIES[strategy]


def _budget(memory_budget) -> int:
    """The budget for the planner: 0 asks for default_memory_budget of the call's sizes."""
    if memory_budget is None:
        return 0
    budget = _int_option("memory_budget", memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget: expected a positive number of bytes, got {budget}")
    return budget


def _shift_amount(shift) -> int:
    if isinstance(shift, bool):
        return int(shift)
    if not isinstance(shift, numbers.Integral):
        raise TypeError(f"shift: expected a bool or a non-negative int, got {type(shift).__name__}")
    if shift < 0:
        raise ValueError(f"shift: expected a bool or a non-negative int, got {shift}")
    return int(shift)


def _loss_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale):
    """Checked options in the order the ops take them (softcap 0 disables)."""
    ignore_index = _int_option("ignore_index", ignore_index)
    code = _reduction_code(reduction)
    label_smoothing = _float_option("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_loss = _float_option("z_loss", z_loss, low=0.0)
    softcap = (
        0.0 if softcap is None else _float_option("softcap", softcap, low=0.0, allow_low=False)
    )
    logit_scale = _float_option("logit_scale", logit_scale)
    return (ignore_index, code, label_smoothing, z_loss, softcap, logit_scale)


def _check_target(target, expected_shape, ref: torch.Tensor, ref_name: str, how: str) -> None:
    _check_tensor("target", target)
    if target.dtype not in _LABEL_DTYPES:
        raise TypeError(f"target: expected dtype int64 or int32, got {target.dtype}")
    if tuple(target.shape) != tuple(expected_shape):
        raise ValueError(
            f"target: expected shape {list(expected_shape)} ({how}), got {_shape(target)}"
        )
    _check_device("target", target, ref, ref_name)


def _check_class_weight(class_weight, vocab_size: int, ref: torch.Tensor, ref_name: str):
    if class_weight is None:
        return None
    _check_tensor("class_weight", class_weight)
    if not class_weight.is_floating_point():
        raise TypeError(f"class_weight: expected a floating-point tensor, got {class_weight.dtype}")
    if tuple(class_weight.shape) != (vocab_size,):
        raise ValueError(
            f"class_weight: expected shape [{vocab_size}] (one weight per class), got "
            f"{_shape(class_weight)}"
        )
    _check_device("class_weight", class_weight, ref, ref_name)
    return class_weight.to(torch.float32).contiguous()


def _compute_dtype(name: str, t: torch.Tensor) -> torch.Tensor:
    # float64 is accepted for testing and computed in float32 (the cast is differentiable, so
    # gradients come back as float64).
    if t.dtype == torch.float64:
        return t.to(torch.float32)
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected dtype float32, float16, bfloat16 (or float64, computed in float32), "
            f"got {t.dtype}"
        )
    return t


def _labels_checkable(t: torch.Tensor) -> bool:
    """Whether an eager label check may synchronize: CUDA only (the CPU core reports bad
    labels itself), never while compiling or capturing a CUDA graph."""
    if t.device.type != "cuda" or torch.compiler.is_compiling():
        return False
    return not torch.cuda.is_current_stream_capturing()


def _start_label_check(
    target: torch.Tensor, vocab_size: int, ignore_index: int
) -> Callable[[], None]:
    """Queues the eager label check and returns the function that waits for its answer and
    raises ValueError for a label out of range. It waits on an event recorded right after the
    check's kernels, so a caller that queues the loss kernels before calling it keeps the GPU
    busy while the host waits (a check that synchronizes first leaves the GPU idle until the
    host has planned and queued the call: 0.5 ms per call at the benchmark shapes)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab_size))
    any_bad = torch.empty((), dtype=torch.bool, pin_memory=True)
    any_bad.copy_(bad.any(), non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def finish() -> None:
        done.synchronize()
        if bool(any_bad):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"target: label {int(target[first])} at flat position {first} is out of range "
                f"[0, {vocab_size}) and is not ignore_index ({ignore_index})"
            )

    return finish


def shift_target(target: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
    """Labels for next-token prediction along the last dim of target: position t gets the label
    of t + shift and the last `shift` positions get ignore_index (a new [*, T] tensor; x is never
    sliced or copied)."""
    if shift == 0:
        return target
    t = target.shape[-1]
    k = min(shift, t)
    tail = target.new_full((*target.shape[:-1], k), ignore_index)
    return torch.cat((target[..., k:], tail), dim=-1)


# ------------------------------------------------------------------------------------------
# Fused linear cross-entropy.


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    class_weight: torch.Tensor | None = None,
    shift: bool | int = False,
    return_lse: bool = False,
    return_metrics: bool = False,
    memory_budget: int | None = None,
    strategy: str = "auto",
    validate_labels: bool = True,
):
    """Cross-entropy of the logits x @ weight.T + bias without materializing them.

    Args:
        x: [*, D] hidden states (float32, float16, bfloat16; float64 is computed in float32).
        weight: [V, D] classifier, same dtype as x. bias: [V] or None.
        target: [*] int64 or int32 labels, x.shape[:-1]; ignore_index marks ignored positions.
        shift: k > 0 (True = 1): position t predicts target t + k along x's second-to-last
            (sequence) dim; done by shifting labels, x is never copied.
        return_lse: also return lse (float32, target's shape); gradients flow through it
            (requesting it with gradients selects the recompute strategy).
        return_metrics: also return a dict of float32 0-d tensors: max_logit, logit_norm,
            entropy, lse_squared, accuracy, valid_tokens (over non-ignored positions).
        memory_budget: bytes of working memory (None: default_memory_budget(N, V, D)).
        strategy: "auto", "grad_in_forward" (gradients in the forward, backward rescales) or
            "recompute" (forward keeps the LSE, backward recomputes the logits).
        validate_labels: on CUDA, check labels eagerly (one host synchronization) and raise
            ValueError; skipped while compiling or capturing a CUDA graph, where an out-of-range
            label makes the loss NaN instead. The CPU backend always reports them.

    Returns:
        loss (float32; 0-d, or target's shape for reduction="none"), then lse and/or metrics if
        requested, as a tuple.
    """
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    if x.dim() < 1:
        raise ValueError("x: expected a tensor of shape [*, D], got a 0-d tensor")
    hidden = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != hidden:
        raise ValueError(
            f"weight: expected shape [V, {hidden}] (D = x.shape[-1]), got {_shape(weight)}"
        )
    vocab = weight.shape[0]
    if vocab < 1:
        raise ValueError(f"weight: expected at least one class (V >= 1), got {_shape(weight)}")
    _check_device("weight", weight, x, "x")
    if bias is not None:
        _check_tensor("bias", bias)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(
                f"bias: expected shape [{vocab}] (V = weight.shape[0]), got {_shape(bias)}"
            )
        _check_device("bias", bias, x, "x")
    _check_target(target, x.shape[:-1], x, "x", "x.shape[:-1]")
    class_weight = _check_class_weight(class_weight, vocab, x, "x")
    options = _loss_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale)
    k = _shift_amount(shift)
    if k and x.dim() < 2:
        raise ValueError(f"shift: needs x with a sequence dim [..., T, D], got shape {_shape(x)}")
    strategy_code = _strategy_code(strategy)
    budget = _budget(memory_budget)

    # Like nn.Linear under autocast: the matmul inputs take the autocast dtype.
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    x = _compute_dtype("x", x)
    weight = _compute_dtype("weight", weight)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected dtype {x.dtype} (x.dtype), got {weight.dtype}")
    if bias is not None:
        bias = _compute_dtype("bias", bias)
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: expected dtype {x.dtype} (x.dtype), got {bias.dtype}")

    target_shape = target.shape
    if k:
        target = shift_target(target, k, options[0])
    x2 = x.reshape(-1, hidden)
    labels = target.reshape(-1)
    # Answered after the loss kernels are queued: they read nothing out of bounds for an
    # out-of-range label (its row's loss becomes NaN), and the error discards their outputs.
    finish_label_check = None
    if validate_labels and _labels_checkable(labels):
        finish_label_check = _start_label_check(labels, vocab, options[0])

    grad_on = torch.is_grad_enabled()
    need_x = grad_on and x.requires_grad
    need_w = grad_on and weight.requires_grad
    need_b = grad_on and bias is not None and bias.requires_grad
    need_lse = return_lse and (need_x or need_w or need_b)
    # The plan (strategy, chunks) depends on the sizes, so under torch.compile they are
    # specialized (__index__ guards on the value) rather than kept symbolic.
    plan = _ops.compute_plan(
        x2.shape[0].__index__(),
        vocab.__index__(),
        hidden.__index__(),
        x.dtype,
        x.device,
        options[1],
        bias is not None,
        need_x,
        need_w,
        need_b,
        need_lse,
        budget,
        strategy_code,
        options[4] > 0.0,
        class_weight is not None and options[2] > 0.0,
        bool(return_metrics),
    )
    in_forward = plan[0] == _ops.GRAD_IN_FORWARD
    loss, lse, metrics, _, _, _ = torch.ops.flce.lce_forward(
        x2,
        weight,
        bias,
        labels,
        class_weight,
        *options,
        plan,
        in_forward and need_x,
        in_forward and need_w,
        in_forward and need_b,
        bool(return_metrics),
    )
    if finish_label_check is not None:
        finish_label_check()
    if options[1] == _ops.REDUCTION_NONE:
        loss = loss.reshape(target_shape)
    return _pack(loss, lse.reshape(target_shape), metrics, return_lse, return_metrics)


def _pack(loss, lse, metrics, return_lse, return_metrics):
    if not (return_lse or return_metrics):
        return loss
    out = [loss]
    if return_lse:
        out.append(lse)
    if return_metrics:
        out.append({name: metrics[i] for i, name in enumerate(_ops.METRIC_NAMES)})
    return tuple(out)


# ------------------------------------------------------------------------------------------
# Cross-entropy on given logits.


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    inplace_backward: bool = False,
    return_lse: bool = False,
    validate_labels: bool = True,
):
    """Cross-entropy on logits [*, V] (classes last) with an online softmax; same semantics and
    options as linear_cross_entropy (weight = class weights [V]).

    inplace_backward=True overwrites `logits` with their gradient during the forward and the
    backward only rescales it: no second [N, V] buffer. Use it only when nothing else needs the
    logits afterwards (PyTorch raises if a saved copy was overwritten); it applies when the
    logits require grad in eager mode (under torch.compile the regular path is used), a graph
    built this way can be backpropagated once, and the returned lse is then not differentiable.
    """
    _check_tensor("logits", logits)
    if logits.dim() < 1:
        raise ValueError("logits: expected a tensor of shape [*, V], got a 0-d tensor")
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"logits: expected at least one class (V >= 1), got {_shape(logits)}")
    _check_target(target, logits.shape[:-1], logits, "logits", "logits.shape[:-1]")
    class_weight = _check_class_weight(weight, vocab, logits, "logits")
    options = _loss_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale)
    logits = _compute_dtype("logits", logits)
    target_shape = target.shape
    flat = logits.reshape(-1, vocab)
    labels = target.reshape(-1)
    # Answered before the call: with inplace_backward the forward overwrites the logits.
    if validate_labels and _labels_checkable(labels):
        _start_label_check(labels, vocab, options[0])()

    inplace = (
        inplace_backward
        and torch.is_grad_enabled()
        and logits.requires_grad
        and not torch.compiler.is_compiling()
        and flat.stride(-1) == 1
    )
    if inplace:
        loss, lse, _ = _ops.InplaceCrossEntropy.apply(flat, labels, class_weight, options, False)
    else:
        loss, lse, _ = torch.ops.flce.ce_forward(flat, labels, class_weight, *options, False)
    if options[1] == _ops.REDUCTION_NONE:
        loss = loss.reshape(target_shape)
    if return_lse:
        return loss, lse.reshape(target_shape)
    return loss


# ------------------------------------------------------------------------------------------
# The planner, for inspection and tests.


def plan(
    num_tokens: int,
    vocab_size: int,
    hidden_size: int,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    *,
    reduction: str = "mean",
    has_bias: bool = False,
    needs_grad_x: bool = True,
    needs_grad_weight: bool = True,
    needs_grad_bias: bool = False,
    needs_grad_lse: bool = False,
    memory_budget: int | None = None,
    strategy: str = "auto",
    softcap: float | None = None,
    class_weighted_smoothing: bool = False,
    return_metrics: bool = False,
) -> dict:
    """The plan flce would use for a call of this shape: strategy name, chunk sizes, the
    recompute backward's loop order ("vocab_outer" or "token_outer"), the GEMM scratch, the
    forward / backward workspace bytes, whether the backend's fused logits GEMMs may run
    ("auto", "always" or "off") and whether the blocks are compact: forward blocks that hold only
    partial row statistics, or for grad_in_forward the 16-bit terms that become dZ
    (compact_forward_blocks), and recompute backward blocks that hold only dZ
    (compact_backward_blocks), where the fused GEMMs are expected to serve the call, and
    whether grad_in_forward's compact blocks keep row-shifted terms that the dx and dW GEMMs
    read as they are (shifted_terms; see flce::Plan), and the budget it was made for
    (memory_budget). `softcap`, `class_weighted_smoothing` (class weights with label
    smoothing) and `return_metrics` matter because the fused GEMMs do not serve them. Raises
    ValueError when the budget is too small (the message gives the minimum)."""
    for name, value in (
        ("num_tokens", num_tokens),
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
    ):
        _int_option(name, value)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    values = _ops.compute_plan(
        num_tokens,
        vocab_size,
        hidden_size,
        dtype,
        torch.device(device),
        _reduction_code(reduction),
        bool(has_bias),
        bool(needs_grad_x),
        bool(needs_grad_weight),
        bool(needs_grad_bias),
        bool(needs_grad_lse),
        _budget(memory_budget),
        _strategy_code(strategy),
        softcap is not None and _float_option("softcap", softcap, low=0.0) > 0.0,
        bool(class_weighted_smoothing),
        bool(return_metrics),
    )
    out = dict(zip(_ops.PLAN_FIELDS, values))
    out["memory_budget"] = _budget(memory_budget) or default_memory_budget(
        num_tokens, vocab_size, hidden_size
    )
    out["strategy"] = _ops.STRATEGY_NAMES[out["strategy"]]
    out["backward_order"] = _ops.BACKWARD_ORDER_NAMES[out["backward_order"]]
    out["fused_logits"] = _ops.FUSED_LOGITS_NAMES[out["fused_logits"]]
    out["compact_backward_blocks"] = bool(out["compact_backward_blocks"])
    out["compact_forward_blocks"] = bool(out["compact_forward_blocks"])
    out["shifted_terms"] = bool(out["shifted_terms"])
    return out
