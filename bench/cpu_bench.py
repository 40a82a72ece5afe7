"""CPU benchmark: flce forward+backward against PyTorch on the same CPU, in the same run.

    python bench/cpu_bench.py                      # N=2048, V=32000, D=1024, float32
    python bench/cpu_bench.py --n 4096 --v 50257 --d 768 --dtype bfloat16 --iters 5

Methods: torch (F.cross_entropy(x @ W.T, y), eager), flce with strategy grad_in_forward and
recompute. Time: median of --iters forward+backward runs after --warmup runs, wall clock, with
torch and flce (OpenMP) on all cores. Memory: growth of the process's peak resident set during
one forward+backward (the kernel's high-water mark is reset before each run through
/proc/self/clear_refs, and glibc is told to serve every block of 1 MiB or more by mmap, so that
freed blocks leave the resident set and it follows what is in use). Where the high-water mark
cannot be reset, the logits size N*V*4 is given instead, computed, and said so. Accuracy: against
a float64 reference on the same inputs. Writes a markdown table to bench/results/cpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import re
import statistics
import sys
import time

# Both torch's intra-op pool and flce's OpenMP loops should use every core; OpenMP reads this
# when the extension loads, so it is set before importing anything that loads it.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import torch
import torch.nn.functional as F

try:
    import flce
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import flce

IGNORE_INDEX = -100
MiB = float(1 << 20)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one
        return True
    except OSError:
        return False


def _return_large_blocks_to_os() -> None:
    """glibc raises its mmap threshold (up to 32 MiB) after large blocks are freed, and blocks
    below it stay resident after free, hiding later allocations from the peak resident set.
    Fixing the threshold at 1 MiB makes every large block an mmap that is unmapped on free."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass


def peak_rss_growth(fn) -> int | None:
    """Bytes the peak resident set grew during fn(), None where it cannot be measured."""
    gc.collect()
    before = _status_kib("VmRSS")
    if before is None or not _reset_peak_rss():
        return None
    fn()
    peak = _status_kib("VmHWM")
    return None if peak is None else max(0, peak - before) * 1024


