"""flce.linear_cross_entropy against the float64 PyTorch reference: loss, lse, metrics and the
gradients of x, weight and bias, for every option, dtype, reduction and strategy."""

import pytest
import torch
from flce_reference import TOL, leaves64, linear_ce, make_inputs, random_labels, rel_err, transform

import flce


def run_case(
    device,
    *,
    n_shape=(3, 11),
    vocab=77,
    hidden=24,
    dtype=torch.float32,
    bias=False,
    class_weight=False,
    strategy="auto",
    memory_budget=None,
    compiled=False,
    upstream=None,
    ignore_frac=0.2,
    label_dtype=torch.int64,
    **options,
):
    x, w, b = make_inputs(n_shape, vocab, hidden, device, dtype, bias)
    y = random_labels(
        n_shape, vocab, device, options.get("ignore_index", -100), ignore_frac, label_dtype
    )
    cw = torch.rand(vocab, device=device) + 0.5 if class_weight else None
    xs, ws, bs = [t if t is None else t.clone().requires_grad_(True) for t in (x, w, b)]
    fn = lambda *a: flce.linear_cross_entropy(
        *a, class_weight=cw, strategy=strategy, memory_budget=memory_budget, **options
    )
    if compiled:
        fn = torch.compile(fn, fullgraph=True)
    loss = fn(xs, ws, y, bs)
    x64, w64, b64 = leaves64(x, w, b)
    ref, _ = linear_ce(x64, w64, y, b64, class_weight=cw, **options)

    assert loss.dtype == torch.float32
    assert loss.shape == ref.shape
    tol_loss, tol_grad = TOL[dtype]
    assert rel_err(loss, ref) <= tol_loss, (loss, ref)

    g = torch.randn_like(ref) if upstream is None else torch.full_like(ref, upstream)
    inputs = [t for t in (xs, ws, bs) if t is not None]
    refs = [t for t in (x64, w64, b64) if t is not None]
    grads = torch.autograd.grad(loss, inputs, g.to(loss.dtype))
    ref_grads = torch.autograd.grad(ref, refs, g)
    for name, a, r in zip(("x", "weight", "bias"), grads, ref_grads):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert rel_err(a, r) <= tol_grad, (name, rel_err(a, r))
    return loss


