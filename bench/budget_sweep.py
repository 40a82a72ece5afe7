"""How flce's fwd+bwd time depends on the memory budget: the measurement behind the default
budget (flce.default_memory_budget, see README).

For each benchmark shape (bf16, lm-like data, 10% ignored labels) and each budget, runs
flce.linear_cross_entropy with strategy="auto" and reports the plan the planner chose, the median
fwd+bwd time, its ratio to the cuBLAS floor (three bf16 matmuls) measured in the same run, and the
peak extra memory beyond the gradients. Writes bench/results/<gpu>-budget.md.

    python bench/budget_sweep.py [--shapes gemma2,llama3] [--budgets-gib 1,2,3,4,6]
"""

import argparse
import os

import torch

import flce
from flce.bench import data
from flce.bench.cli import gpu_slug
from flce.bench.measure import PeakMemory, free_memory, time_runs
from flce.bench.runner import floor_calls


def floor_ms(x, w, iters):
    _, step = floor_calls(x, w)
    step()
    return time_runs(step, x.device, iters)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="gemma2,llama3,qwen-0.5b,llama3-4k")
    parser.add_argument("--budgets-gib", default="0.25,1,2,3,4,5,6")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(device)
    lines = [
        f"# flce time against the memory budget on {gpu}",
        "",
        f"torch {torch.__version__}; bf16, lm data, mean reduction, 10% ignored labels; median "
        f"of {args.iters} fwd+bwd runs after a warm-up; `beyond grads` = peak extra memory minus "
        "the bf16 gradients. Command: `python bench/budget_sweep.py`",
        "",
        "| shape | budget GiB | plan | fwd+bwd ms | x floor | beyond grads GiB |",
        "|---|---|---|---|---|---|",
    ]
    for name in args.shapes.split(","):
        shape = data.SHAPES[name]
        x, w, y = data.make_inputs(shape, "lm", device, torch.bfloat16, seed=0)
        fl = floor_ms(x, w, args.iters)
        grads = (shape.num_tokens + shape.vocab_size) * shape.hidden_size * 2
        for gib in (float(b) for b in args.budgets_gib.split(",")):
            budget = int(gib * 2**30)
            try:
                plan = flce.plan(shape.num_tokens, shape.vocab_size, shape.hidden_size,
                                 torch.bfloat16, device, memory_budget=budget)
            except ValueError as e:
                lines.append(f"| {name} | {gib:g} | does not fit: {str(e)[:60]}... | - | - | - |")
                continue
            xr = x.detach().requires_grad_()
            wr = w.detach().requires_grad_()

            def step():
                loss = flce.linear_cross_entropy(xr, wr, y, memory_budget=budget)
                loss.backward()
                xr.grad = None
                wr.grad = None

            step()
            free_memory(device)
            with PeakMemory(device) as peak:
                step()
            ms = time_runs(step, device, args.iters)
            desc = (f"{plan['strategy']} chunk {plan['forward_token_chunk']}"
                    + (f" dW group {plan['dw_group_tokens']}"
                       if plan["strategy"] == "grad_in_forward" else
                       f" bwd {plan['backward_token_chunk']}x{plan['backward_vocab_chunk']}"))
            lines.append(f"| {name} | {gib:g} | {desc} | {ms:.1f} | {ms / fl:.2f} | "
                         f"{(peak.extra - grads) / 2**30:.2f} |")
            print(lines[-1], flush=True)
            del xr, wr
            free_memory(device)
        del x, w, y
        free_memory(device)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{gpu_slug(gpu)}-budget.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("wrote", path)


if __name__ == "__main__":
    main()
