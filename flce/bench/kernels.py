"""Where the time of a flce call goes: its kernels, by total time per call.

    python -m flce.bench.kernels                         # every benchmark shape, on the GPU
    python -m flce.bench.kernels --shapes qwen-0.5b,gemma2 --strategies recompute
    python -m flce.bench.kernels --device cpu --shape tiny:67:1031:48   # operators, on the CPU
    python -m flce.bench.kernels --shapes gemma2 --data cce     # peaked logits (CCE's data)

For each shape (bf16 on a GPU, float32 on the CPU; lm data unless --data says otherwise, 10%
ignored labels) and strategy
(`auto` at the default budget, `recompute` at the lean budget of 60 MiB, `forward`: the forward
alone without gradients) it times flce.linear_cross_entropy and the cuBLAS floor in the same run
(three matmuls, or one for the forward), then profiles a few calls with torch.profiler and lists
the GPU kernels (on the CPU: the operators, by self time) by time per call. The fused Hopper GEMMs
are named by their epilogue and kernel shape. Where NVML answers (torch.cuda.clock_rate and
power_draw need pynvml), the SM clock and board power sampled during the timed calls are given
too: when the board runs at its power limit, a kernel that gets faster can slow the others.

Writes <out>/<gpu>-kernels.md (default folder: build-bench, which git ignores; the tables locate
time, and speed claims come from `python -m flce.bench`).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import flce

from . import anchors, data
from .cli import _git_revision, _repo_root, gpu_slug
from .measure import ClockSampler, PeakMemory, free_memory, time_runs
from .methods import DEFAULT_RECOMPUTE_BUDGET
from .runner import floor_calls, grad_bytes

STRATEGIES = ("auto", "recompute", "forward")

# The fused logits GEMMs' epilogues (csrc/cuda/sm90_fused_logits.cuh), as they appear in the
# kernel's demangled name, and the kernel shapes (mainloop schedules).
_FUSED_MATH = (
    ("StatsMath<true>", "fused statistics + e GEMM"),
    ("StatsMath<false>", "fused statistics GEMM"),
    ("GradMath", "fused dZ GEMM"),
)
_FUSED_SHAPES = (("Pingpong", "ping-pong"), ("Cooperative", "cooperative"))
_MAX_LABEL = 90


def kernel_label(name: str) -> str:
    """A short name for a profiled kernel or operator: the fused GEMMs by epilogue and shape,
    flce's own kernels by function name, anything else (cuBLAS, PyTorch) by its own name."""
    for key, label in _FUSED_MATH:
        if key in name:
            shape = next((s for k, s in _FUSED_SHAPES if k in name), None)
            return f"{label} ({shape})" if shape else label
    head = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    head = re.split(r"[<(]", head, maxsplit=1)[0]
    if head.startswith("flce::detail::"):
        return "flce " + head.rsplit("::", 1)[-1]
    return name if len(name) <= _MAX_LABEL else name[: _MAX_LABEL - 3] + "..."


def kernel_rows(events, on_gpu: bool, calls: int) -> list[tuple[str, float, float]]:
    """(label, ms per call, launches per call) of the profiled events, longest first: GPU kernels
    and copies by device time, or on the CPU the operators by self time."""
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for ev in events:
        if on_gpu:
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = ev.device_time
        else:
            if ev.device_type != torch.autograd.DeviceType.CPU:
                continue
            us = ev.self_cpu_time_total
        label = kernel_label(ev.name)
        total[label] += us / 1e3
        count[label] += 1
    rows = [(k, total[k] / calls, count[k] / calls) for k in total]
    return sorted(rows, key=lambda r: -r[1])


def _budget_kwargs(strategy: str, budget: int | None) -> dict:
    """The memory budget (and strategy) flce is called with: recompute at the lean budget, auto at
    `budget` (flce's default when None)."""
    if strategy == "recompute":
        return {"memory_budget": DEFAULT_RECOMPUTE_BUDGET, "strategy": "recompute"}
    return {} if budget is None else {"memory_budget": budget}


def _call(strategy: str, x, w, y, budget: int | None = None) -> Callable[[], None]:
    if strategy == "forward":

        def run():
            with torch.no_grad():
                flce.linear_cross_entropy(x, w, y)

        return run
    kwargs = _budget_kwargs(strategy, budget)

    def run():
        x.grad = None
        w.grad = None
        flce.linear_cross_entropy(x, w, y, **kwargs).backward()

    return run


def _plan_summary(
    shape: data.Shape, strategy: str, dtype: torch.dtype, device: torch.device, budget: int | None
) -> str:
    """The plan's strategy and chunks, as flce.plan gives them for this call."""
    kwargs = _budget_kwargs(strategy, budget)
    kwargs.update(needs_grad_x=strategy != "forward", needs_grad_weight=strategy != "forward")
    q = flce.plan(shape.num_tokens, shape.vocab_size, shape.hidden_size, dtype, device, **kwargs)
    keys = (
        "strategy",
        "forward_token_chunk",
        "forward_vocab_chunk",
        "backward_token_chunk",
        "backward_vocab_chunk",
        "dw_group_tokens",
    )
    return ", ".join(f"{k} {q[k]}" for k in keys)


