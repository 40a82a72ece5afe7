"""Modules and the compatibility entry points (CCE, Liger) against their documented
semantics."""

import pytest
import torch
from flce_reference import leaves64, linear_ce, make_inputs, random_labels, rel_err

import flce
from flce.compat.cce import linear_cross_entropy as cce_lce
from flce.compat.liger import (
    CrossEntropyOutput,
    LigerFusedLinearCrossEntropyLoss,
    liger_fused_linear_cross_entropy,
)


def test_linear_cross_entropy_loss_module(device):
    x, w, b = make_inputs((2, 8), 50, 12, device, bias=True)
    y = random_labels((2, 8), 50, device)
    module = flce.LinearCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3, shift=1)
    got = module(x, w, y, b)
    expected = flce.linear_cross_entropy(x, w, y, b, label_smoothing=0.1, z_loss=1e-3, shift=1)
    torch.testing.assert_close(got, expected)


def test_linear_cross_entropy_module(device):
    head = flce.LinearCrossEntropy(12, 50, bias=True, device=device, monitoring=True, softcap=6.0)
    assert head.weight.shape == (50, 12) and head.bias.shape == (50,)
    x = torch.randn(3, 7, 12, device=device, requires_grad=True)
    y = random_labels((3, 7), 50, device)
    loss = head(x, y)
    loss.backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    assert set(head.metrics) == {
        "max_logit",
        "logit_norm",
        "entropy",
        "lse_squared",
        "accuracy",
        "valid_tokens",
    }
    assert all(isinstance(v, float) for v in head.metrics.values())
    assert head.metrics["valid_tokens"] == float((y != -100).sum())
    logits = head(x)
    torch.testing.assert_close(logits, torch.nn.functional.linear(x, head.weight, head.bias))
    x64, w64, b64 = leaves64(x, head.weight, head.bias)
    ref, _ = linear_ce(x64, w64, y, b64, softcap=6.0)
    assert rel_err(loss, ref) < 1e-5


def test_linear_cross_entropy_module_init_method(device):
    head = flce.LinearCrossEntropy(4, 6, init_method=torch.nn.init.ones_, device=device)
    assert torch.all(head.weight == 1)


def test_module_rejects_bad_option_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        flce.LinearCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="strategy"):
        flce.LinearCrossEntropy(4, 6, strategy="fast")


# -- Cut Cross-Entropy ---------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0, 1, 2])
def test_cce_reduction_none_and_lse_layout(device, shift):
    e, c, bias = make_inputs((2, 9), 40, 8, device, bias=True)
    targets = random_labels((2, 9), 40, device)
    loss, lse = cce_lce(
        e,
        c,
        targets,
        bias,
        shift=shift,
        reduction="none",
        return_lse=True,
        filter_eps="auto",
        impl="cce_exact",
    )
    assert loss.shape == targets.shape
    z = torch.nn.functional.linear(e.double(), c.double(), bias.double())
    t = z.shape[1]
    # CCE: position t predicts target t + shift; the loss sits at the target's index.
    for i in range(t - shift):
        j = i + shift
        if targets[0, j] == -100:
            expected = 0.0
        else:
            expected = (torch.logsumexp(z[0, i], -1) - z[0, i, targets[0, j]]).item()
        assert abs(loss[0, j].item() - expected) < 1e-4
    assert torch.all(loss[:, :shift] == 0)
    assert lse.shape == (2, t - shift)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z[:, : t - shift], -1))


def test_cce_mean_shift_and_softcap(device):
    e, c, _ = make_inputs((3, 6), 30, 8, device)
    targets = random_labels((3, 6), 30, device)
    e.requires_grad_(True)
    got = cce_lce(e, c, targets, softcap=5.0, shift=True)
    e64, c64 = leaves64(e, c)[0], c.double()
    ref, _ = linear_ce(e64, c64, targets, softcap=5.0, shift=1)
    assert rel_err(got, ref) < 1e-5
    with pytest.raises(ValueError, match="shift"):
        cce_lce(e, c, targets, shift=6)


# -- Liger ---------------------------------------------------------------------------------


def test_liger_module_weight_first(device):
    x, w, b = make_inputs((20,), 45, 10, device, bias=True)
    y = random_labels((20,), 45, device)
    cw = torch.rand(45, device=device) + 0.5
    module = LigerFusedLinearCrossEntropyLoss(
        ce_weight=cw, lse_square_scale=1e-2, label_smoothing=0.1, softcap=7.0
    )
    got = module(w, x, y, b)  # weight first, like Liger
    ref, _ = linear_ce(
        x.double(),
        w.double(),
        y,
        b.double(),
        class_weight=cw,
        z_loss=1e-2,
        label_smoothing=0.1,
        softcap=7.0,
    )
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_liger_z_loss_and_token_accuracy(device, reduction):
    x, w, _ = make_inputs((30,), 25, 8, device, logit_std=3.0)
    y = random_labels((30,), 25, device)
    out = liger_fused_linear_cross_entropy(
        x,
        w,
        y,
        lse_square_scale=1e-2,
        reduction=reduction,
        return_z_loss=True,
        return_token_accuracy=True,
    )
    assert isinstance(out, CrossEntropyOutput)
    z = torch.nn.functional.linear(x.double(), w.double())
    valid = y != -100
    lse = torch.logsumexp(z, -1)
    z_loss = 1e-2 * lse[valid].square().sum()
    if reduction == "mean":
        z_loss = z_loss / valid.sum()
    accuracy = (z.argmax(-1) == y)[valid].double().mean()
    assert abs(out.z_loss.item() - z_loss.item()) < 1e-5 * max(1, z_loss.item())
    assert abs(out.token_accuracy.item() - accuracy.item()) < 1e-6
    ref, _ = linear_ce(x.double(), w.double(), y, z_loss=1e-2, reduction=reduction)
    assert rel_err(out.loss, ref) < 1e-5


def test_liger_reduction_none_z_loss(device):
    x, w, _ = make_inputs((12,), 25, 8, device)
    y = random_labels((12,), 25, device)
    out = liger_fused_linear_cross_entropy(
        x, w, y, lse_square_scale=0.1, reduction="none", return_z_loss=True
    )
    lse = torch.logsumexp(torch.nn.functional.linear(x.double(), w.double()), -1)
    expected = 0.1 * lse.square() * (y != -100)
    torch.testing.assert_close(out.z_loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert out.loss.shape == (12,)


def test_liger_unsupported_options():
    x, w, _ = make_inputs((4,), 5, 3, "cpu")
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(NotImplementedError, match="use_token_scaling"):
        liger_fused_linear_cross_entropy(x, w, y, use_token_scaling=True)
