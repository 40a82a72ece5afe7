"""Hugging Face transformers integration: train causal LMs with flce's fused loss.

    from flce.integrations.transformers import patch
    model = AutoModelForCausalLM.from_pretrained(...)      # or a PeftModel wrapping one
    patch(model, z_loss=1e-4)
    out = model(input_ids=ids, labels=labels)              # out.loss fused, out.logits is None

With labels in training mode the [batch, seq, vocab] logits are never materialized and the output
carries logits=None; without labels (generation) or in eval mode the model behaves exactly as
before. Works with the HF Trainer (num_items_in_batch, gradient accumulation), tied embeddings,
PEFT (lm_head in modules_to_save, or a LoRA adapter on lm_head).

How it works. No model forward is copied, so new transformers versions keep working:
1. The model's forward is wrapped (an instance attribute, so PEFT's calls reach it). A labelled
   forward in training mode runs the original forward with a context flag set.
2. While the flag is set, the output head (model.get_output_embeddings(), the lm_head) returns a
   DeferredLogits holding its input hidden states and its weights instead of the logits. The
   scalar multiplications and divisions and the tanh a family applies to its logits afterwards
   (Gemma2/3 final_logit_softcapping, Cohere logit_scale, Granite logits_scaling) are recorded on
   it and become flce's logit_scale and softcap. Any other operation on it raises an error naming
   the model type, rather than silently computing another loss than the model's.
3. The model's loss_function (transformers >= 4.46) is replaced by one that calls
   flce.linear_cross_entropy(hidden, lm_head.weight, labels, shift=1, ...) when it receives a
   DeferredLogits, with the semantics of transformers' ForCausalLMLoss: ignore index -100, mean
   over valid tokens, or sum / num_items_in_batch when num_items_in_batch is passed, and
   pre-shifted `shift_labels` when given. Older versions compute the loss inline in each forward,
   so there the forward runs without labels and the wrapper computes the loss (and adds a MoE
   router aux loss) itself.
4. The output is returned with logits=None.

Limits: DeepSpeed ZeRO-3 and FSDP that shard lm_head on its own are not supported (the fused loss
reads lm_head.weight after the head's own call has returned); a LoRA adapter on lm_head costs one
[V, D + r] copy of the head weight per step (concatenation, see _HeadOperands).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import types
from typing import Any

import torch
from torch import nn

__all__ = ["SUPPORTED_MODEL_TYPES", "DeferredLogits", "is_patched", "patch", "unpatch"]

# Model types whose forwards were checked against transformers' code and are tested. Others can
# be patched with allow_untested=True: DeferredLogits still refuses any logits transform it does
# not understand, so an untested family either gives the right loss or a clear error.
SUPPORTED_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3", "gemma3_text", "phi3", "olmo2", "cohere", "granite",
})

# Options forwarded to flce.linear_cross_entropy. The others are decided by the model: softcap and
# logit_scale by its forward, shift by the causal-LM convention, reduction by num_items_in_batch.
_LOSS_OPTIONS = ("ignore_index", "label_smoothing", "z_loss", "class_weight", "memory_budget",
                 "strategy")
_MODEL_DECIDED = {
    "softcap": "it is taken from the model's own forward (e.g. final_logit_softcapping)",
    "logit_scale": "it is taken from the model's own forward (e.g. logit_scale, logits_scaling)",
    "shift": "causal LMs always predict the next token (shift=1, or shift_labels when passed)",
    "reduction": "it follows transformers: mean, or sum / num_items_in_batch when passed",
}

_ACTIVE: contextvars.ContextVar[_PatchState | None] = contextvars.ContextVar(
    "flce_active_patch", default=None)
_NO_ATTRIBUTE = object()


@dataclasses.dataclass(frozen=True)
class _PatchState:
    model_type: str
    options: dict  # the _LOSS_OPTIONS the caller gave
    fuse_in_eval: bool
    labels_position: int | None  # index of `labels` among the forward's positional parameters
    prev_forward: Any  # the instance-level forward replaced by patch(), or None (the class's)
    prev_loss_function: Any  # the instance's _loss_function before patch(), or _NO_ATTRIBUTE
    loss_in_forward: bool  # True: transformers < 4.46, the wrapper computes the loss itself


# ----------------------------------------------------------------------------------------------
# The stand-in for the logits


def _as_scalar(value, model_type: str, what: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if torch.is_tensor(value) and value.numel() == 1 and not value.requires_grad:
        # A model keeping its logit scale in a tensor: one host read per step, the only one.
        return float(value)
    raise TypeError(
        f"flce: the forward of model type {model_type!r} applies {what} with a non-scalar operand "
        f"({type(value).__name__}{list(value.shape) if torch.is_tensor(value) else ''}) to the "
        "logits; flce can only fold scalar factors into the fused loss")


class DeferredLogits:
    """What the output head returns during a fused forward, in place of the [*, V] logits.

    It holds the head's input and weights and the elementwise transforms applied to its output,
    as z = post * tanh(pre * r) (after a tanh) or z = pre * r (before), with r = x W^T + b.
    Only those transforms are accepted; anything else raises, naming the model type.
    """

    __slots__ = (
        "_post",
        "_pre",
        "_tanh",
        "device",
        "dtype",
        "head",
        "hidden",
        "model_type",
        "shape",
    )

    def __init__(self, hidden: torch.Tensor, head: _HeadOperands, model_type: str):
        self.hidden = hidden
        self.head = head
        self.model_type = model_type
        self.shape = torch.Size((*hidden.shape[:-1], head.vocab_size))
        self.dtype = head.compute_dtype(hidden)
        self.device = hidden.device
        self._pre = 1.0
        self._tanh = False
        self._post = 1.0

    def _copy(self, **changes) -> DeferredLogits:
        out = object.__new__(DeferredLogits)
        for name in DeferredLogits.__slots__:
            object.__setattr__(out, name, changes.get(name, getattr(self, name)))
        return out

    def _scaled(self, factor: float) -> DeferredLogits:
        if self._tanh:
            return self._copy(_post=self._post * factor)
        return self._copy(_pre=self._pre * factor)

    def _tanh_applied(self) -> DeferredLogits:
        if self._tanh:
            raise self._unsupported("a second tanh")
        return self._copy(_tanh=True, _post=1.0)

    def loss_transform(self) -> tuple[float, float | None]:
        """(logit_scale, softcap) for flce, whose z = softcap * tanh(logit_scale * r / softcap)."""
        if not self._tanh:
            return self._pre, None
        if not self._post > 0:
            raise self._unsupported(f"tanh followed by a non-positive factor {self._post}")
        return self._pre * self._post, self._post

    def _unsupported(self, what: str) -> Exception:
        return TypeError(
            f"flce: the forward of model type {self.model_type!r} applies {what} to the logits of "
            "its output head, which flce cannot fold into the fused loss (it folds multiplication "
            "and division by scalars and a tanh softcap). Call "
            "flce.integrations.transformers.unpatch(model) to train this model unfused.")

    # Python operators and Tensor methods a forward may apply.
    def __mul__(self, other):
        return self._scaled(_as_scalar(other, self.model_type, "a multiplication"))

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self._scaled(1.0 / _as_scalar(other, self.model_type, "a division"))

    def __neg__(self):
        return self._scaled(-1.0)

    def mul(self, other):
        return self * other

    def div(self, other):
        return self / other

    def tanh(self):
        return self._tanh_applied()

    def float(self):
        # The fused loss computes in float32 whatever the head's dtype: an upcast is free.
        return self._copy(dtype=torch.float32)

    def to(self, *args, **kwargs):
        target = [a for a in (*args, *kwargs.values()) if a is not None]
        for a in target:
            if isinstance(a, torch.dtype):
                continue
            if isinstance(a, (torch.device, str)) and torch.device(a) == self.device:
                continue
            raise self._unsupported(f".to({a!r})")
        dtypes = [a for a in target if isinstance(a, torch.dtype)]
        return self._copy(dtype=dtypes[-1]) if dtypes else self

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        scale, cap = self.loss_transform() if (not self._tanh or self._post > 0) else (None, None)
        return (f"DeferredLogits(shape={list(self.shape)}, dtype={self.dtype}, "
                f"logit_scale={scale}, softcap={cap})")

    def __getattr__(self, name: str):
        # AttributeError keeps hasattr() probes working; its message says what to do.
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(str(self._unsupported(f"the attribute or method `{name}`")))

    def __getitem__(self, index):
        raise self._unsupported("indexing")

    def __iter__(self):
        raise self._unsupported("iteration")

    # torch functions (torch.tanh(logits), tensor * logits, ...).
    @classmethod
    def __torch_function__(cls, func, _types, args=(), kwargs=None):
        kwargs = kwargs or {}
        marker = next((a for a in args if isinstance(a, DeferredLogits)), None)
        if marker is None:
            marker = next(a for a in kwargs.values() if isinstance(a, DeferredLogits))
        name = getattr(func, "__name__", repr(func))
        if not kwargs and len(args) == 2:
            other = args[1] if args[0] is marker else args[0]
            if func in _MUL_FUNCS:
                return marker._scaled(_as_scalar(other, marker.model_type, name))
            if func in _DIV_FUNCS and args[0] is marker:
                return marker._scaled(1.0 / _as_scalar(other, marker.model_type, name))
        if func in _TANH_FUNCS and not kwargs and len(args) == 1:
            return marker._tanh_applied()
        raise marker._unsupported(f"`{name}`")


_MUL_FUNCS = {torch.mul, torch.multiply, torch.Tensor.mul, torch.Tensor.__mul__,
              torch.Tensor.__rmul__}
_DIV_FUNCS = {torch.div, torch.divide, torch.true_divide, torch.Tensor.div,
              torch.Tensor.__truediv__}
_TANH_FUNCS = {torch.tanh, torch.Tensor.tanh, torch.nn.functional.tanh}


# ----------------------------------------------------------------------------------------------
# The output head: plain nn.Linear, or PEFT's LoRA layer / modules_to_save wrapper around one


def _is_lora_layer(module: nn.Module) -> bool:
    return all(n in module.__dict__.get("_modules", {}) for n in ("base_layer", "lora_A", "lora_B"))


def _is_modules_to_save(module: nn.Module) -> bool:
    return all(n in module.__dict__.get("_modules", {})
               for n in ("original_module", "modules_to_save"))


def _check_linear(module: nn.Module, model_type: str) -> None:
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        raise TypeError(
            f"flce: the output head of model type {model_type!r} is a "
            f"{type(module).__module__}.{type(module).__name__}; flce fuses an nn.Linear head "
            "(optionally with a PEFT LoRA adapter or in modules_to_save), not quantized or custom "
            "heads")


@dataclasses.dataclass
class _HeadOperands:
    """The head's weights when it was called, LoRA terms included.

    A LoRA head computes z = x W^T + b + sum_k s_k (drop_k(x) A_k^T) B_k^T, which is one linear
    map of the concatenated input [x, s_1 drop_1(x) A_1^T, ...] with the weight [W, B_1, ...]
    (concatenated along the hidden dimension): the fused op takes it as is, and autograd carries
    the gradients back through the concatenation to x, A_k and B_k.
    """

    weight: torch.Tensor  # [V, D]
    bias: torch.Tensor | None  # [V]
    lora: list  # (lora_A module, lora_B module, scaling, dropout module) per active adapter

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.weight.dtype

    def operands(self, x: torch.Tensor):
        if not self.lora:
            return x, self.weight, self.bias
        dtype = self.compute_dtype(x)
        xs, ws, bias = [x.to(dtype)], [self.weight.to(dtype)], self.bias
        for lora_a, lora_b, scaling, dropout in self.lora:
            xa = lora_a(dropout(x.to(lora_a.weight.dtype))) * scaling
            xs.append(xa.to(dtype))
            ws.append(lora_b.weight.to(dtype))
            if lora_b.bias is not None:
                extra = lora_b.bias * scaling
                bias = extra if bias is None else bias + extra
        if bias is not None:
            bias = bias.to(dtype)
        return torch.cat(xs, dim=-1), torch.cat(ws, dim=1), bias


def _head_operands(module: nn.Module, model_type: str) -> _HeadOperands:
    if not _is_lora_layer(module):
        _check_linear(module, model_type)
        return _HeadOperands(module.weight, module.bias, [])
    base = module.get_base_layer()
    _check_linear(base, model_type)
    head = _HeadOperands(base.weight, base.bias, [])
    if module.disable_adapters:
        if module.merged:
            module.unmerge()  # as PEFT's own forward does
        return head
    if module.merged:
        return head
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name):
            raise TypeError(
                f"flce: the LoRA adapter {name!r} on the output head of model type "
                f"{model_type!r} is a variant (DoRA or similar); flce fuses plain LoRA only")
        head.lora.append((module.lora_A[name], module.lora_B[name], module.scaling[name],
                          module.lora_dropout[name]))
    return head


def _head_forward(self: nn.Module, x, *args, **kwargs):
    state = _ACTIVE.get()
    if state is None or args or kwargs:
        previous = self.__dict__["_flce_head"][0]
        if previous is not None:
            return previous(x, *args, **kwargs)
        return type(self).forward(self, x, *args, **kwargs)
    return DeferredLogits(x, _head_operands(self, state.model_type), state.model_type)


def _intercept_head(module: nn.Module, model_type: str) -> None:
    """Makes the head return a DeferredLogits during a fused forward.

    The head's forward is replaced rather than hooked because a hook cannot skip the matmul. It
    is an instance attribute bound with MethodType, so a deepcopy of the module (PEFT's
    modules_to_save makes one) calls its own copy. A LoRA layer is intercepted as a whole (its
    forward would add a materialized low-rank term); a modules_to_save wrapper is left as it is
    and each module it may call is intercepted.
    """
    if _is_modules_to_save(module):
        _intercept_head(module.original_module, model_type)
        for copy in module.modules_to_save.values():
            _intercept_head(copy, model_type)
        return
    if not _is_lora_layer(module):
        _check_linear(module, model_type)
    if "_flce_head" in module.__dict__:
        return
    module._flce_head = (module.__dict__.get("forward"),)
    module.forward = types.MethodType(_head_forward, module)


def _release_heads(module: nn.Module) -> None:
    for m in module.modules():
        saved = m.__dict__.pop("_flce_head", None)
        if saved is None:
            continue
        if saved[0] is None:
            del m.forward
        else:
            m.forward = saved[0]


# ----------------------------------------------------------------------------------------------
# The loss


def _fused_loss(marker: DeferredLogits, labels, state: _PatchState, num_items_in_batch=None,
                ignore_index=None, shift_labels=None) -> torch.Tensor:
    import flce

    x, weight, bias = marker.head.operands(marker.hidden)
    logit_scale, softcap = marker.loss_transform()
    options = dict(state.options)
    if ignore_index is not None and "ignore_index" not in options:
        options["ignore_index"] = ignore_index
    if shift_labels is not None:
        target, shift = shift_labels, 0
    else:
        if labels is None:
            raise ValueError("labels: expected a tensor of token ids for the fused loss, got None")
        target, shift = labels, 1
    loss = flce.linear_cross_entropy(
        x, weight, target.to(x.device), bias,
        reduction="sum" if num_items_in_batch is not None else "mean",
        softcap=softcap, logit_scale=logit_scale, shift=shift, **options)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _loss_function(original, state: _PatchState, *args, **kwargs):
    """Stands in for model.loss_function: fused on a DeferredLogits, else the original."""
    logits = kwargs["logits"] if "logits" in kwargs else (args[0] if args else None)
    if not isinstance(logits, DeferredLogits):
        return original(*args, **kwargs)
    bound = _CAUSAL_LM_LOSS_SIGNATURE.bind(*args, **kwargs)
    a = bound.arguments
    return _fused_loss(logits, a.get("labels"), state, a.get("num_items_in_batch"),
                       a.get("ignore_index"), a.get("shift_labels"))


def _causal_lm_loss_signature(logits, labels, vocab_size=None, num_items_in_batch=None,
                              ignore_index=None, shift_labels=None, **kwargs):
    """The call signature of transformers' ForCausalLMLoss (only its names are used)."""


