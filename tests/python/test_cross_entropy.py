"""flce.cross_entropy and flce.CrossEntropyLoss (given logits) against float64 PyTorch."""

import pytest
import torch
from flce_reference import TOL, ce_from_logits, random_labels, rel_err, transform

import flce


def run_logits_case(
    device, *, shape=(4, 9), vocab=83, dtype=torch.float32, weight=False, inplace=False, **options
):
    logits = (torch.randn(*shape, vocab, device=device) * 2).to(dtype)
    y = random_labels(shape, vocab, device, options.get("ignore_index", -100))
    cw = torch.rand(vocab, device=device) + 0.5 if weight else None
    ours_in = logits.clone().requires_grad_(True)
    softcap, scale = options.pop("softcap", None), options.pop("logit_scale", 1.0)
    # inplace_backward consumes its input, so it gets a non-leaf copy.
    feed = ours_in * 1 if inplace else ours_in
    loss = flce.cross_entropy(
        feed, y, cw, softcap=softcap, logit_scale=scale, inplace_backward=inplace, **options
    )
    ref_in = logits.detach().double().requires_grad_(True)
    ref, _ = ce_from_logits(transform(ref_in, scale, softcap), y, class_weight=cw, **options)
    tol_loss, tol_grad = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert rel_err(loss, ref) <= tol_loss
    g = torch.randn_like(ref)
    (ga,) = torch.autograd.grad(loss, (ours_in,), g.float())
    (gr,) = torch.autograd.grad(ref, (ref_in,), g)
    assert ga.dtype == dtype
    assert rel_err(ga, gr) <= tol_grad, rel_err(ga, gr)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_reductions(device, reduction, inplace):
    run_logits_case(device, reduction=reduction, inplace=inplace)


@pytest.mark.parametrize(
    "option",
    [
        {"label_smoothing": 0.2},
        {"z_loss": 1e-2},
        {"softcap": 3.0},
        {"logit_scale": 0.5},
        {"weight": True},
        {"ignore_index": 3},
    ],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_options(device, option, inplace):
    run_logits_case(device, inplace=inplace, **option)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(device, dtype):
    run_logits_case(device, dtype=dtype, weight=True, label_smoothing=0.1)
    run_logits_case(device, dtype=dtype, inplace=True, reduction="sum")


def test_large_vocab(device):
    run_logits_case(device, shape=(5,), vocab=70_001, z_loss=1e-3)


def test_inplace_overwrites_logits_and_matches(device):
    logits = torch.randn(6, 30, device=device, requires_grad=True)
    y = random_labels((6,), 30, device)
    hidden = logits * 1.0
    loss = flce.cross_entropy(hidden, y, inplace_backward=True)
    (g_in,) = torch.autograd.grad(loss, (logits,))
    loss2 = flce.cross_entropy(logits, y)
    (g_ref,) = torch.autograd.grad(loss2, (logits,))
    torch.testing.assert_close(g_in, g_ref)
    # The buffer now holds the gradient, not the logits.
    assert not torch.allclose(hidden.detach(), logits.detach())


def test_return_lse_gradient(device):
    logits = torch.randn(7, 25, device=device, requires_grad=True)
    y = random_labels((7,), 25, device)
    loss, lse = flce.cross_entropy(logits, y, return_lse=True)
    ref_in = logits.detach().double().requires_grad_(True)
    ref, ref_lse = ce_from_logits(ref_in, y)
    assert rel_err(lse, ref_lse) < 1e-6
    ga = torch.autograd.grad(loss + lse.sum() * 0.3, (logits,))[0]
    gr = torch.autograd.grad(ref + ref_lse.sum() * 0.3, (ref_in,))[0]
    assert rel_err(ga, gr) < 1e-5


def test_zero_rows_and_all_ignored(device):
    empty = torch.randn(0, 10, device=device, requires_grad=True)
    loss = flce.cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=device))
    assert loss.item() == 0
    logits = torch.randn(4, 10, device=device, requires_grad=True)
    loss = flce.cross_entropy(logits, torch.full((4,), -100, device=device))
    loss.backward()
    assert loss.item() == 0 and torch.all(logits.grad == 0)


def test_gradcheck(device):
    logits = torch.randn(4, 6, device=device, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 5, -100, 2], device=device)
    fn = lambda z: flce.cross_entropy(z, y, label_smoothing=0.1, z_loss=0.01, reduction="none")
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-3, atol=2e-3, rtol=1e-2)


def test_compile_fullgraph(device):
    logits = torch.randn(3, 5, 40, device=device)
    y = random_labels((3, 5), 40, device)

    def fn(z):
        return flce.cross_entropy(z, y, label_smoothing=0.1, softcap=8.0, z_loss=1e-3)

    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    le = fn(a)
    lc = torch.compile(fn, fullgraph=True)(b)
    torch.testing.assert_close(lc, le)
    le.backward()
    lc.backward()
    torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_loss_drop_in(device, reduction):
    cw = torch.rand(17, device=device) + 0.5
    ours = flce.CrossEntropyLoss(weight=cw, reduction=reduction, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=cw, reduction=reduction, label_smoothing=0.1)
    for shape in ((11,), (3, 4)):
        logits = torch.randn(shape[0], 17, *shape[1:], device=device, requires_grad=True)
        y = random_labels(shape, 17, device)
        a = ours(logits, y)
        b = theirs(logits, y)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        ga = torch.autograd.grad(a.sum(), (logits,))[0]
        gb = torch.autograd.grad(b.sum(), (logits,))[0]
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


def test_cross_entropy_loss_rejects_probabilities(device):
    with pytest.raises(TypeError, match="target"):
        flce.CrossEntropyLoss()(torch.randn(3, 5, device=device), torch.rand(3, 5, device=device))
