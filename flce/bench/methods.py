"""The methods the benchmark compares: the GEMM floor, PyTorch, flce and the anchors.

Every method is built once per (shape, kind) into `fn(x, w, labels) -> loss` (a differentiable
0-d float32 tensor, mean over non-ignored tokens); the floor is timed separately (no loss).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# The lean target is <= 64 MiB beyond the gradients; the workspace budget leaves room for the
# O(N) outputs (lse, per-token loss) the op also keeps.
DEFAULT_RECOMPUTE_BUDGET = 60 << 20


class Unavailable(Exception):
    """The method cannot run here (not installed, needs CUDA): reported as skipped, not failed."""


@dataclasses.dataclass
class Options:
    device: torch.device
    softcap: float | None = None
    recompute_budget: int = DEFAULT_RECOMPUTE_BUDGET


@dataclasses.dataclass
class Method:
    name: str
    description: str
    # build(options, notes) -> loss function; it may add to `notes` what the report should say
    # about this run (which CCE preset stood in for cce_exact). None for the floor.
    build: Callable[[Options, dict], LossFn] | None


def _apply_softcap(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if not softcap else softcap * torch.tanh(z / softcap)


def _torch_ce(x, w, labels, softcap=None):
    return F.cross_entropy(
        _apply_softcap((x @ w.T).float(), softcap), labels, ignore_index=IGNORE_INDEX
    )


def _torch_ce_dynamic(x, w, labels, softcap=None):
    # A separate code object from _torch_ce so that its dynamic-shape compilation (the scaling
    # study) and the static one per benchmark shape never share a dynamo cache entry.
    return F.cross_entropy(
        _apply_softcap((x @ w.T).float(), softcap), labels, ignore_index=IGNORE_INDEX
    )


_compiled: dict[str, Callable] = {}


def compiled_torch_ce(dynamic: bool) -> Callable:
    """torch.compile of the eager baseline; one compiled object per run so caches are reused."""
    key = "dynamic" if dynamic else "static"
    if key not in _compiled:
        import torch._dynamo

        # Each benchmark shape and grad mode is one more static graph; the default limit (8) would
        # silently fall back to eager after a few shapes.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 512)
        fn = _torch_ce_dynamic if dynamic else _torch_ce
        _compiled[key] = torch.compile(fn, dynamic=dynamic)
    return _compiled[key]


def _build_torch(opts: Options, notes: dict) -> LossFn:
    return lambda x, w, y: _torch_ce(x, w, y, opts.softcap)


def _build_torch_compile(opts: Options, notes: dict) -> LossFn:
    fn = compiled_torch_ce(dynamic=False)
    return lambda x, w, y: fn(x, w, y, opts.softcap)


def _flce_builder(strategy: str, budget_attr: str | None):
    def build(opts: Options, notes: dict) -> LossFn:
        import flce

        if not hasattr(flce, "linear_cross_entropy"):
            raise Unavailable("flce.linear_cross_entropy is missing (extension not built?)")
        budget = getattr(opts, budget_attr) if budget_attr else None

        def fn(x, w, y):
            return flce.linear_cross_entropy(
                x,
                w,
                y,
                ignore_index=IGNORE_INDEX,
                reduction="mean",
                softcap=opts.softcap,
                memory_budget=budget,
                strategy=strategy,
            )

        return fn

    return build


def flce_plan(shape, dtype, device, strategy: str, budget: int | None) -> dict | None:
    """flce's chosen plan for the report; None when the package cannot say."""
    try:
        import flce

        plan = flce.plan(
            shape.num_tokens,
            shape.vocab_size,
            shape.hidden_size,
            dtype,
            device,
            memory_budget=budget,
            strategy=strategy,
        )
        return {
            k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
            for k, v in dict(plan).items()
        }
    except Exception:  # noqa: BLE001 - the plan is informative only
        return None


def _require_cuda(opts: Options, what: str) -> None:
    if opts.device.type != "cuda":
        raise Unavailable(f"{what} runs on CUDA only")


def _import_anchor(module: str):
    """The anchor's module. Not installed: the method is skipped. Installed but broken (a
    torch or triton it does not support): the method fails with the import error."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:
            raise RuntimeError(f"import {module}: {e}") from None
        raise Unavailable(f"{module.split('.')[0]} is not installed") from None
    except Exception as e:  # noqa: BLE001 - reported as the method's failure
        raise RuntimeError(f"import {module}: {type(e).__name__}: {e}") from None


def _cce_builder(exact: bool):
    def build(opts: Options, notes: dict) -> LossFn:
        _require_cuda(opts, "Cut Cross-Entropy")
        cce = _import_anchor("cut_cross_entropy")
        lce = cce.linear_cross_entropy
        kwargs = {"ignore_index": IGNORE_INDEX, "softcap": opts.softcap, "reduction": "mean"}
        impls = {m.name.lower() for m in getattr(cce, "LinearCrossEntropyImpl", [])}
        if not exact:
            kwargs["impl"] = "cce"
        elif "cce_exact" in impls:
            kwargs["impl"] = "cce_exact"
        else:
            # Releases before the presets (PyPI 25.1.1) spell "no gradient filtering" as
            # filter_eps=None; they have no fp32 (Kahan) accumulation, so say which one ran.
            if "filter_eps" not in inspect.signature(lce).parameters:
                raise Unavailable(
                    "this cut_cross_entropy has neither impl='cce_exact' nor filter_eps"
                )
            kwargs.update(impl="cce", filter_eps=None)
            notes["variant"] = "impl='cce', filter_eps=None (this release has no cce_exact)"
        return lambda x, w, y: lce(x, w, y, **kwargs)

    return build


def _build_liger(opts: Options, notes: dict) -> LossFn:
    _require_cuda(opts, "Liger-Kernel")
    liger = _import_anchor("liger_kernel.transformers")
    module = liger.LigerFusedLinearCrossEntropyLoss(
        ignore_index=IGNORE_INDEX, reduction="mean", softcap=opts.softcap
    )
    # Liger takes the weight first.
    return lambda x, w, y: module(w, x, y)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("floor", "3 bf16 matmuls into preallocated outputs: Z=xW^T, dx=ZW, dW=Z^T x", None),
        Method(
            "torch_compile",
            "torch.compile(F.cross_entropy((x @ W.T).float(), y))",
            _build_torch_compile,
        ),
        Method("torch", "F.cross_entropy((x @ W.T).float(), y), eager", _build_torch),
        Method(
            "flce_gif",
            "flce, strategy='grad_in_forward', default memory budget",
            _flce_builder("grad_in_forward", None),
        ),
        Method(
            "flce_recompute",
            "flce, strategy='recompute', small memory budget",
            _flce_builder("recompute", "recompute_budget"),
        ),
        Method(
            "flce_auto", "flce, strategy='auto', default memory budget", _flce_builder("auto", None)
        ),
        Method(
            "cce",
            "cut_cross_entropy.linear_cross_entropy(impl='cce') (gradient filtering)",
            _cce_builder(exact=False),
        ),
        Method(
            "cce_exact",
            "cut_cross_entropy.linear_cross_entropy(impl='cce_exact')",
            _cce_builder(exact=True),
        ),
        Method(
            "liger", "liger_kernel LigerFusedLinearCrossEntropyLoss (default options)", _build_liger
        ),
    )
}

FLCE_METHODS = {
    "flce_gif": ("grad_in_forward", None),
    "flce_recompute": ("recompute", "recompute_budget"),
    "flce_auto": ("auto", None),
}