def make_inputs(n: int, v: int, d: int, dtype: torch.dtype, seed: int):
    """LM-like data as in the GPU benchmark: logit std ~4.5, labels drawn from the model's own
    softmax (exactly, by Gumbel-max), 10% ignored."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) * (4.5 / d**0.5)
    x, w = x.to(dtype), w.to(dtype)
    y = torch.empty(n, dtype=torch.long)
    step = max(1, (256 << 20) // (v * 4))
    for s in range(0, n, step):
        z = (x[s : s + step] @ w.T).float()
        u = torch.rand(z.shape, generator=gen).clamp_(min=1e-20)
        y[s : s + step] = (z - torch.log(-torch.log(u))).argmax(1)
    y[torch.randperm(n, generator=gen)[: round(0.1 * n)]] = IGNORE_INDEX
    return x.requires_grad_(), w.requires_grad_(), y


def reference(x, w, y):
    """float64 loss and gradients through autograd (fine at CPU-benchmark sizes)."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    loss = F.cross_entropy(x64 @ w64.T, y, ignore_index=IGNORE_INDEX)
    loss.backward()
    return float(loss.detach()), x64.grad, w64.grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048, help="tokens N")
    p.add_argument("--v", type=int, default=32000, help="vocabulary V")
    p.add_argument("--d", type=int, default=1024, help="hidden size D")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--recompute-budget",
        type=int,
        default=None,
        help="memory_budget (bytes) for the recompute run; default flce's default",
    )
    p.add_argument("--no-check", action="store_true", help="skip the float64 accuracy check")
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu.md"),
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.n, args.v, args.d) < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--n, --v, --d and --iters must be >= 1 and --warmup >= 0")

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    _return_large_blocks_to_os()
    dtype = getattr(torch, args.dtype)
    n, v, d = args.n, args.v, args.d
    x, w, y = make_inputs(n, v, d, dtype, args.seed)
    ref = None if args.no_check else reference(x, w, y)

    def torch_loss():
        return F.cross_entropy((x @ w.T).float(), y, ignore_index=IGNORE_INDEX)

    def flce_loss(strategy, budget=None):
        return lambda: flce.linear_cross_entropy(
            x, w, y, ignore_index=IGNORE_INDEX, strategy=strategy, memory_budget=budget
        )

    methods = [
        ("torch", torch_loss, None),
        ("flce grad_in_forward", flce_loss("grad_in_forward"), "grad_in_forward"),
        ("flce recompute", flce_loss("recompute", args.recompute_budget), "recompute"),
    ]
    rows = []
    for name, loss_fn, strategy in methods:
        row = {"method": name}
        try:

            def step(loss_fn=loss_fn):
                x.grad = w.grad = None
                loss_fn().backward()

            for _ in range(args.warmup):
                step()
            times = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            row["ms"] = statistics.median(times) * 1e3
            # Gradients freed before the baseline is read, so that the growth includes them.
            x.grad = w.grad = None
            row["rss"] = peak_rss_growth(lambda loss_fn=loss_fn: loss_fn().backward())
            if ref is not None:
                x.grad = w.grad = None
                loss = loss_fn()
                loss.backward()
                row["errs"] = (
                    abs(float(loss.detach()) - ref[0]) / abs(ref[0]),
                    rel(x.grad, ref[1]),
                    rel(w.grad, ref[2]),
                )
            if strategy:
                budget = args.recompute_budget if strategy == "recompute" else None
                plan = flce.plan(n, v, d, dtype, "cpu", memory_budget=budget, strategy=strategy)
                row["plan"] = ", ".join(
                    f"{k} {val / MiB:.0f} MiB" if k.endswith("_bytes") else f"{k} {val}"
                    for k, val in plan.items()
                    if val
                )
        except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
            row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        x.grad = w.grad = None
        rows.append(row)
        print(
            f"{name:<22} " + (f"{row['ms']:9.1f} ms" if "ms" in row else row.get("error", "")),
            flush=True,
        )

    base = rows[0].get("ms")
    logits_bytes = n * v * 4
    grads_bytes = (n + v) * d * x.element_size()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    lines = [
        "# flce on the CPU against PyTorch",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {cpu}, "
        f"{threads} threads (torch.set_num_threads and OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS')}); torch {torch.__version__}."
        + "".join(
            f" {k}={os.environ[k]}."
            for k in ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS", "GOMP_SPINCOUNT")
            if k in os.environ
        ),
        "",
        (
            f"N={n}, V={v}, D={d}, {args.dtype}, mean reduction, 10% of labels ignored, LM-like "
            f"data. Forward+backward time: median of {args.iters} runs after {args.warmup} "
            "warm-up run(s). Peak memory: growth of the peak resident set during one "
            f"forward+backward, gradients included ((N + V) * D * {x.element_size()} = "
            f"{grads_bytes / MiB:.0f} MiB; torch's fp32 logits alone are N*V*4 = "
            f"{logits_bytes / MiB:.0f} MiB). Errors against a float64 reference."
        ),
        "",
        "| method | fwd+bwd ms | ratio to torch | peak RSS growth | loss err | dx err | dW err |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
            continue
        ratio = f"{r['ms'] / base:.2f}" if base else "-"
        rss = (
            f"{r['rss'] / MiB:.0f} MiB"
            if r.get("rss") is not None
            else f"n/a (logits would be {logits_bytes / MiB:.0f} MiB, computed)"
        )
        errs = r.get("errs")
        err_cells = " | ".join(f"{e:.1e}" for e in errs) if errs else "- | - | -"
        lines.append(f"| {r['method']} | {r['ms']:.1f} | {ratio} | {rss} | {err_cells} |")
    plans = [f"- {r['method']}: {r['plan']}" for r in rows if r.get("plan")]
    if plans:
        lines += ["", "flce plans:", ""] + plans
    lines += [
        "",
        "Command: `"
        + " ".join(["python bench/cpu_bench.py", *(sys.argv[1:] if argv is None else argv)])
        + "`",
        "",
    ]
    text = "\n".join(lines)
    print()
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