STRATEGIES = ["grad_in_forward", "recompute"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_plain(device, strategy, reduction):
    run_case(device, strategy=strategy, reduction=reduction)


@pytest.mark.parametrize("upstream", [1.0, 0.0, -3.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_in_forward_upstream_scales(device, upstream, dtype):
    # 1 is the case the rescaling kernel skips without touching the gradients; 0 and a negative
    # factor must still reach every element.
    run_case(device, strategy="grad_in_forward", upstream=upstream, dtype=dtype, vocab=301)


def test_unused_loss_gives_no_gradient(device):
    # Only the lse reaches the output: the gradient comes from it alone (grad_loss is None).
    x, w, _ = make_inputs((9,), 40, 16, device, torch.float32, False)
    y = random_labels((9,), 40, device, -100, 0.2, torch.int64)
    x.requires_grad_(True)
    _loss, lse = flce.linear_cross_entropy(x, w, y, return_lse=True)
    (gx,) = torch.autograd.grad(lse.sum(), (x,))
    x64 = x.detach().double().requires_grad_(True)
    (gr,) = torch.autograd.grad(torch.logsumexp(x64 @ w.double().T, dim=-1).sum(), (x64,))
    assert rel_err(gx, gr) <= 1e-5


def test_reduction_none(device):
    loss = run_case(device, strategy="recompute", reduction="none")
    assert loss.shape == (3, 11)


@pytest.mark.parametrize(
    "option",
    [
        {"label_smoothing": 0.1},
        {"z_loss": 1e-2},
        {"softcap": 3.0},
        {"logit_scale": 0.7},
        {"logit_scale": -1.3},
        {"class_weight": True},
        {"bias": True},
        {"ignore_index": 5},
        {"label_dtype": torch.int32},
        {"shift": 1},
        {"shift": 3},
    ],
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_option(device, option, strategy):
    run_case(device, strategy=strategy, **option)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("strategy", ["auto", "recompute"])
def test_all_options_combined(device, reduction, strategy):
    run_case(
        device,
        reduction=reduction,
        strategy=strategy,
        bias=True,
        class_weight=True,
        label_smoothing=0.05,
        z_loss=1e-3,
        softcap=4.0,
        logit_scale=1.5,
        shift=True,
        n_shape=(2, 3, 7),
        vocab=131,
        hidden=19,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dtypes_against_torch_error(device, dtype, strategy):
    """Our error at a low precision must be within a small multiple of what PyTorch's own
    F.linear + cross_entropy achieves at that dtype (plus a floor for the gradient rounding)."""
    n_shape, vocab, hidden = (37,), 301, 40
    x, w, b = make_inputs(n_shape, vocab, hidden, device, dtype, bias=True)
    y = random_labels(n_shape, vocab, device)
    xs, ws, bs = [t.clone().requires_grad_(True) for t in (x, w, b)]
    loss = flce.linear_cross_entropy(xs, ws, y, bs, strategy=strategy, label_smoothing=0.1)
    ours = [loss, *torch.autograd.grad(loss, (xs, ws, bs))]

    xt, wt, bt = [t.clone().requires_grad_(True) for t in (x, w, b)]
    tl = torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(xt, wt, bt).float(), y, label_smoothing=0.1
    )
    theirs = [tl, *torch.autograd.grad(tl, (xt, wt, bt))]

    x64, w64, b64 = leaves64(x, w, b)
    ref, _ = linear_ce(x64, w64, y, b64, label_smoothing=0.1)
    refs = [ref, *torch.autograd.grad(ref, (x64, w64, b64))]
    floor = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for name, a, t, r in zip(("loss", "x", "weight", "bias"), ours, theirs, refs):
        assert rel_err(a, r) <= 2 * rel_err(t, r) + floor, (name, rel_err(a, r), rel_err(t, r))


def chunking_budget(n, vocab, hidden, dtype, device, strategy, bias=True):
    """The largest budget (stepping down from the unconstrained plan's need by 16 logits rows)
    whose plan splits the tokens into several forward chunks, and that plan."""
    need = flce.plan(
        n,
        vocab,
        hidden,
        dtype,
        device,
        strategy=strategy,
        has_bias=bias,
        needs_grad_bias=bias,
        memory_budget=1 << 40,
    )
    budget = max(need["forward_workspace_bytes"], need["backward_workspace_bytes"])
    while budget > 1:
        budget -= 16 * vocab * 4
        try:
            plan = flce.plan(
                n,
                vocab,
                hidden,
                dtype,
                device,
                strategy=strategy,
                has_bias=bias,
                needs_grad_bias=bias,
                memory_budget=budget,
            )
        except ValueError:
            break
        if plan["forward_token_chunk"] < n:
            return budget, plan
    pytest.fail(f"no budget makes the {strategy} plan chunk N={n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_small_budget_forces_chunking(device, strategy, dtype):
    n, vocab, hidden = 600, 203, 12
    budget, plan = chunking_budget(n, vocab, hidden, dtype, device, strategy)
    assert plan["strategy"] == strategy
    if strategy == "grad_in_forward":
        # Either dZ in place per chunk (fp32 dW accumulator) or dZ of all tokens kept (one dW GEMM).
        assert plan["dw_group_tokens"] in (plan["forward_token_chunk"], n)
    run_case(
        device,
        n_shape=(n,),
        vocab=vocab,
        hidden=hidden,
        dtype=dtype,
        strategy=strategy,
        memory_budget=budget,
        bias=True,
        label_smoothing=0.1,
    )


def test_recompute_vocab_chunks(device):
    """A budget below one full [N, V] block makes the recompute backward split the vocabulary."""
    n, vocab, hidden = 40, 20_000, 8
    need = flce.plan(
        n, vocab, hidden, torch.float32, device, strategy="recompute", memory_budget=1 << 40
    )
    budget = need["min_budget_bytes"] + n * 4096 * 4
    plan = flce.plan(
        n, vocab, hidden, torch.float32, device, strategy="recompute", memory_budget=budget
    )
    assert plan["backward_vocab_chunk"] < vocab
    run_case(
        device,
        n_shape=(n,),
        vocab=vocab,
        hidden=hidden,
        strategy="recompute",
        memory_budget=budget,
        bias=True,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_budget_token_outer_and_split_rows(device, dtype):
    """A budget too small for the [N, D] fp32 dx accumulator: the backward walks token chunks
    outermost (dW accumulated across them) and the forward splits rows into vocabulary blocks."""
    n, vocab, hidden = 600, 5000, 48
    kw = {"has_bias": True, "needs_grad_bias": True, "strategy": "recompute"}
    need = flce.plan(n, vocab, hidden, dtype, device, memory_budget=1 << 40, **kw)
    budget = need["min_budget_bytes"] + n * hidden * 4 // 4
    plan = flce.plan(n, vocab, hidden, dtype, device, memory_budget=budget, **kw)
    assert plan["backward_order"] == "token_outer", plan
    assert plan["backward_token_chunk"] < n, plan
    assert 0 < plan["forward_vocab_chunk"] < vocab, plan
    run_case(
        device,
        n_shape=(n,),
        vocab=vocab,
        hidden=hidden,
        dtype=dtype,
        strategy="recompute",
        memory_budget=budget,
        bias=True,
        class_weight=True,
        label_smoothing=0.1,
        z_loss=1e-3,
        softcap=5.0,
    )


def test_large_vocab(device):
    """V > 65536 (a 16-bit vocabulary index would overflow), both strategies, all grads."""
    for strategy in STRATEGIES:
        run_case(
            device,
            n_shape=(13,),
            vocab=70_001,
            hidden=8,
            strategy=strategy,
            bias=True,
            ignore_frac=0.3,
        )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(device, reduction):
    x, w, _ = make_inputs((9,), 31, 8, device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = torch.full((9,), -100, device=device)
    loss = flce.linear_cross_entropy(x, w, y, reduction=reduction)
    assert torch.all(loss == 0)
    gx, gw = torch.autograd.grad(loss.sum(), (x, w))
    assert torch.all(gx == 0) and torch.all(gw == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("strategy", ["auto", "recompute"])
def test_zero_tokens(device, reduction, strategy):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    w = torch.randn(31, 8, device=device, requires_grad=True)
    b = torch.randn(31, device=device, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=device)
    loss, lse = flce.linear_cross_entropy(
        x, w, y, b, reduction=reduction, strategy=strategy, return_lse=True
    )
    assert lse.shape == (0,)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0
    gx, gw, gb = torch.autograd.grad(loss.sum(), (x, w, b))
    assert gx.shape == (0, 8) and torch.all(gw == 0) and torch.all(gb == 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_through_lse(device, reduction):
    x, w, b = make_inputs((4, 6), 53, 12, device, bias=True)
    y = random_labels((4, 6), 53, device)
    xs, ws, bs = [t.clone().requires_grad_(True) for t in (x, w, b)]
    loss, lse = flce.linear_cross_entropy(
        xs, ws, y, bs, return_lse=True, reduction=reduction, z_loss=1e-3, shift=1
    )
    x64, w64, b64 = leaves64(x, w, b)
    ref, _ = linear_ce(x64, w64, y, b64, reduction=reduction, z_loss=1e-3, shift=1)
    ref_lse = torch.logsumexp(torch.nn.functional.linear(x64, w64, b64), -1)
    assert lse.shape == y.shape and lse.dtype == torch.float32
    assert rel_err(lse, ref_lse) < 1e-6
    gl = torch.randn_like(ref)
    g_lse = torch.randn_like(ref_lse)
    ours = torch.autograd.grad(
        (loss * gl.float()).sum() + (lse * g_lse.float()).sum(), (xs, ws, bs)
    )
    refs = torch.autograd.grad((ref * gl).sum() + (ref_lse * g_lse).sum(), (x64, w64, b64))
    for a, r in zip(ours, refs):
        assert rel_err(a, r) < 1e-4


def test_metrics(device):
    x, w, b = make_inputs((5, 9), 61, 16, device, bias=True, logit_std=3.0)
    y = random_labels((5, 9), 61, device)
    _loss, metrics = flce.linear_cross_entropy(
        x, w, y, b, return_metrics=True, softcap=5.0, logit_scale=1.2
    )
    z = transform(torch.nn.functional.linear(x.double(), w.double(), b.double()), 1.2, 5.0)
    valid = y != -100
    zv = z[valid]
    yv = y[valid]
    lse = torch.logsumexp(zv, -1)
    p = torch.softmax(zv, -1)
    expected = {
        "max_logit": zv.max(),
        "logit_norm": zv.norm(dim=-1).mean(),
        "entropy": (lse - (p * zv).sum(-1)).mean(),
        "lse_squared": lse.square().mean(),
        "accuracy": (zv.argmax(-1) == yv).double().mean(),
        "valid_tokens": valid.sum().double(),
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        got = metrics[name]
        assert got.shape == () and got.dtype == torch.float32, name
        assert abs(got.item() - value.item()) <= 1e-4 * max(1.0, abs(value.item())), name


def test_metrics_with_lse_tuple_order(device):
    x, w, _ = make_inputs((6,), 20, 8, device)
    y = random_labels((6,), 20, device)
    out = flce.linear_cross_entropy(x, w, y, return_lse=True, return_metrics=True)
    assert len(out) == 3 and out[1].shape == (6,) and isinstance(out[2], dict)


def test_shift_matches_manual_shift(device):
    x, w, _ = make_inputs((3, 10), 40, 8, device)
    y = random_labels((3, 10), 40, device)
    for k in (1, 2):
        ours = flce.linear_cross_entropy(x, w, y, shift=k, reduction="sum")
        manual = flce.linear_cross_entropy(x[:, :-k].contiguous(), w, y[:, k:], reduction="sum")
        torch.testing.assert_close(ours, manual, rtol=1e-5, atol=1e-5)
        none = flce.linear_cross_entropy(x, w, y, shift=k, reduction="none")
        assert torch.all(none[:, -k:] == 0)


def test_strided_rows(device):
    """x rows with a stride > D (a slice of a wider buffer) are used without a copy."""
    wide = torch.randn(17, 40, device=device)
    x = wide[:, 5:29]
    w = torch.randn(50, 24, device=device) * 0.3
    y = random_labels((17,), 50, device)
    ours = flce.linear_cross_entropy(x, w, y)
    ref, _ = linear_ce(x.double(), w.double(), y)
    assert rel_err(ours, ref) < 1e-5


def test_no_grad_computes_no_gradients(device):
    x, w, _ = make_inputs((8,), 30, 8, device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = random_labels((8,), 30, device)
    with torch.no_grad():
        loss = flce.linear_cross_entropy(x, w, y)
    assert loss.grad_fn is None
    # With nothing to differentiate the plan keeps only forward buffers (O(N) plus a chunk).
    plan = flce.plan(8, 30, 8, torch.float32, device, needs_grad_x=False, needs_grad_weight=False)
    assert plan["backward_workspace_bytes"] == 0


def test_only_weight_requires_grad(device):
    x, w, _ = make_inputs((12,), 30, 8, device)
    w.requires_grad_(True)
    y = random_labels((12,), 30, device)
    loss = flce.linear_cross_entropy(x, w, y)
    (gw,) = torch.autograd.grad(loss, (w,))
    w64 = w.detach().double().requires_grad_(True)
    ref, _ = linear_ce(x.double(), w64, y)
    (rw,) = torch.autograd.grad(ref, (w64,))
    assert rel_err(gw, rw) < 1e-4


def test_grad_in_forward_backward_twice_raises(device):
    x, w, _ = make_inputs((6,), 20, 8, device)
    x.requires_grad_(True)
    y = random_labels((6,), 20, device)
    loss = flce.linear_cross_entropy(x, w, y, strategy="grad_in_forward")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="recompute"):
        loss.backward()
    x.grad = None
    loss = flce.linear_cross_entropy(x, w, y, strategy="recompute")
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)


def test_float64_gradcheck(device):
    """float64 inputs are computed in float32, so gradcheck uses a step and tolerance suited to
    float32 rounding (eps=1e-3, atol=2e-3) rather than float64 defaults. gradcheck
    backpropagates the same graph several times, which only the recompute strategy allows
    (grad_in_forward is checked against the reference above)."""
    x = torch.randn(5, 4, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, device=device, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 6, 0, 3], device=device)
    fn = lambda x, w, b: flce.linear_cross_entropy(
        x, w, y, b, strategy="recompute", label_smoothing=0.1, z_loss=0.01, softcap=3.0
    )
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-3, atol=2e-3, rtol=1e-2)
    fn = lambda x, w, b: flce.linear_cross_entropy(x, w, y, b, reduction="none")
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-3, atol=2e-3, rtol=1e-2)


def test_autocast(device):
    dtype = torch.bfloat16
    x, w, b = make_inputs((10,), 40, 16, device, bias=True)
    y = random_labels((10,), 40, device)
    xs, ws, bs = [t.clone().requires_grad_(True) for t in (x, w, b)]
    with torch.autocast(device.type, dtype=dtype):
        loss = flce.linear_cross_entropy(xs, ws, y, bs)
    loss.backward()
    assert xs.grad.dtype == torch.float32 and ws.grad.dtype == torch.float32
    expected = flce.linear_cross_entropy(x.to(dtype), w.to(dtype), y, b.to(dtype))
    torch.testing.assert_close(loss, expected)
    ref, _ = linear_ce(x.to(dtype).double(), w.to(dtype).double(), y, b.to(dtype).double())
    assert rel_err(loss, ref) < TOL[dtype][0]


@pytest.mark.parametrize("strategy", ["grad_in_forward", "recompute"])
def test_compile_fullgraph_matches_eager(device, strategy):
    x, w, b = make_inputs((2, 9), 45, 16, device, bias=True)
    y = random_labels((2, 9), 45, device)

    def fn(x, w, b):
        with_lse = strategy == "recompute"
        out = flce.linear_cross_entropy(
            x,
            w,
            y,
            b,
            shift=True,
            z_loss=1e-3,
            softcap=5.0,
            label_smoothing=0.1,
            strategy=strategy,
            return_lse=with_lse,
            return_metrics=True,
        )
        loss, metrics = out[0], out[-1]
        extra = out[1].square().mean() if with_lse else 0.0
        return loss + extra, metrics["accuracy"]

    eager_in = [t.clone().requires_grad_(True) for t in (x, w, b)]
    comp_in = [t.clone().requires_grad_(True) for t in (x, w, b)]
    le, ae = fn(*eager_in)
    lc, ac = torch.compile(fn, fullgraph=True)(*comp_in)
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(ac, ae)
    ge = torch.autograd.grad(le, eager_in)
    gc = torch.autograd.grad(lc, comp_in)
    for a, b_ in zip(gc, ge):
        torch.testing.assert_close(a, b_)


def test_compile_mode_reference(device, compile_mode):
    """With --compile the reference comparison also runs through torch.compile."""
    if not compile_mode:
        pytest.skip("run with --compile")
    for reduction in ("mean", "sum", "none"):
        run_case(
            device,
            compiled=True,
            reduction=reduction,
            bias=True,
            class_weight=True,
            label_smoothing=0.1,
            z_loss=1e-3,
            softcap=4.0,
            shift=1,
        )


@pytest.mark.gpu
def test_cuda_graph_capture(device):
    x, w, b = make_inputs((64,), 1000, 64, device, torch.bfloat16, bias=True)
    y = random_labels((64,), 1000, device)
    xs, ws, bs = [t.clone().requires_grad_(True) for t in (x, w, b)]

    def step():
        loss = flce.linear_cross_entropy(xs, ws, y, bs)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for t in (xs, ws, bs):
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in (xs, ws, bs):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    graph.replay()
    torch.cuda.synchronize()
    xe, we, be = [t.clone().requires_grad_(True) for t in (x, w, b)]
    eager = flce.linear_cross_entropy(xe, we, y, be)
    eager.backward()
    torch.testing.assert_close(static_loss, eager)
    for a, e in zip((xs, ws, bs), (xe, we, be)):
        torch.testing.assert_close(a.grad, e.grad)


@pytest.mark.gpu
def test_cuda_labels_out_of_range_nan_without_validation(device):
    x, w, _ = make_inputs((4,), 10, 8, device)
    y = torch.tensor([1, 2, 99, 3], device=device)
    with pytest.raises(ValueError, match="target"):
        flce.linear_cross_entropy(x, w, y)
    loss = flce.linear_cross_entropy(x, w, y, validate_labels=False, reduction="none")
    assert torch.isnan(loss[2])
