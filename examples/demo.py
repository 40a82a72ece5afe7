"""flce in one screen: the loss, the gradients and the memory saved against PyTorch.

Runs on the GPU when there is one (bf16, a Llama-3-sized head), else on the CPU (fp32, a small
head). Compares flce.linear_cross_entropy with F.cross_entropy(x @ W.T) on the same inputs.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import flce


def measure(fn, device):
    """Runs fn() once (forward + backward) and returns (result, seconds, peak extra bytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = None
    return out, time.perf_counter() - start, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n = args.tokens or (8192 if gpu else 1024)
    v = args.vocab or (128256 if gpu else 32000)
    d = args.hidden or (4096 if gpu else 512)
    dtype = torch.bfloat16 if gpu else torch.float32
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"flce demo on {name}: N={n} tokens, V={v}, D={d}, {str(dtype).replace('torch.', '')}")

    torch.manual_seed(0)
    x = torch.randn(n, d, device=device, dtype=dtype)
    w = (torch.randn(v, d, device=device) * (4.5 / d**0.5)).to(dtype)
    y = torch.randint(0, v, (n,), device=device)
    y[torch.rand(n, device=device) < 0.1] = -100  # 10% ignored, like padding

    def run(loss_fn):
        xr = x.detach().requires_grad_()
        wr = w.detach().requires_grad_()
        loss = loss_fn(xr, wr)
        loss.backward()
        return loss.detach().float(), xr.grad, wr.grad

    def torch_loss(xr, wr):
        return F.cross_entropy((xr @ wr.T).float(), y, ignore_index=-100)

    def flce_loss(xr, wr):
        return flce.linear_cross_entropy(xr, wr, y, ignore_index=-100)

    run(flce_loss)  # warm-up (allocator, library handles)
    run(torch_loss)
    (l_t, dx_t, dw_t), t_t, m_t = measure(lambda: run(torch_loss), device)
    (l_f, dx_f, dw_f), t_f, m_f = measure(lambda: run(flce_loss), device)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    grads = (n + v) * d * x.element_size()
    print(f"{'':8}{'loss':>12}{'time ms':>10}{'peak extra MiB':>16}{'beyond grads MiB':>18}")
    for label, loss, t, m in (("torch", l_t, t_t, m_t), ("flce", l_f, t_f, m_f)):
        mem = f"{m / 2**20:16.0f}{(m - grads) / 2**20:18.0f}" if m is not None else f"{'n/a':>16}{'n/a':>18}"
        print(f"{label:8}{loss.item():12.6f}{t * 1e3:10.1f}{mem}")
    print(f"difference flce vs torch: loss {abs(l_f - l_t).item() / abs(l_t).item():.2e} (relative), "
          f"dx {rel(dx_f, dx_t):.2e}, dW {rel(dw_f, dw_t):.2e} (relative norm)")
    logits_bytes = n * v * 4
    print(f"torch holds the fp32 logits ({logits_bytes / 2**20:.0f} MiB) and their gradient; "
          f"flce never materializes them.")
    if m_t is not None:
        print(f"memory saved: {(m_t - m_f) / 2**20:.0f} MiB ({m_t / max(m_f, 1):.1f}x less)")
    else:  # no allocator statistics on the CPU: compare what each must hold
        plan = flce.plan(n, v, d, dtype, device)
        work = max(plan["forward_workspace_bytes"], plan["backward_workspace_bytes"])
        print(f"working memory: flce {work / 2**20:.0f} MiB (its planned workspace, "
              f"strategy {plan['strategy']}) vs torch {2 * logits_bytes / 2**20:.0f} MiB "
              f"(logits + their gradient): {2 * logits_bytes / work:.1f}x less")


if __name__ == "__main__":
    main()