def section(
    shape: data.Shape,
    strategy: str,
    device: torch.device,
    dtype: torch.dtype,
    iters: int,
    reps: int,
    top: int,
    budget: int | None = None,  # auto only (main passes None for the other strategies)
    warmup: int = 0,
    kind: str = "lm",
) -> list[str]:
    x, w, y = data.make_inputs(shape, kind, device, dtype, seed=0)
    floor_forward, floor_step = floor_calls(x, w)
    floor = floor_forward if strategy == "forward" else floor_step
    floor()
    floor_ms = time_runs(floor, device, iters)
    del floor, floor_forward, floor_step
    free_memory(device)
    run = _call(strategy, x, w, y, budget)
    x.grad = w.grad = None
    with PeakMemory(device) as peak:
        run()
    # flce measures the algorithm of its dW GEMMs on their first calls (README, Performance):
    # the timed and profiled calls come after most of those (a GEMM run once per call measures
    # for 24 calls, bench/NOTES.md version 13).
    for _ in range(warmup):
        run()
    with ClockSampler(device) as clock:
        ms = time_runs(run, device, iters)
    on_gpu = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=acts) as prof:
        for _ in range(reps):
            run()
        if on_gpu:
            torch.cuda.synchronize(device)
    rows = kernel_rows(prof.events(), on_gpu, reps)
    busy = sum(r[1] for r in rows)
    what = "kernels" if on_gpu else "operators (self CPU time)"
    title = (
        f"## {shape.name} (N={shape.num_tokens}, V={shape.vocab_size}, "
        f"D={shape.hidden_size}), {strategy}"
        + ("" if budget is None else f" at a budget of {budget / 2**20:.0f} MiB")
    )
    summary = (
        f"{ms:.2f} ms per call, floor {floor_ms:.2f} ms ({ms / floor_ms:.2f}x); {what} "
        f"{busy:.2f} ms per call. {clock.describe()}."
    )
    if peak.extra is not None:
        # The gradients themselves are not extra: they are what any method returns.
        grads = 0 if strategy == "forward" else grad_bytes(shape, x.element_size())
        summary += f" Memory beyond the gradients: {(peak.extra - grads) / 2**20:.0f} MiB."
    summary += f" Plan: {_plan_summary(shape, strategy, dtype, device, budget)}."
    header = (
        f"| {'kernel' if on_gpu else 'operator'} | ms per call | "
        f"{'launches' if on_gpu else 'calls'} per call | share |"
    )
    lines = [title, "", summary, "", header, "|---|---|---|---|"]
    for label, k_ms, k_count in rows[:top]:
        lines.append(f"| {label} | {k_ms:.3f} | {k_count:g} | {k_ms / busy:.1%} |")
    if len(rows) > top:
        rest = sum(r[1] for r in rows[top:])
        lines.append(f"| ({len(rows) - top} more) | {rest:.3f} | - | {rest / busy:.1%} |")
    lines.append("")
    del x, w, y, run
    free_memory(device)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shapes", default=",".join(data.SHAPES), help="benchmark shape names")
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME:N:V:D",
        help="a shape outside the table (repeatable)",
    )
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="calls before the timed ones (most of flce's measured GEMMs settle their algorithm in "
        "them; one called once per call takes 24)",
    )
    p.add_argument("--iters", type=int, default=7, help="timed calls (median)")
    p.add_argument("--reps", type=int, default=3, help="profiled calls (averaged)")
    p.add_argument("--top", type=int, default=12, help="rows per table")
    p.add_argument(
        "--budgets-mib",
        default="",
        help="memory budgets of the auto strategy, comma-separated; 'default' (the default) is flce's",
    )
    p.add_argument(
        "--data",
        default="lm",
        choices=data.KINDS,
        help="the inputs' kind (flce.bench.data): lm-like, flat or peaked (CCE's) logits",
    )
    p.add_argument("--out", default="build-bench")
    args = p.parse_args(argv)
    if args.warmup < 0 or args.iters < 1 or args.reps < 1:
        p.error(
            f"--warmup must be >= 0 and --iters, --reps >= 1, got {args.warmup}, {args.iters} "
            f"and {args.reps}"
        )
    strategies = [s for s in args.strategies.split(",") if s]
    for s in strategies:
        if s not in STRATEGIES:
            p.error(f"--strategies: unknown {s!r}; expected some of {', '.join(STRATEGIES)}")
    if args.shape:
        shapes = [data.parse_shape(s) for s in args.shape]
    else:
        names = [s for s in args.shapes.split(",") if s]
        for n in names:
            if n not in data.SHAPES:
                p.error(f"--shapes: unknown {n!r}; expected some of {', '.join(data.SHAPES)}")
        shapes = [data.SHAPES[n] for n in names]
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        gpu = torch.cuda.get_device_name(device)
        dtype = torch.bfloat16
    else:
        gpu, dtype = "cpu", torch.float32
    rev = _git_revision(_repo_root())
    lines = [
        f"# flce kernel tables on {gpu}",
        "",
        f"Date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch "
        f"{torch.__version__}; flce {anchors.version_of('flce')}"
        + (f" (git {rev})" if rev else "")
        + f"; {str(dtype).removeprefix('torch.')}, {args.data} data, 10% ignored labels; times: median of "
        f"{args.iters} calls after {args.warmup} warm-up calls, kernels: mean of {args.reps} "
        "profiled calls.",
        "",
    ]
    try:
        budgets = [
            None if b == "default" else int(float(b) * 2**20)
            for b in args.budgets_mib.split(",")
            if b
        ] or [None]
    except ValueError:
        p.error(f"--budgets-mib: expected numbers, got {args.budgets_mib!r}")
    for shape in shapes:
        for strategy in strategies:
            for budget in budgets if strategy == "auto" else [None]:
                block = section(
                    shape,
                    strategy,
                    device,
                    dtype,
                    args.iters,
                    args.reps,
                    args.top,
                    budget,
                    warmup=args.warmup,
                    kind=args.data,
                )
                print("\n".join(block), flush=True)
                lines += block
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{gpu_slug(gpu) if device.type == 'cuda' else 'cpu'}-kernels.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
