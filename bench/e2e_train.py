"""End-to-end training benchmark: one Llama-architecture model trained with each loss.

    python bench/e2e_train.py                        # default run, about 4-6 minutes on one H100
    python bench/e2e_train.py --quick                # smaller model and sequence, about 2 minutes
    python bench/e2e_train.py --methods hf,flce --steps 40 --seq 4096 --gradient-checkpointing

The model: LlamaForCausalLM initialised from a config (no download) with Llama-3.2-1B's shapes
except a smaller MLP: 16 layers, hidden 2048, 32 query / 8 key-value heads, intermediate 5632,
vocab 128256, tied embeddings: 0.98B parameters. bf16 weights, fused AdamW (its states in bf16
like the weights), SDPA attention, sequence --seq (2048), random tokens with labels = inputs and
10% of labels set to -100. No gradient checkpointing unless --gradient-checkpointing (with it, the
loss dominates activation memory and the differences grow).

The losses ("methods"), each applied to an otherwise identical model:
  hf     transformers' own: lm_head logits [B, T, V] in bf16, then ForCausalLMLoss (float32)
  flce   flce.integrations.transformers.patch(model)
  liger  liger_kernel's apply_liger_kernel_to_llama(model=model) with only
         fused_linear_cross_entropy on (RoPE, RMSNorm, SwiGLU kernels off: only the loss differs)
  cce    Cut Cross-Entropy: cut_cross_entropy.transformers.cce_patch(model) when the installed
         package has it, else CCE's linear_cross_entropy kernel inside flce's transformers
         integration (same plumbing as flce, so only the kernel differs; said so in the table)
Methods whose package is missing are reported as skipped.

Each method runs in its own subprocess: some libraries patch classes process-wide, and every
method starts with an empty allocator. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for all.
Per method:
  1. --warmup steps, then --steps timed optimizer steps (forward, backward, AdamW step) at the
     common batch --batch: tokens/s (wall clock between two CUDA synchronizations) and the peak
     of torch.cuda.max_memory_allocated over the timed steps (weights, gradients, optimizer
     states, activations and the loss together).
  2. The largest batch that fits: doubling from --batch (halving when --batch itself does not
     fit), then bisection to within 1/16, each candidate running 2 optimizer steps; an
     out-of-memory error is caught and memory freed before the next candidate. Then tokens/s at
     that batch over 3 steps after 1 warm-up step.
The first and last losses of step 1 are reported: all methods start from the same seed and see
the same batches, so their first losses must agree (to bf16 forward noise) - a correctness check.

Output: a markdown table (GPU name, torch / transformers / package versions, date, command) at
--out (default bench/results/e2e_<gpu>.md) and the raw numbers next to it as .json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("hf", "flce", "liger", "cce")
RESULT_TAG = "E2E_RESULT "

# name -> LlamaConfig fields. "default" is the documented ~1B model; "quick" keeps the vocabulary
# (the loss is what is measured) and shrinks the trunk.
MODELS = {
    "default": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
                "num_attention_heads": 32, "num_key_value_heads": 8},
    "quick": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
              "num_attention_heads": 16, "num_key_value_heads": 4},
}
VOCAB = 128256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list from {', '.join(METHODS)} (default: all)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20, quick 5)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048, quick 1024)")
    p.add_argument("--batch", type=int, default=None,
                   help="common batch size for the timed run (default 4, quick 2)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="upper end of the largest-batch search (default 128, quick 32)")
    p.add_argument("--no-search", action="store_true", help="skip the largest-batch search")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="4-layer hidden-1024 trunk (vocab kept), seq 1024, 5 steps: a smoke run")
    p.add_argument("--out", default=None,
                   help="markdown path (default bench/results/e2e_<gpu>[_quick].md); JSON beside it")
    p.add_argument("--worker-timeout", type=int, default=300, help="seconds per method")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 20)
    args.seq = args.seq or (1024 if args.quick else 2048)
    args.batch = args.batch or (2 if args.quick else 4)
    args.max_batch = args.max_batch or (32 if args.quick else 128)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; expected a comma list from {METHODS}")
    return args


# ----------------------------------------------------------------------------------------------
# Worker: one method in its own process


class Skipped(Exception):
    """The method's package is not importable here."""