_CAUSAL_LM_LOSS_SIGNATURE = inspect.signature(_causal_lm_loss_signature)


# ----------------------------------------------------------------------------------------------
# The model's forward


def _fused_forward(self: nn.Module, args: tuple, kwargs: dict):
    state: _PatchState = self.__dict__["_flce_patch"]
    original = state.prev_forward or functools.partial(type(self).forward, self)
    position = state.labels_position
    by_position = position is not None and len(args) > position
    labels = args[position] if by_position else kwargs.get("labels")
    if labels is None or not (self.training or state.fuse_in_eval):
        return original(*args, **kwargs)

    _intercept_head(_output_head(self, state.model_type), state.model_type)
    loss_kwargs = {}
    if state.loss_in_forward:
        # Older forwards compute the loss inline from the logits: run them without labels.
        if by_position:
            args = (*args[:position], None, *args[position + 1:])
        else:
            kwargs = {**kwargs, "labels": None}
        for name in ("num_items_in_batch", "ignore_index", "shift_labels"):
            if name in kwargs:
                loss_kwargs[name] = kwargs.pop(name)

    token = _ACTIVE.set(state)
    try:
        out = original(*args, **kwargs)
    finally:
        _ACTIVE.reset(token)

    as_tuple = isinstance(out, tuple)
    values = list(out) if as_tuple else list(out.values())
    markers = [v for v in values if isinstance(v, DeferredLogits)]
    if not markers:
        raise RuntimeError(
            f"flce: the forward of model type {state.model_type!r} did not return the output of "
            "its output head (model.get_output_embeddings()) as logits, so the loss was not "
            "fused; this model type is not supported by flce.integrations.transformers")
    marker = markers[0]
    loss = None
    if state.loss_in_forward:
        loss = _fused_loss(marker, labels, state, **loss_kwargs)
        aux = None if as_tuple else out.get("aux_loss")
        coefficient = getattr(self, "router_aux_loss_coef", None)
        if aux is not None and coefficient:
            loss = loss + coefficient * aux.to(loss.device)
    if as_tuple:
        rest = tuple(v for v in out if v is not marker)
        return rest if loss is None else (loss, *rest)
    fields = {k: v for k, v in out.items() if v is not marker}
    if loss is not None:
        fields["loss"] = loss
    return type(out)(**fields)


