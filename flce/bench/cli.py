"""Command line of `python -m flce.bench` (run with --help)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile

import torch

from . import anchors, report
from .data import KINDS, QUICK_SHAPE, SHAPES, parse_shape
from .methods import DEFAULT_RECOMPUTE_BUDGET, METHODS
from .runner import SCALING_METHODS, Progress, Settings, run_case, run_scaling

DEFAULT_SCALING_N = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
# Data kinds other than lm matter where speed depends on the data (gradient filtering); by
# default they run at the CCE paper's shape only, to keep the full run short.
DEFAULT_EXTRA_KIND_SHAPES = ("gemma2",)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flce.bench",
        description="Fused linear cross-entropy benchmark: flce against the GEMM floor, PyTorch "
        "(eager and torch.compile), Cut Cross-Entropy and Liger, with a float64 reference.",
    )
    p.add_argument(
        "--quick", action="store_true", help=f"one shape ({QUICK_SHAPE}), lm data, no scaling study"
    )
    p.add_argument(
        "--shapes",
        type=_csv,
        default=None,
        help=f"comma list from {', '.join(SHAPES)} (default: all)",
    )
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME:N:V:D",
        help="an extra shape outside the table (repeatable)",
    )
    p.add_argument(
        "--methods",
        type=_csv,
        default=None,
        help=f"comma list from {', '.join(METHODS)} (default: all)",
    )
    p.add_argument(
        "--kinds",
        type=_csv,
        default=None,
        help=f"comma list from {', '.join(KINDS)}; default: lm for every shape, plus "
        f"flat and cce at {', '.join(DEFAULT_EXTRA_KIND_SHAPES)}",
    )
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke tests only)")
    p.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="untimed fwd+bwd runs before the measurements (compilation, autotuning; most of "
        "flce's dW GEMMs settle their algorithm in up to 8, one called once per step in 24)",
    )
    p.add_argument("--iters", type=int, default=7, help="timed runs per measurement (median)")
    p.add_argument(
        "--softcap",
        type=float,
        default=None,
        help="apply softcap (e.g. 30 for Gemma-2) in every method and the reference",
    )
    p.add_argument(
        "--recompute-budget",
        type=int,
        default=DEFAULT_RECOMPUTE_BUDGET,
        help="memory_budget in bytes for flce_recompute (default 60 MiB)",
    )
    p.add_argument(
        "--no-forward-only", action="store_true", help="skip the torch.no_grad forward measurements"
    )
    p.add_argument(
        "--scaling-n",
        type=_csv,
        default=None,
        help="token counts of the scaling study (default 1024..65536; 'none' skips)",
    )
    p.add_argument("--scaling-v", type=int, default=SHAPES["llama3"].vocab_size)
    p.add_argument("--scaling-d", type=int, default=SHAPES["llama3"].hidden_size)
    p.add_argument("--scaling-methods", type=_csv, default=list(SCALING_METHODS))
    p.add_argument("--scaling-iters", type=int, default=3)
    p.add_argument(
        "--out",
        default=os.path.join("bench", "results"),
        help="output folder (default bench/results)",
    )
    p.add_argument(
        "--tag",
        default=None,
        help="suffix of the output names; default 'quick' with --quick, 'partial' "
        "when shapes/methods/kinds are filtered, none for the full run",
    )
    p.add_argument(
        "--anchor-wheels",
        default=None,
        help="folder of anchor wheels to unpack when the anchors are not installed "
        "(default: .whl at the repository root)",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="merge into the existing <out>/<gpu>[-tag].json: keep its results for the "
        "cases not measured now (to split a full run over several commands)",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--replot",
        metavar="JSON",
        default=None,
        help="only rewrite the markdown and the plots of an earlier run from its JSON (no device)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in args.methods or []:
        if name not in METHODS:
            p.error(f"--methods: unknown method {name!r}; expected some of {', '.join(METHODS)}")
    for name in args.scaling_methods:
        if name not in METHODS or name == "floor":
            p.error(f"--scaling-methods: unknown method {name!r}")
    for name in args.shapes or []:
        if name not in SHAPES:
            p.error(f"--shapes: unknown shape {name!r}; expected some of {', '.join(SHAPES)}")
    for name in args.kinds or []:
        if name not in KINDS:
            p.error(f"--kinds: unknown kind {name!r}; expected some of {', '.join(KINDS)}")
    try:
        args.extra_shapes = [parse_shape(s) for s in args.shape]
    except ValueError as e:
        p.error(str(e))
    if args.iters < 1 or args.warmup < 0:
        p.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    return args


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; names without a model token are slugified whole."""
    low = name.lower().replace("nvidia", " ")
    m = re.search(r"\b([a-z]{1,3}\d{2,4}[a-z]?)\b", low)
    if m:
        return m.group(1)
    return re.sub(r"[^a-z0-9]+", "-", low).strip("-") or "gpu"


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _git_revision(root: str) -> str | None:
    try:
        rev = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def collect_meta(args, device: torch.device, argv: list[str]) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = torch.cuda.get_device_name(device)
        hw = {
            "sm_count": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    else:
        gpu, hw = f"CPU ({platform.processor() or platform.machine()})", {}
    versions = {"torch": torch.__version__}
    for module in ("triton", "flce", "cut_cross_entropy", "liger_kernel"):
        versions[module] = anchors.version_of(module) or "not installed"
    rev = _git_revision(_repo_root())
    if rev:
        versions["flce"] += f" (git {rev})"
    return {
        "gpu": gpu,
        "gpu_slug": gpu_slug(gpu) if device.type == "cuda" else "cpu",
        "hardware": hw,
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m flce.bench " + " ".join(shlex.quote(a) for a in argv),
        "timer": "CUDA events" if device.type == "cuda" else "wall clock (CPU)",
        "warmup": args.warmup,
        "iters": args.iters,
        "softcap": args.softcap,
        "recompute_budget": args.recompute_budget,
        "dtype": "bfloat16",
        "reduction": "mean",
        "ignored_fraction": 0.1,
        # flce's switches read from the environment (FLCE_GEMM_TUNING, ...) change what is
        # measured, so the report names them.
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FLCE_")},
    }


def plan_cases(args) -> list[tuple]:
    shapes = [SHAPES[n] for n in (args.shapes or ([] if args.extra_shapes else list(SHAPES)))]
    if args.quick and not args.shapes and not args.extra_shapes:
        shapes = [SHAPES[QUICK_SHAPE]]
    shapes += args.extra_shapes
    cases = []
    for shape in shapes:
        if args.kinds:
            kinds = args.kinds
        elif args.quick:
            kinds = ["lm"]
        else:
            kinds = ["lm"] + (["flat", "cce"] if shape.name in DEFAULT_EXTRA_KIND_SHAPES else [])
        cases += [(shape, k) for k in kinds]
    return cases


def replot(path: str) -> int:
    with open(path) as f:
        run = json.load(f)
    prefix = path.removesuffix(".json")
    with open(prefix + ".md", "w") as f:
        f.write(report.markdown(run["meta"], run["results"], run["scaling"]))
    written = report.plots(prefix, run["results"], run["scaling"])
    print(f"wrote {prefix}.md" + "".join(f", {w}" for w in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "python -m flce.bench: --device cuda but torch sees no CUDA device "
            "(use --device cpu for a smoke test)",
            file=sys.stderr,
        )
        return 2
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    root = _repo_root()
    wheels = args.anchor_wheels or os.path.join(root, ".whl")
    # Unpacked anchors go to the (ignored) build folder of a source checkout, else a temp folder.
    unpack = (
        os.path.join(root, "build", "bench_anchors")
        if os.path.exists(os.path.join(root, "setup.py"))
        else os.path.join(tempfile.gettempdir(), "flce_anchors")
    )
    anchor_notes = anchors.prepare_anchors(wheels, unpack)
    methods = [m for m in METHODS if args.methods is None or m in args.methods]
    filtered = bool(args.shapes or args.methods or args.kinds or args.extra_shapes)
    tag = (
        args.tag
        if args.tag is not None
        else ("quick" if args.quick else "partial" if filtered else "")
    )
    if args.scaling_n is None:
        ns = [] if args.quick else list(DEFAULT_SCALING_N)
    else:
        ns = [] if args.scaling_n == ["none"] else [int(n) for n in args.scaling_n]
    settings = Settings(
        device=device,
        warmup=args.warmup,
        iters=args.iters,
        forward_only=not args.no_forward_only,
        softcap=args.softcap,
        recompute_budget=args.recompute_budget,
        scaling_iters=args.scaling_iters,
        seed=args.seed,
    )
    meta = collect_meta(args, device, sys.argv[1:] if argv is None else argv)
    meta["anchors"] = anchor_notes
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, meta["gpu_slug"] + (f"-{tag}" if tag else ""))
    progress = Progress()
    progress.line(
        f"flce benchmark on {meta['gpu']}: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    )
    for note in anchor_notes:
        progress.line(f"anchor {note}")

    rows: list[dict] = []
    scaling: list[dict] = []
    old_rows: list[dict] = []
    old_scaling: list[dict] = []
    if args.append and os.path.exists(prefix + ".json"):
        with open(prefix + ".json") as f:
            old = json.load(f)
        old_rows, old_scaling = old.get("results", []), old.get("scaling", [])
        prev = old.get("meta", {})
        meta["appended_to"] = prev.get("date")
        # The report names every command whose results it holds, in order.
        earlier = prev.get("commands") or ([prev["command"]] if prev.get("command") else [])
        meta["commands"] = [*earlier, meta["command"]]

    def merged() -> tuple[list[dict], list[dict]]:
        new_keys = {(r["shape"], r["kind"], r["method"]) for r in rows}
        kept = [r for r in old_rows if (r["shape"], r["kind"], r["method"]) not in new_keys]
        return kept + rows, scaling or old_scaling

    def save() -> None:
        meta["elapsed_s"] = round(progress.elapsed, 1)
        all_rows, all_scaling = merged()
        report.write_json(prefix + ".json", meta, all_rows, all_scaling)
        with open(prefix + ".md", "w") as f:
            f.write(report.markdown(meta, all_rows, all_scaling))

    # Results are saved after every case so that an interrupted run keeps what it measured.
    # Every record names its GPU, versions and date, so records merged by --append stay
    # attributable.
    stamp = {"gpu": meta["gpu"], "versions": meta["versions"], "date": meta["date"]}
    for shape, kind in plan_cases(args):
        rows += [{**r, **stamp} for r in run_case(shape, kind, methods, settings, progress)]
        save()
    if ns:
        scaling = [
            {**r, **stamp}
            for r in run_scaling(
                ns, args.scaling_v, args.scaling_d, args.scaling_methods, settings, progress
            )
        ]
        save()
    save()
    rows, scaling = merged()
    print()
    print(report.markdown(meta, rows, scaling))
    written = [] if args.no_plots else report.plots(prefix, rows, scaling)
    progress.line(
        f"wrote {prefix}.md, {prefix}.json"
        + "".join(f", {w}" for w in written)
        + ("" if written or args.no_plots else " (no plots: matplotlib missing)")
    )
    return 0