def build_model(args):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=max(args.seq, 2048), tie_word_embeddings=True,
        rope_theta=500000.0, attn_implementation="sdpa",
        **MODELS["quick" if args.quick else "default"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def apply_method(model, method: str) -> str:
    """Installs the loss; returns a note for the table."""
    if method == "hf":
        return ""
    if method == "flce":
        import flce
        from flce.integrations.transformers import patch

        if not flce.cuda_available():
            raise RuntimeError("flce was built without its CUDA backend")
        patch(model)
        return ""
    if method == "liger":
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except ImportError as e:
            raise Skipped(f"liger_kernel not importable ({e})") from None
        apply_liger_kernel_to_llama(rope=False, cross_entropy=False, fused_linear_cross_entropy=True,
                                    rms_norm=False, swiglu=False, model=model)
        return "loss kernel only"
    if method == "cce":
        try:
            import cut_cross_entropy
        except ImportError as e:
            raise Skipped(f"cut_cross_entropy not importable ({e})") from None
        try:
            from cut_cross_entropy.transformers import cce_patch
        except ImportError:
            cce_patch = None
        if cce_patch is not None:
            patched = cce_patch(model, impl="cce", reduction="mean")
            if patched is not None and patched is not model:
                raise RuntimeError("cce_patch returned a new model object; not supported here")
            return "cce_patch"
        # This CCE release has no transformers patch: run its kernel through flce's integration.
        import flce
        from flce.integrations.transformers import patch

        def cce_kernel(x, weight, target, bias=None, *, ignore_index=-100, reduction="mean",
                       softcap=None, logit_scale=1.0, shift=0, **unused):
            if bias is not None or logit_scale != 1.0 or unused:
                raise RuntimeError("the CCE kernel takes no bias, logit_scale or other options")
            return cut_cross_entropy.linear_cross_entropy(
                x, weight, target, ignore_index=ignore_index, softcap=softcap,
                reduction=reduction, shift=bool(shift))

        flce.linear_cross_entropy = cce_kernel
        patch(model)
        return "CCE kernel via flce's HF patch"
    raise ValueError(f"method: unknown {method!r}")


def make_batch(batch: int, seq: int, step: int):
    import torch

    g = torch.Generator(device="cuda").manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (batch, seq), device="cuda", generator=g)
    labels = ids.clone()
    labels[torch.rand(batch, seq, device="cuda", generator=g) < 0.1] = -100
    return ids, labels


def train_step(model, opt, ids, labels):
    out = model(input_ids=ids, labels=labels, use_cache=False)
    loss = out.loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def free_memory(opt):
    import torch

    opt.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()


def timed_run(model, opt, batch, seq, warmup, steps, first_step=0):
    """(tokens/s, peak bytes, losses) over `steps` steps after `warmup` steps."""
    import torch

    losses = []
    for i in range(warmup):
        losses.append(train_step(model, opt, *make_batch(batch, seq, first_step + i)))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        losses.append(train_step(model, opt, *make_batch(batch, seq, first_step + warmup + i)))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    return batch * seq * steps / elapsed, peak, torch.stack(losses).float().tolist()


def fits(model, opt, batch, seq) -> bool:
    import torch

    ok = True
    try:
        for i in range(2):
            train_step(model, opt, *make_batch(batch, seq, 500 + i))
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        ok = False
    free_memory(opt)
    print(f"  batch {batch}: {'fits' if ok else 'out of memory'}", file=sys.stderr, flush=True)
    return ok


def largest_batch(model, opt, args, start_fits: bool) -> int:
    lo, hi = (args.batch, None) if start_fits else (0, args.batch)
    if not start_fits:
        b = args.batch // 2
        while b >= 1 and not fits(model, opt, b, args.seq):
            hi, b = b, b // 2
        lo = b
        if lo == 0:
            return 0
    else:
        b = lo * 2
        while b <= args.max_batch:
            if fits(model, opt, b, args.seq):
                lo, b = b, b * 2
            else:
                hi = b
                break
    if hi is None:
        return lo  # reached --max-batch
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        if fits(model, opt, mid, args.seq):
            lo = mid
        else:
            hi = mid
    return lo