def _make_forward(signature: inspect.Signature, doc: str | None):
    def forward(self, *args, **kwargs):
        return _fused_forward(self, args, kwargs)

    # The Trainer reads the forward's signature to choose dataset columns and to decide whether
    # to pass num_items_in_batch: keep the original one.
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(
        parameters=[self_param, *signature.parameters.values()])
    forward.__doc__ = doc
    return forward


# ----------------------------------------------------------------------------------------------
# Public API


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model, or the model itself."""
    if hasattr(model, "peft_config") and callable(getattr(type(model), "get_base_model", None)):
        return model.get_base_model()
    return model


def _output_head(model: nn.Module, model_type: str) -> nn.Module:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        raise ValueError(
            f"model: {type(model).__name__} (model type {model_type!r}) has no output head "
            "(get_output_embeddings() returned None); flce patches causal language models")
    return head


def _check_config(config, model_type: str) -> None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    tp = getattr(text, "pretraining_tp", 1) or 1
    if tp > 1:
        raise ValueError(
            f"model.config.pretraining_tp: expected 1, got {tp} (model type {model_type!r}); the "
            "forward then splits lm_head into slices that flce cannot fuse; set "
            "config.pretraining_tp = 1 (the same function, computed in one piece)")


def _check_options(options: dict) -> dict:
    for name in options:
        if name in _MODEL_DECIDED:
            raise TypeError(f"patch(): option {name!r} cannot be set: {_MODEL_DECIDED[name]}")
        if name not in _LOSS_OPTIONS:
            raise TypeError(f"patch(): unknown option {name!r}; expected one of "
                            f"{', '.join(_LOSS_OPTIONS)}, fuse_in_eval, allow_untested")
    return dict(options)


def patch(model: nn.Module, *, fuse_in_eval: bool = False, allow_untested: bool = False,
          **options) -> nn.Module:
    """Makes a transformers causal LM compute its training loss with flce; returns the model.

    model: a transformers *ForCausalLM (or a multimodal *ForConditionalGeneration with an
        lm_head), or a PEFT model wrapping one. Patching again replaces the options.
    fuse_in_eval: also fuse labelled forwards in eval mode (their logits are then None); by
        default eval keeps transformers' behaviour so that evaluation can read the logits.
    allow_untested: patch a model type outside SUPPORTED_MODEL_TYPES.
    options: ignore_index (default -100), label_smoothing, z_loss, class_weight, memory_budget,
        strategy, as in flce.linear_cross_entropy.
    """
    target = _causal_lm(model)
    config = getattr(target, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(f"model: expected a transformers model (with .config.model_type), got "
                        f"{type(model).__name__}")
    if model_type not in SUPPORTED_MODEL_TYPES and not allow_untested:
        raise ValueError(
            f"model: model type {model_type!r} ({type(target).__name__}) is not supported by "
            f"flce.integrations.transformers; supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            ". Pass allow_untested=True to try it (unknown logits transforms still raise).")
    _check_config(config, model_type)
    options = _check_options(options)
    if is_patched(target):
        unpatch(target)

    forward = target.forward
    signature = inspect.signature(forward)
    if "labels" not in signature.parameters:
        raise ValueError(f"model: {type(target).__name__}.forward takes no `labels`; flce patches "
                         "causal language models")
    positional = [n for n, p in signature.parameters.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    loss_in_forward = not hasattr(type(target), "loss_function")
    prev_loss = target.__dict__.get("_loss_function", _NO_ATTRIBUTE)
    if prev_loss is not _NO_ATTRIBUTE:
        raise ValueError(
            f"model.loss_function: was replaced by {prev_loss!r}; flce would bypass it. Restore "
            "the default loss function before patching")
    _intercept_head(_output_head(target, model_type), model_type)

    state = _PatchState(
        model_type=model_type, options=options, fuse_in_eval=fuse_in_eval,
        labels_position=positional.index("labels") if "labels" in positional else None,
        prev_forward=target.__dict__.get("forward"), prev_loss_function=prev_loss,
        loss_in_forward=loss_in_forward)
    target._flce_patch = state
    target.forward = types.MethodType(_make_forward(signature, forward.__doc__), target)
    if not loss_in_forward:
        target.loss_function = functools.partial(_loss_function, target.loss_function, state)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undoes patch(); a model that is not patched is returned unchanged."""
    target = _causal_lm(model)
    state = target.__dict__.pop("_flce_patch", None)
    if state is None:
        return model
    if state.prev_forward is None:
        del target.forward
    else:
        target.forward = state.prev_forward
    if not state.loss_in_forward:
        if state.prev_loss_function is _NO_ATTRIBUTE:
            target.__dict__.pop("_loss_function", None)
        else:
            target._loss_function = state.prev_loss_function
    _release_heads(target)
    return model


def is_patched(model: nn.Module) -> bool:
    return "_flce_patch" in _causal_lm(model).__dict__
