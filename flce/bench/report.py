"""Markdown tables, the JSON record and the plots of a benchmark run."""

from __future__ import annotations

import json
import os

from .runner import fmt_bytes, fmt_err, fmt_ms

GiB = float(1 << 30)


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _cases(rows: list[dict]) -> list[tuple[str, str]]:
    seen = []
    for r in rows:
        if (r["shape"], r["kind"]) not in seen:
            seen.append((r["shape"], r["kind"]))
    return seen


def _methods(rows: list[dict]) -> list[str]:
    seen = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def _summary_cell(r: dict | None, what: str) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return "OOM" if "OOM" in (r["error"] or "") else r["status"]
    if what == "time":
        if r["fwd_bwd_ms"] is None:
            return "-"
        extra = (
            f"{r['tflops']:.0f} TF/s"
            if r["method"] == "floor" and r["tflops"]
            else (f"{r['ratio_floor']:.2f}" if r["ratio_floor"] is not None else "")
        )
        return f"{r['fwd_bwd_ms']:.1f} ({extra})" if extra else f"{r['fwd_bwd_ms']:.1f}"
    if what == "memory":
        return fmt_bytes(r["extra_minus_grads_bytes"])
    return fmt_err(r["dx_rel_err"])


def markdown(meta: dict, rows: list[dict], scaling: list[dict]) -> str:
    out = [f"# flce benchmark on {meta.get('gpu', '?')}", ""]
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    out += [f"Date {meta.get('date', '?')}; {versions}.", ""]
    commands = meta.get("commands") or ([meta["command"]] if meta.get("command") else [])
    if len(commands) == 1:
        out += [f"Command: `{commands[0]}`", ""]
    elif commands:
        out += [
            "Commands, merged into this report (each later one with --append): "
            + ", then ".join(f"`{c}`" for c in commands),
            "",
        ]
    env = meta.get("environment") or {}
    if env:
        out += ["Environment: " + ", ".join(f"`{k}={v}`" for k, v in env.items()) + ".", ""]
    flce_versions = sorted({r["versions"]["flce"] for r in rows if "flce" in r.get("versions", {})})
    if len(flce_versions) > 1:
        out += [
            "The rows were measured with different flce versions ("
            + ", ".join(flce_versions)
            + "); each row's JSON record names its own.",
            "",
        ]
    out += [
        "Work: fused linear cross-entropy, bf16 x [N, D] and W [V, D], fp32 loss, mean reduction, "
        "10% of labels ignored"
        + (f", softcap {meta['softcap']}" if meta.get("softcap") else "")
        + f". Times: median of {meta.get('iters', '?')} runs after {meta.get('warmup', '?')} "
        f"warm-up runs, {meta.get('timer', 'CUDA events')}. Memory: peak allocated during one "
        "fresh call minus what was allocated before; *beyond grads* subtracts the bf16 "
        "gradients (N + V) * D * 2 bytes. "
        "Errors: against a float64 reference, |loss - ref| / |ref| and ||g - g_ref|| / ||g_ref||. "
        "x floor / x compile: fwd+bwd time over the floor's (three bf16 matmuls) and "
        "torch.compile's. TFLOP/s counts 6NVD.",
        "",
    ]
    methods = _methods(rows)
    kinds = []
    for _, k in _cases(rows):
        if k not in kinds:
            kinds.append(k)
    for kind in kinds:
        cases = [c for c in _cases(rows) if c[1] == kind]
        for what, title in (
            ("time", "fwd+bwd ms (ratio to the floor)"),
            ("memory", "extra memory beyond the gradients"),
            ("dx", "relative error of dx"),
        ):
            if what != "time" and all(m == "floor" for m in methods):
                continue
            ms = [m for m in methods if not (m == "floor" and what == "dx")]
            out += [
                f"## Summary, {kind} data: {title}",
                "",
                "| shape | " + " | ".join(ms) + " |",
                "|---" * (len(ms) + 1) + "|",
            ]
            for shape, _ in cases:
                by = {r["method"]: r for r in rows if r["shape"] == shape and r["kind"] == kind}
                out.append(
                    f"| {shape} | " + " | ".join(_summary_cell(by.get(m), what) for m in ms) + " |"
                )
            out.append("")
    for shape, kind in _cases(rows):
        case = [r for r in rows if r["shape"] == shape and r["kind"] == kind]
        r0 = case[0]
        # The SM clock and board power during the fwd+bwd runs, where NVML answered: the board
        # may be power-capped, so a ratio to the floor can hide a clock difference.
        clocks = any(r.get("sm_clock_mhz") is not None for r in case)
        out += [
            f"## {shape}, {kind} data (N={r0['N']}, V={r0['V']}, D={r0['D']})",
            "",
            (
                "| method | fwd ms | fwd+bwd ms | x floor | x compile | TFLOP/s | extra memory | "
                "beyond grads | no_grad fwd ms | no_grad memory | loss err | dx err | dW err |"
                + (" fwd+bwd SM clock, power |" if clocks else "")
            ),
            "|---" * (14 if clocks else 13) + "|",
        ]
        for r in case:
            if r["status"] != "ok":
                out.append(
                    f"| {r['method']} | {r['status']}: {r['error']} |"
                    + " |" * (12 if clocks else 11)
                )
                continue
            tflops = "-" if r["tflops"] is None else f"{r['tflops']:.0f}"
            clock = ""
            if clocks:
                mhz, watts = r.get("sm_clock_mhz"), r.get("power_w")
                clock = " - |" if mhz is None else f" {mhz:.0f} MHz, {watts:.0f} W |"
            out.append(
                f"| {r['method']} | {fmt_ms(r['fwd_ms'])} | {fmt_ms(r['fwd_bwd_ms'])} | "
                f"{_ratio(r['ratio_floor'])} | {_ratio(r['ratio_compile'])} | {tflops} | "
                f"{fmt_bytes(r['extra_bytes'])} | {fmt_bytes(r['extra_minus_grads_bytes'])} | "
                f"{fmt_ms(r['fwd_only_ms'])} | {fmt_bytes(r['fwd_only_extra_bytes'])} | "
                f"{fmt_err(r['loss_rel_err'])} | {fmt_err(r['dx_rel_err'])} | "
                f"{fmt_err(r['dw_rel_err'])} |" + clock
            )
        out.append("")
    if scaling:
        v, d = scaling[0]["V"], scaling[0]["D"]
        sm = []
        for r in scaling:
            if r["method"] not in sm:
                sm.append(r["method"])
        out += [
            f"## Memory and time as N grows (V={v}, D={d}, lm data)",
            "",
            "fwd+bwd ms / extra memory beyond the gradients (OOM: out of device memory).",
            "",
            "| N | " + " | ".join(sm) + " |",
            "|---" * (len(sm) + 1) + "|",
        ]
        for n in sorted({r["N"] for r in scaling}):
            cells = []
            for m in sm:
                r = next((r for r in scaling if r["N"] == n and r["method"] == m), None)
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    cells.append(
                        "OOM" if "OOM" in (r["error"] or "") else f"{r['status']}: {r['error']}"
                    )
                else:
                    cells.append(
                        f"{fmt_ms(r['fwd_bwd_ms'])} / {fmt_bytes(r['extra_minus_grads_bytes'])}"
                    )
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out.append("")
    notes = []
    for r in rows:
        note = r.get("notes") or {}
        if r["status"] == "failed":
            notes.append(f"- {r['shape']}/{r['kind']} {r['method']} failed: {r['error']}")
        elif note:
            notes.append(
                f"- {r['shape']}/{r['kind']} {r['method']}: "
                + ", ".join(f"{k}={v}" for k, v in note.items())
            )
    plans = {}
    for r in rows:
        if r.get("plan"):
            budget = r.get("memory_budget")
            plans[(r["shape"], r["method"])] = (
                "memory_budget "
                + (fmt_bytes(budget) if budget else "default")
                + ": "
                + ", ".join(
                    f"{k} {fmt_bytes(v) if k.endswith('_bytes') else v}"
                    for k, v in r["plan"].items()
                    if v
                )
            )
    if plans:
        out += ["## flce plans", ""]
        out += [f"- {shape} {m}: {text}" for (shape, m), text in plans.items()] + [""]
    if notes:
        out += ["## Notes and failures", ""] + notes + [""]
    out += ["## Methods", ""]
    for m in methods:
        d = next(r["description"] for r in rows if r["method"] == m)
        out.append(f"- **{m}**: {d}")
    out.append("")
    return "\n".join(out)