def worker(args) -> dict:
    import torch

    method = args.worker
    result = {"method": method}
    try:
        model = build_model(args)
        result["params"] = sum(p.numel() for p in model.parameters())
        result["note"] = apply_method(model, method)
    except Skipped as e:
        return {**result, "status": "skipped", "error": str(e)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    result["static_bytes"] = torch.cuda.memory_allocated()
    try:
        tps, peak, losses = timed_run(model, opt, args.batch, args.seq, args.warmup, args.steps)
        result.update(tokens_per_s=tps, peak_bytes=peak, first_loss=losses[0],
                      last_loss=losses[-1], status="ok")
        common_fits = True
    except torch.cuda.OutOfMemoryError:
        result.update(status="oom at --batch")
        common_fits = False
        free_memory(opt)
    if not args.no_search:
        best = largest_batch(model, opt, args, common_fits)
        result["max_batch"] = best
        result["max_batch_capped"] = best >= args.max_batch
        if best > 0:
            tps, peak, _ = timed_run(model, opt, best, args.seq, 1, 3, first_step=900)
            result.update(max_batch_tokens_per_s=tps, max_batch_peak_bytes=peak)
    return result


# ----------------------------------------------------------------------------------------------
# Driver


def gpu_slug(name: str) -> str:
    m = re.search(r"(H100|H200|H20|A100|A10G|L40S|L4|B200|GB200|B100|RTX ?\w+)", name, re.IGNORECASE)
    return (m.group(1) if m else name).lower().replace(" ", "")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    dists = {"torch": "torch", "transformers": "transformers", "liger_kernel": "liger-kernel",
             "cut_cross_entropy": "cut-cross-entropy", "flce": "flce"}
    for name, dist in dists.items():
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = None
    try:
        out["flce_git"] = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        # A copy of the tree without its .git: the package version is all there is.
        out["flce_git"] = out["flce"]
    return out


def run_method(method: str, argv: list[str], timeout: int) -> dict:
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", method]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"method": method, "status": f"timed out after {timeout} s"}
    sys.stderr.write(proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or [""]
        return {"method": method, "status": f"failed (exit {proc.returncode})",
                "error": last[0][:300]}
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["wall_s"] = time.perf_counter() - start
    return result


def gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.1f}"


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(meta: dict, results: list[dict]) -> str:
    a = meta["args"]
    base = next((r for r in results if r["method"] == "hf" and r.get("tokens_per_s")), None)
    lines = [
        (f"# End-to-end training: Llama {meta['params'] / 1e9:.2f}B, vocab {VOCAB}, "
        f"seq {a['seq']}{' (quick)' if a['quick'] else ''}"),
        "",
        (f"GPU: {meta['gpu']}; torch {meta['versions']['torch']}, transformers "
        f"{meta['versions']['transformers']}, liger-kernel {meta['versions']['liger_kernel']}, "
        f"cut-cross-entropy {meta['versions']['cut_cross_entropy']}, flce {meta['versions']['flce_git']}"
        f"; {meta['date']}."),
        (f"bf16 weights, fused AdamW, SDPA, gradient checkpointing "
        f"{'on' if a['gradient_checkpointing'] else 'off'}; timed {a['steps']} steps after "
        f"{a['warmup']} warm-up at batch {a['batch']} ({a['batch'] * a['seq']} tokens/step). "
        f"Command: `{meta['command']}`"),
        "",
        (f"| method | tokens/s @ batch {a['batch']} | vs hf | peak GiB @ batch {a['batch']} | "
        "largest batch | tokens/s @ largest | peak GiB @ largest | first loss | last loss | note |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.get("status") not in ("ok", "oom at --batch"):
            error = f": {r['error']}" if r.get("error") else ""
            lines.append(f"| {r['method']} | {r.get('status')}{error} | | | | | | | | |")
            continue
        tps = r.get("tokens_per_s")
        ratio = f"{tps / base['tokens_per_s']:.3f}" if (tps and base) else "-"
        mb = r.get("max_batch")
        cells = [
            r["method"],
            "OOM" if tps is None else f"{tps:,.0f}",
            ratio,
            gib(r.get("peak_bytes")),
            "-" if mb is None else f"{mb}{'+' if r.get('max_batch_capped') else ''}",
            _number(r.get("max_batch_tokens_per_s"), ",.0f"),
            gib(r.get("max_batch_peak_bytes")),
            _number(r.get("first_loss"), ".4f"),
            _number(r.get("last_loss"), ".4f"),
            r.get("note", ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    weights = gib(next((r["static_bytes"] for r in results if r.get("static_bytes")), None))
    lines += ["", ("Largest batch: within 1/16 by bisection; '+' means the search cap "
                   "(--max-batch) was reached. Peak GiB counts everything allocated: weights "
                   f"({weights} GiB), gradients, AdamW states, activations and the loss."), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker(args)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("e2e_train.py needs a CUDA GPU", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    passthrough = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seq",
                   str(args.seq), "--batch", str(args.batch), "--max-batch", str(args.max_batch)]
    for flag in ("quick", "no_search", "gradient_checkpointing"):
        if getattr(args, flag):
            passthrough.append("--" + flag.replace("_", "-"))
    results = []
    for method in args.methods:
        print(f"[e2e] {method} ...", file=sys.stderr, flush=True)
        r = run_method(method, passthrough, args.worker_timeout)
        print(f"[e2e] {method}: {json.dumps(r)}", file=sys.stderr, flush=True)
        results.append(r)

    meta = {
        "gpu": gpu,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "versions": versions(),
        "command": " ".join(["python", "bench/e2e_train.py", *(argv if argv is not None
                                                                else sys.argv[1:])]),
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "params": next((r["params"] for r in results if r.get("params")), 0),
    }
    out = args.out or os.path.join(
        ROOT, "bench", "results", f"e2e_{gpu_slug(gpu)}{'_quick' if args.quick else ''}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    text = markdown(meta, results)
    with open(out, "w") as f:
        f.write(text)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(text)
    print(f"[e2e] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
