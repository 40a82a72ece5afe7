"""The raw ops (opcheck), the planner, and the error messages of invalid calls."""

import pytest
import torch
from flce_reference import make_inputs, random_labels

import flce
from flce import _ops


def plan_list(n, v, d, dtype, device, strategy, **kw):
    p = flce.plan(n, v, d, dtype, device, strategy=strategy, **kw)
    p["strategy"] = _ops.STRATEGIES[p["strategy"]]
    p["backward_order"] = _ops.BACKWARD_ORDERS[p["backward_order"]]
    p["fused_logits"] = _ops.FUSED_LOGITS[p["fused_logits"]]
    p["compact_backward_blocks"] = int(p["compact_backward_blocks"])
    p["compact_forward_blocks"] = int(p["compact_forward_blocks"])
    p["shifted_terms"] = int(p["shifted_terms"])
    return [p[k] for k in _ops.PLAN_FIELDS]


OPTIONS = (-100, 0, 0.1, 1e-3, 4.0, 1.1)  # ignore_index, mean, smoothing, z_loss, softcap, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_lce(device, dtype):
    n, v, d = 9, 37, 12
    x, w, b = make_inputs((n,), v, d, device, dtype, bias=True)
    x, w, b = [t.requires_grad_(True) for t in (x, w, b)]
    y = random_labels((n,), v, device)
    cw = torch.rand(v, device=device) + 0.5
    gif = plan_list(n, v, d, dtype, device, "grad_in_forward", has_bias=True, needs_grad_bias=True)
    rec = plan_list(n, v, d, dtype, device, "recompute", has_bias=True, needs_grad_bias=True)
    torch.library.opcheck(
        torch.ops.flce.lce_forward.default, (x, w, b, y, cw, *OPTIONS, gif, True, True, True, True)
    )
    torch.library.opcheck(
        torch.ops.flce.lce_forward.default,
        (x, w, None, y, None, *OPTIONS, rec, False, False, False, False),
    )
    lse = torch.randn(n, device=device)
    torch.library.opcheck(
        torch.ops.flce.lce_backward.default,
        (
            x.detach(),
            w.detach(),
            b.detach(),
            y,
            cw,
            lse,
            torch.tensor(0.7, device=device),
            torch.randn(n, device=device),
            *OPTIONS,
            rec,
            True,
            True,
            True,
        ),
    )
    none = (-100, 2, 0.0, 0.0, 0.0, 1.0)
    torch.library.opcheck(
        torch.ops.flce.lce_backward.default,
        (
            x.detach(),
            w.detach(),
            None,
            y,
            None,
            lse,
            torch.randn(n, device=device),
            None,
            *none,
            rec,
            True,
            False,
            False,
        ),
    )


def test_opcheck_ce(device):
    logits = torch.randn(9, 37, device=device, requires_grad=True)
    y = random_labels((9,), 37, device)
    cw = torch.rand(37, device=device) + 0.5
    torch.library.opcheck(torch.ops.flce.ce_forward.default, (logits, y, cw, *OPTIONS, True))
    torch.library.opcheck(
        torch.ops.flce.ce_backward.default,
        (
            logits.detach(),
            y,
            cw,
            torch.tensor(1.0, device=device),
            torch.randn(9, device=device),
            *OPTIONS,
        ),
    )
    torch.library.opcheck(
        torch.ops.flce.ce_forward_inplace.default,
        (logits.detach().clone(), y, None, *OPTIONS, False),
    )


def test_plan_contents(device):
    p = flce.plan(4096, 128256, 4096, torch.bfloat16, device)
    assert set(p) == set(_ops.PLAN_FIELDS) | {"memory_budget"}
    assert p["strategy"] in ("grad_in_forward", "recompute")
    # The default budget: min(N V 2, V D 4) + 512 MiB (the bf16 logits of all 4096 tokens here).
    assert p["memory_budget"] == flce.default_memory_budget(4096, 128256, 4096)
    assert p["memory_budget"] == 4096 * 128256 * 2 + (512 << 20)
    assert 0 < p["forward_workspace_bytes"] <= p["memory_budget"]
    small = flce.plan(4096, 128256, 4096, torch.bfloat16, device, memory_budget=256 << 20)
    assert max(small["forward_workspace_bytes"], small["backward_workspace_bytes"]) <= 256 << 20
    forced = flce.plan(100, 1000, 64, torch.float32, device, strategy="recompute")
    assert forced["strategy"] == "recompute"
    lse = flce.plan(100, 1000, 64, torch.float32, device, needs_grad_lse=True)
    assert lse["strategy"] == "recompute"
    assert p["fused_logits"] == "auto"  # the backend decides where its fused GEMMs run
    # ... or an fp32 dW accumulator (Qwen-0.5B's head), and 512 MiB for an empty batch.
    assert flce.default_memory_budget(16384, 151936, 896) == 151936 * 896 * 4 + (512 << 20)
    assert flce.default_memory_budget(0, 151936, 896) == 512 << 20
    assert small["memory_budget"] == 256 << 20
    assert isinstance(flce.cuda_available(), bool)