def write_json(path: str, meta: dict, rows: list[dict], scaling: list[dict]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "results": rows, "scaling": scaling}, f, indent=1)
    os.replace(path + ".tmp", path)


def plots(prefix: str, rows: list[dict], scaling: list[dict]) -> list[str]:
    """PNG plots; returns the files written (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    markers = {"lm": "o", "flat": "s", "cce": "^"}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        pts = [
            r
            for r in rows
            if r["shape"] == shape
            and r["status"] == "ok"
            and r["fwd_bwd_ms"] is not None
            and r["extra_minus_grads_bytes"] is not None
        ]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(7, 5))
        methods = list(dict.fromkeys(r["method"] for r in pts))
        colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
        for r in pts:
            xv, yv = r["extra_minus_grads_bytes"] / GiB, r["fwd_bwd_ms"]
            ax.scatter(xv, yv, color=colors[r["method"]], marker=markers.get(r["kind"], "o"), s=50)
            ax.annotate(
                r["method"] + ("" if r["kind"] == "lm" else f" ({r['kind']})"),
                (xv, yv),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
        r0 = pts[0]
        ax.set_title(f"{shape} (N={r0['N']}, V={r0['V']}, D={r0['D']}): fwd+bwd time vs memory")
        ax.set_xlabel("peak extra memory beyond the gradients (GiB)")
        ax.set_ylabel("fwd+bwd (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        path = f"{prefix}-{shape}-time-vs-memory.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if scaling:
        fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(12, 5))
        for m in dict.fromkeys(r["method"] for r in scaling):
            ok = [r for r in scaling if r["method"] == m and r["status"] == "ok"]
            oom = [r for r in scaling if r["method"] == m and "OOM" in (r["error"] or "")]
            mem = [r for r in ok if r["extra_bytes"] is not None]  # none off CUDA
            line = ax_m.plot(
                [r["N"] for r in mem], [r["extra_bytes"] / GiB for r in mem], marker="o", label=m
            )[0]
            ax_t.plot(
                [r["N"] for r in ok],
                [r["fwd_bwd_ms"] for r in ok],
                marker="o",
                label=m,
                color=line.get_color(),
            )
            for r in oom:
                ax_m.axvline(r["N"], color=line.get_color(), ls=":", alpha=0.6)
                ax_m.annotate(
                    f"{m} OOM",
                    (r["N"], 0.02),
                    xycoords=("data", "axes fraction"),
                    rotation=90,
                    fontsize=8,
                    color=line.get_color(),
                )
        v, d = scaling[0]["V"], scaling[0]["D"]
        for ax in (ax_m, ax_t):
            ax.set_xscale("log", base=2)
            if any(len(line.get_xdata()) for line in ax.get_lines()):
                ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.grid(alpha=0.3, which="both")
            ax.legend()
        ax_m.set_ylabel("peak extra memory, gradients included (GiB)")
        ax_t.set_ylabel("fwd+bwd (ms)")
        fig.suptitle(f"Scaling with N at V={v}, D={d}")
        fig.tight_layout()
        path = f"{prefix}-memory-vs-n.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
