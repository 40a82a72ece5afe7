"""Runs the measurements: per (shape, data kind), the floor, PyTorch, flce and the anchors on the
same inputs against one float64 reference; then memory and time as the token count grows."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable

import torch

from .data import Shape, make_inputs
from .measure import ClockSampler, PeakMemory, describe_error, free_memory, is_oom, time_runs
from .methods import (
    DEFAULT_RECOMPUTE_BUDGET,
    FLCE_METHODS,
    METHODS,
    Options,
    Unavailable,
    compiled_torch_ce,
    flce_plan,
)
from .reference import Reference, reference, relative_error

GiB = float(1 << 30)


@dataclasses.dataclass
class Settings:
    device: torch.device
    warmup: int = 10
    iters: int = 7
    forward_only: bool = True
    softcap: float | None = None
    recompute_budget: int = DEFAULT_RECOMPUTE_BUDGET
    scaling_iters: int = 3
    seed: int = 0


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def fmt_bytes(v) -> str:
    if v is None:
        return "-"
    if abs(v) >= (1 << 30):
        return f"{v / GiB:.2f} GiB"
    return f"{v / (1 << 20):.0f} MiB"


def fmt_err(v) -> str:
    return "-" if v is None else f"{v:.1e}"


class Progress:
    """One flushed line per measurement, prefixed with the time since the run began."""

    def __init__(self, stream=None):
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stdout
        self._open = False

    def start(self, text: str) -> None:
        self.stream.write(f"[{time.perf_counter() - self.t0:7.1f} s] {text}")
        self.stream.flush()
        self._open = True

    def end(self, text: str) -> None:
        self.stream.write(f"{text}\n")
        self.stream.flush()
        self._open = False

    def line(self, text: str) -> None:
        if self._open:
            self.end("")
        self.start(text)
        self.end("")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _clear_grads(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.grad = None


def _base_row(shape: Shape, kind: str, name: str) -> dict:
    return {
        "shape": shape.name,
        "kind": kind,
        "method": name,
        "description": METHODS[name].description if name in METHODS else name,
        "N": shape.num_tokens,
        "V": shape.vocab_size,
        "D": shape.hidden_size,
        "status": "ok",
        "error": None,
        "notes": {},
        "memory_budget": None,
        "plan": None,
        "fwd_ms": None,
        "fwd_bwd_ms": None,
        "fwd_only_ms": None,
        "ratio_floor": None,
        "ratio_compile": None,
        "fwd_ratio_floor": None,
        "fwd_ratio_compile": None,
        "tflops": None,
        "extra_bytes": None,
        "extra_minus_grads_bytes": None,
        "fwd_only_extra_bytes": None,
        "loss": None,
        "loss_ref": None,
        "loss_rel_err": None,
        "dx_rel_err": None,
        "dw_rel_err": None,
        "sm_clock_mhz": None,
        "power_w": None,
    }


def grad_bytes(shape: Shape, elem: int = 2) -> int:
    return (shape.num_tokens + shape.vocab_size) * shape.hidden_size * elem


def floor_calls(x: torch.Tensor, w: torch.Tensor) -> tuple[Callable, Callable]:
    """The floor's GEMMs into outputs allocated here: (forward: Z = x W^T; step: Z, then
    dx = Z W and dW = Z^T x)."""
    xd, wd = x.detach(), w.detach()
    z = torch.empty(xd.shape[0], wd.shape[0], dtype=xd.dtype, device=xd.device)
    dx, dw = torch.empty_like(xd), torch.empty_like(wd)

    def forward():
        torch.matmul(xd, wd.T, out=z)

    def step():
        torch.matmul(xd, wd.T, out=z)
        torch.matmul(z, wd, out=dx)
        torch.matmul(z.T, xd, out=dw)

    return forward, step


def _timed_with_clock(step, s: Settings, row: dict, before=None) -> float:
    """time_runs of the fwd+bwd step, with the median SM clock and board power during it in the
    row (None where NVML does not answer): the board may be power-capped, and a method that
    draws more power runs at a lower clock than the floor it is compared with."""
    with ClockSampler(s.device) as clock:
        ms = time_runs(step, s.device, s.iters, before=before)
    row["sm_clock_mhz"], row["power_w"] = clock.medians()
    return ms


def measure_floor(shape: Shape, kind: str, x: torch.Tensor, w: torch.Tensor, s: Settings) -> dict:
    row = _base_row(shape, kind, "floor")
    try:
        with PeakMemory(s.device) as mem:
            forward, step = floor_calls(x, w)

        for _ in range(s.warmup):
            step()
        row["fwd_ms"] = time_runs(forward, s.device, s.iters)
        row["fwd_bwd_ms"] = _timed_with_clock(step, s, row)
        row["fwd_only_ms"] = row["fwd_ms"]
        row["extra_bytes"] = mem.extra
        row["fwd_only_extra_bytes"] = mem.extra
        if mem.extra is not None:
            row["extra_minus_grads_bytes"] = mem.extra - grad_bytes(shape, x.element_size())
    except Exception as e:  # noqa: BLE001 - a failure is reported, never hidden
        row["status"], row["error"] = "failed", describe_error(e)
    return row


def _measure_forward_only(fn, x, w, y, s: Settings, row: dict) -> None:
    """Time and memory of a torch.no_grad forward. A method may refuse it (flce's forced
    grad_in_forward has no gradient to compute): that is noted, the rest of the row stands."""
    try:
        with torch.no_grad():
            fn(x, w, y)  # compiles / autotunes the no_grad variant outside the measurement
            free_memory(s.device, collect=False)
            with PeakMemory(s.device) as mem:
                fn(x, w, y)
            row["fwd_only_extra_bytes"] = mem.extra
            row["fwd_only_ms"] = time_runs(lambda: fn(x, w, y), s.device, s.iters)
    except Exception as e:  # noqa: BLE001 - reported in the row's notes
        row["notes"]["forward_only_error"] = describe_error(e)
    finally:
        free_memory(s.device, collect=False)


def measure_method(
    name: str,
    shape: Shape,
    kind: str,
    x: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor,
    ref: Reference | None,
    s: Settings,
) -> dict:
    row = _base_row(shape, kind, name)
    opts = Options(device=s.device, softcap=s.softcap, recompute_budget=s.recompute_budget)
    if name in FLCE_METHODS:
        strategy, budget_attr = FLCE_METHODS[name]
        budget = getattr(s, budget_attr) if budget_attr else None
        row["memory_budget"] = budget
        row["plan"] = flce_plan(shape, x.dtype, s.device, strategy, budget)
    phase = "build"
    try:
        fn = METHODS[name].build(opts, row["notes"])

        def step():
            fn(x, w, y).backward()

        def clear():
            _clear_grads(x, w)

        phase = "warm-up"
        for _ in range(s.warmup):
            clear()
            step()
        clear()
        free_memory(s.device, collect=False)

        phase = "fwd+bwd (memory, accuracy)"
        with PeakMemory(s.device) as mem:
            loss = fn(x, w, y)
            loss.backward()
        row["extra_bytes"] = mem.extra
        if mem.extra is not None:
            row["extra_minus_grads_bytes"] = mem.extra - grad_bytes(shape, x.element_size())
        row["loss"] = float(loss.detach().float())
        if ref is not None:
            row["loss_ref"] = ref.loss
            row["loss_rel_err"] = abs(row["loss"] - ref.loss) / max(abs(ref.loss), 1e-30)
            if x.grad is None or w.grad is None:
                raise RuntimeError("no gradient for x or W after backward")
            row["dx_rel_err"] = relative_error(x.grad, ref.grad_x)
            row["dw_rel_err"] = relative_error(w.grad, ref.grad_weight)
        del loss
        clear()
        free_memory(s.device, collect=False)

        phase = "fwd"
        row["fwd_ms"] = time_runs(lambda: fn(x, w, y), s.device, s.iters)
        free_memory(s.device, collect=False)
        phase = "fwd+bwd"
        row["fwd_bwd_ms"] = _timed_with_clock(step, s, row, before=clear)
        clear()
        free_memory(s.device, collect=False)

        if s.forward_only:
            _measure_forward_only(fn, x, w, y, s, row)
    except Unavailable as e:
        row["status"], row["error"] = "skipped", str(e)
    except Exception as e:  # noqa: BLE001 - a failure is reported with its error, never hidden
        row["status"], row["error"] = "failed", f"{phase}: {describe_error(e)}"
    finally:
        _clear_grads(x, w)
        free_memory(s.device)
    return row


def add_ratios(rows: list[dict], shape: Shape) -> None:
    by = {r["method"]: r for r in rows}
    floor = by.get("floor", {}).get("fwd_bwd_ms")
    floor_fwd = by.get("floor", {}).get("fwd_ms")
    comp = by.get("torch_compile", {}).get("fwd_bwd_ms")
    comp_fwd = by.get("torch_compile", {}).get("fwd_ms")
    for r in rows:
        t = r["fwd_bwd_ms"]
        if t:
            r["tflops"] = shape.flops_6nvd / (t * 1e-3) / 1e12
            r["ratio_floor"] = t / floor if floor else None
            r["ratio_compile"] = t / comp if comp else None
        if r["fwd_ms"]:
            r["fwd_ratio_floor"] = r["fwd_ms"] / floor_fwd if floor_fwd else None
            r["fwd_ratio_compile"] = r["fwd_ms"] / comp_fwd if comp_fwd else None


def summary_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status'].upper()}: {r['error']}"
    parts = [f"fwd {fmt_ms(r['fwd_ms'])} ms", f"fwd+bwd {fmt_ms(r['fwd_bwd_ms'])} ms"]
    ratios = []
    if r["ratio_floor"] is not None:
        ratios.append(f"{r['ratio_floor']:.2f}x floor")
    if r["ratio_compile"] is not None:
        ratios.append(f"{r['ratio_compile']:.2f}x compile")
    if r["method"] == "floor" and r["tflops"]:
        ratios.append(f"{r['tflops']:.0f} TFLOP/s")
    if ratios:
        parts[-1] += " (" + ", ".join(ratios) + ")"
    if r["extra_bytes"] is not None:
        parts.append(
            f"mem {fmt_bytes(r['extra_bytes'])} "
            f"({fmt_bytes(r['extra_minus_grads_bytes'])} beyond grads)"
        )
    if r["fwd_only_ms"] is not None and r["method"] != "floor":
        parts.append(
            f"no_grad {fmt_ms(r['fwd_only_ms'])} ms {fmt_bytes(r['fwd_only_extra_bytes'])}"
        )
    if r["dx_rel_err"] is not None:
        parts.append(
            f"err loss {fmt_err(r['loss_rel_err'])} dx {fmt_err(r['dx_rel_err'])} "
            f"dW {fmt_err(r['dw_rel_err'])}"
        )
    return " | ".join(parts)


def run_case(
    shape: Shape, kind: str, methods: list[str], s: Settings, progress: Progress
) -> list[dict]:
    label = f"{shape.name}/{kind}"
    progress.start(f"{label:<18} inputs ")
    t = time.perf_counter()
    x, w, y = make_inputs(shape, kind, s.device, seed=s.seed)
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    msg = f"{time.perf_counter() - t:.1f} s"
    ref = None
    if any(m != "floor" for m in methods):
        t = time.perf_counter()
        ref = reference(x, w, y, softcap=s.softcap)
        msg += (
            f", float64 reference {time.perf_counter() - t:.1f} s (loss {ref.loss:.5f}, "
            f"{ref.valid_tokens} valid tokens)"
        )
    free_memory(s.device)
    progress.end(msg)
    rows = []
    for name in methods:
        progress.start(f"{label:<18} {name:<15} ")
        if name == "floor":
            row = measure_floor(shape, kind, x, w, s)
        else:
            row = measure_method(name, shape, kind, x, w, y, ref, s)
        rows.append(row)
        add_ratios(rows, shape)
        progress.end(summary_line(row))
    del x, w, y, ref
    free_memory(s.device)
    return rows


SCALING_METHODS = ("flce_auto", "torch", "torch_compile")


def _scaling_point(
    name: str,
    shape: Shape,
    x: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor,
    s: Settings,
    row: dict,
) -> None:
    if name == "torch_compile":
        # One dynamic-shape graph for the whole series instead of a compile per N.
        comp = compiled_torch_ce(dynamic=True)

        def fn(a, b, c):
            return comp(a, b, c, s.softcap)

        row["notes"] = {"compile": "dynamic=True"}
    else:
        fn = METHODS[name].build(
            Options(device=s.device, softcap=s.softcap, recompute_budget=s.recompute_budget), {}
        )

    def step():
        fn(x, w, y).backward()

    def clear():
        _clear_grads(x, w)

    clear()
    step()  # warm-up (compilation, autotuning)
    clear()
    free_memory(s.device, collect=False)
    with PeakMemory(s.device) as mem:
        step()
    row["extra_bytes"] = mem.extra
    if mem.extra is not None:
        row["extra_minus_grads_bytes"] = mem.extra - grad_bytes(shape, x.element_size())
    clear()
    free_memory(s.device, collect=False)
    row["fwd_bwd_ms"] = time_runs(step, s.device, s.scaling_iters, before=clear)


def run_scaling(
    ns: list[int], vocab: int, hidden: int, methods: list[str], s: Settings, progress: Progress
) -> list[dict]:
    """Peak extra memory and fwd+bwd time as N grows; an OOM ends that method's series."""
    rows = []
    oom_at: dict[str, int] = {}
    for n in ns:
        shape = Shape(f"N={n}", n, vocab, hidden)
        try:
            x, w, y = make_inputs(shape, "lm", s.device, seed=s.seed)
        except Exception as e:  # noqa: BLE001
            progress.line(f"scaling N={n}: inputs failed: {describe_error(e)}")
            break
        for name in methods:
            row = {
                "method": name,
                "N": n,
                "V": vocab,
                "D": hidden,
                "status": "ok",
                "error": None,
                "fwd_bwd_ms": None,
                "extra_bytes": None,
                "extra_minus_grads_bytes": None,
                "notes": {},
            }
            rows.append(row)
            progress.start(f"{'scaling N=' + str(n):<18} {name:<15} ")
            if name in oom_at:
                row["status"], row["error"] = "skipped", f"OOM already at N={oom_at[name]}"
                progress.end(f"SKIPPED: {row['error']}")
                continue
            try:
                _scaling_point(name, shape, x, w, y, s, row)
                progress.end(
                    f"fwd+bwd {fmt_ms(row['fwd_bwd_ms'])} ms | mem "
                    f"{fmt_bytes(row['extra_bytes'])} "
                    f"({fmt_bytes(row['extra_minus_grads_bytes'])} beyond grads)"
                )
            except Unavailable as e:
                row["status"], row["error"] = "skipped", str(e)
                progress.end(f"SKIPPED: {e}")
            except Exception as e:  # noqa: BLE001 - reported, and an OOM ends the series
                row["status"], row["error"] = "failed", describe_error(e)
                if is_oom(e):
                    oom_at[name] = n
                progress.end(f"FAILED: {row['error']}")
            finally:
                _clear_grads(x, w)
                free_memory(s.device)
        del x, w, y
        free_memory(s.device)
    return rows


__all__ = [
    "SCALING_METHODS",
    "Progress",
    "Settings",
    "fmt_bytes",
    "fmt_err",
    "fmt_ms",
    "run_case",
    "run_scaling",
]