def _fused_gemms_expected(device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def test_plan_compact_backward_blocks(device):
    """Compact (dZ-only) backward blocks where the fused dZ GEMM serves the call: twice the
    vocabulary chunk of an fp32 block in the same budget; never for fp32 inputs, soft-capping or
    class-weighted smoothing, and never on the CPU."""
    budget = 60 << 20
    shape = (8192, 128256, 4096)
    plain = flce.plan(*shape, torch.bfloat16, device, memory_budget=budget, strategy="recompute")
    capped = flce.plan(
        *shape, torch.bfloat16, device, memory_budget=budget, strategy="recompute", softcap=30.0
    )
    weighted = flce.plan(
        *shape,
        torch.bfloat16,
        device,
        memory_budget=budget,
        strategy="recompute",
        class_weighted_smoothing=True,
    )
    fp32 = flce.plan(*shape, torch.float32, device, memory_budget=budget, strategy="recompute")
    assert plain["compact_backward_blocks"] == _fused_gemms_expected(device)
    for other in (capped, weighted, fp32):
        assert other["compact_backward_blocks"] is False
    for p in (plain, capped, weighted):
        assert p["backward_workspace_bytes"] <= budget
    if plain["compact_backward_blocks"]:
        assert plain["backward_vocab_chunk"] >= 2 * capped["backward_vocab_chunk"] - 256
    gif = flce.plan(*shape, torch.bfloat16, device, strategy="grad_in_forward")
    gif_metrics = flce.plan(
        *shape, torch.bfloat16, device, strategy="grad_in_forward", return_metrics=True
    )
    assert gif["compact_backward_blocks"] is False
    # Grad-in-forward blocks of fp16 terms where the fused statistics GEMM serves the forward.
    assert gif["compact_forward_blocks"] == _fused_gemms_expected(device)
    assert gif_metrics["compact_forward_blocks"] is False


def test_plan_compact_forward_blocks(device):
    """Compact forward blocks (partial row statistics only) where the fused statistics GEMM
    serves the forward: not with metrics, soft-capping or fp32 inputs. Without gradients the
    forward's workspace then shrinks from a 512 MiB fp32 block to 1/32 of its bytes a row."""
    shape = (8192, 256000, 2304)
    no_grad = {"needs_grad_x": False, "needs_grad_weight": False}
    plain = flce.plan(*shape, torch.bfloat16, device, **no_grad)
    metrics = flce.plan(*shape, torch.bfloat16, device, return_metrics=True, **no_grad)
    capped = flce.plan(*shape, torch.bfloat16, device, softcap=30.0, **no_grad)
    fp32 = flce.plan(*shape, torch.float32, device, **no_grad)
    expected = _fused_gemms_expected(device)
    assert plain["compact_forward_blocks"] == expected
    for other in (metrics, capped, fp32):
        assert other["compact_forward_blocks"] is False
        assert other["forward_workspace_bytes"] > 384 << 20
    if expected:  # 4096 rows of partial statistics (125 MiB) and the GEMM scratch
        assert plain["forward_workspace_bytes"] < 192 << 20
        lean = flce.plan(
            *shape, torch.bfloat16, device, memory_budget=60 << 20, return_metrics=True
        )
        assert lean["compact_backward_blocks"] and not lean["compact_forward_blocks"]


def test_plan_shifted_terms(device):
    """Row-shifted terms where grad_in_forward keeps compact blocks, whether it accumulates dW in
    fp32 (gemma2 at the default budget: 2048-token chunks) or keeps the terms of every token for
    one dW GEMM (llama3: then the terms are stored in that group, and the chunk's block holds only
    the statistics); not without the fused GEMMs (the CPU, fp32, soft-capping)."""
    shape = (8192, 256000, 2304)
    gif = flce.plan(*shape, torch.bfloat16, device, strategy="grad_in_forward")
    expected = _fused_gemms_expected(device)
    assert gif["shifted_terms"] == expected
    if expected:
        assert gif["dw_group_tokens"] < shape[0]
    n, v, d = 8192, 128256, 4096
    one_group = flce.plan(n, v, d, torch.bfloat16, device, strategy="grad_in_forward")
    assert one_group["shifted_terms"] == expected
    if expected:  # the group's terms, factor * x of every token, and under 256 MiB more
        assert one_group["dw_group_tokens"] == n
        group_bytes = n * v * 2 + n * d * 2
        assert group_bytes < one_group["forward_workspace_bytes"] < group_bytes + (256 << 20)
    for other in (
        flce.plan(*shape, torch.float32, device, strategy="grad_in_forward"),
        flce.plan(*shape, torch.bfloat16, device, strategy="grad_in_forward", softcap=30.0),
    ):
        assert other["shifted_terms"] is False


# -- errors: every message names the argument ------------------------------------------------


@pytest.fixture
def inputs(device):
    x, w, b = make_inputs((4, 7), 30, 8, device, bias=True)
    return x, w, b, random_labels((4, 7), 30, device)


def test_shape_errors(inputs):
    x, w, b, y = inputs
    with pytest.raises(
        ValueError,
        match=r"target: expected shape \[4, 7\] \(x.shape\[:-1\]\), "
        r"got \[4, 8\]",
    ):
        flce.linear_cross_entropy(x, w, torch.zeros(4, 8, dtype=torch.long, device=x.device))
    with pytest.raises(ValueError, match=r"weight: expected shape \[V, 8\]"):
        flce.linear_cross_entropy(x, w[:, :5], y)
    with pytest.raises(ValueError, match="bias: expected shape"):
        flce.linear_cross_entropy(x, w, y, b[:3])
    with pytest.raises(ValueError, match="class_weight: expected shape"):
        flce.linear_cross_entropy(x, w, y, class_weight=torch.ones(5, device=x.device))
    with pytest.raises(ValueError, match="logits: expected a tensor"):
        flce.cross_entropy(torch.tensor(1.0), torch.tensor(0))


def test_dtype_errors(inputs):
    x, w, b, y = inputs
    with pytest.raises(TypeError, match="target: expected dtype int64 or int32"):
        flce.linear_cross_entropy(x, w, y.float())
    with pytest.raises(TypeError, match="weight: expected dtype torch.bfloat16"):
        flce.linear_cross_entropy(x.bfloat16(), w, y)
    with pytest.raises(TypeError, match="bias: expected dtype"):
        flce.linear_cross_entropy(x, w, y, b.half())
    with pytest.raises(TypeError, match="x: expected dtype"):
        flce.linear_cross_entropy(x.int(), w.int(), y)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        flce.linear_cross_entropy(x.tolist(), w, y)


def test_device_errors(inputs):
    x, w, _b, y = inputs
    with pytest.raises(ValueError, match="weight: expected device"):
        flce.linear_cross_entropy(x, w.to("meta"), y)
    with pytest.raises(ValueError, match="target: expected device"):
        flce.linear_cross_entropy(x, w, y.to("meta"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reduction": "avg"}, "reduction: expected one of"),
        ({"strategy": "fast"}, "strategy: expected one of"),
        ({"label_smoothing": 1.5}, "label_smoothing: expected a number <= 1"),
        ({"label_smoothing": float("nan")}, "label_smoothing: expected a finite number"),
        ({"z_loss": -1.0}, "z_loss: expected a number >= 0"),
        ({"z_loss": float("inf")}, "z_loss: expected a finite number"),
        ({"softcap": 0.0}, "softcap: expected a number > 0"),
        ({"logit_scale": float("nan")}, "logit_scale: expected a finite number"),
        ({"shift": -1}, "shift: expected a bool or a non-negative int"),
        ({"memory_budget": 0}, "memory_budget: expected a positive number"),
        ({"memory_budget": 1000}, "memory_budget of .* is too small"),
    ],
)
def test_option_errors(inputs, kwargs, match):
    x, w, _, y = inputs
    with pytest.raises(ValueError, match=match):
        flce.linear_cross_entropy(x, w, y, **kwargs)


def test_type_option_errors(inputs):
    x, w, _, y = inputs
    with pytest.raises(TypeError, match="ignore_index: expected an int"):
        flce.linear_cross_entropy(x, w, y, ignore_index=1.5)
    with pytest.raises(TypeError, match="shift: expected a bool"):
        flce.linear_cross_entropy(x, w, y, shift=1.0)
    with pytest.raises(TypeError, match="memory_budget: expected an int"):
        flce.linear_cross_entropy(x, w, y, memory_budget="4GB")


def test_forced_grad_in_forward_needs_reduction(inputs):
    x, w, _, y = inputs
    with pytest.raises(ValueError, match="grad_in_forward needs reduction mean or sum"):
        flce.linear_cross_entropy(
            x.requires_grad_(True), w, y, reduction="none", strategy="grad_in_forward"
        )


def test_label_out_of_range(inputs):
    x, w, _, y = inputs
    bad = y.clone()
    bad[1, 2] = 30
    with pytest.raises(ValueError, match="out of range"):
        flce.linear_cross_entropy(x, w, bad)
    # With gradients: on CUDA the check is answered after the loss kernels are queued, which
    # must run safely on the bad label and leave nothing behind for the next call.
    xg, wg = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    for strategy in ("grad_in_forward", "recompute"):
        with pytest.raises(ValueError, match="30.* is out of range"):
            flce.linear_cross_entropy(xg, wg, bad, strategy=strategy)
        flce.linear_cross_entropy(xg, wg, y, strategy=strategy).backward()
        assert torch.isfinite(xg.grad).all() and torch.isfinite(wg.grad).all()
        xg.grad = wg.grad = None
    bad[1, 2] = -5
    with pytest.raises(ValueError, match="out of range"):
        flce.cross_entropy(torch.randn(4, 7, 30, device=x.device), bad)


def test_raw_op_errors(device):
    x = torch.randn(5, 8, device=device)
    w = torch.randn(11, 8, device=device)
    y = torch.zeros(6, dtype=torch.long, device=device)
    plan = plan_list(5, 11, 8, torch.float32, device, "recompute")
    with pytest.raises(ValueError, match=r"target: expected shape \[5\]"):
        torch.ops.flce.lce_forward(x, w, None, y, None, *OPTIONS, plan, False, False, False, False)
    with pytest.raises(ValueError, match=f"plan: expected {len(_ops.PLAN_FIELDS)} integers"):
        torch.ops.flce.lce_forward(
            x, w, None, y[:5], None, *OPTIONS, [1, 2], False, False, False, False
        )
    with pytest.raises(TypeError, match="x: expected dtype"):
        torch.ops.flce.lce_forward(
            x.double(), w.double(), None, y[:5], None, *OPTIONS, plan, False, False, False, False
        )
    bad = list(plan)
    bad[_ops.PLAN_FIELDS.index("fused_logits")] = 3
    with pytest.raises(ValueError, match=r"fused_logits must be 0 \(off\), 1 \(auto\) or 2"):
        torch.ops.flce.lce_forward(
            x, w, None, y[:5], None, *OPTIONS, bad, False, False, False, False
        )
    bad = list(plan)
    bad[_ops.PLAN_FIELDS.index("compact_backward_blocks")] = 2
    with pytest.raises(ValueError, match="compact_backward_blocks must be 0 or 1"):
        torch.ops.flce.lce_forward(
            x, w, None, y[:5], None, *OPTIONS, bad, False, False, False, False
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("factor", [1.0, 0.25, -7.0])
def test_scale_op(device, dtype, factor):
    g = torch.randn(1031, device=device).to(dtype)
    want = (g.float() * factor).to(dtype)
    torch.ops.flce.scale_(g, torch.tensor(factor, device=device))
    assert torch.equal(g, want)


def test_scale_op_errors(device):
    g = torch.randn(10, device=device)
    with pytest.raises(TypeError, match="scale: expected dtype float32"):
        torch.ops.flce.scale_(g, torch.tensor(2.0, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match="scale: expected one element"):
        torch.ops.flce.scale_(g, torch.ones(2, device=device))
    with pytest.raises(ValueError, match="grad: expected a contiguous tensor"):
        torch.ops.flce.scale_(torch.randn(4, 6, device=device).T, torch.ones((), device=device))
