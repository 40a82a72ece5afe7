"""Smoke tests of the benchmark's code paths (python -m flce.bench) on tiny shapes.

They prove the benchmark runs and that its reference and accuracy figures are right; they never
assert on timings (the benchmark itself proves speed, on the GPU).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from flce.bench import cli, data, kernels, measure, report
from flce.bench.reference import reference, relative_error

TINY = "tiny:67:1031:48"  # no dimension a multiple of 8


def _autograd_float64(x, w, y, softcap):
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    z = x64 @ w64.T
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, y, ignore_index=data.IGNORE_INDEX)
    loss.backward()
    return float(loss.detach()), x64.grad, w64.grad


@pytest.mark.parametrize(
    "n,v,d,softcap", [(37, 1031, 24, None), (37, 1031, 24, 5.0), (5, 70001, 8, None)]
)
def test_reference_matches_float64_autograd(n, v, d, softcap):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=gen) * 2
    w = torch.randn(v, d, generator=gen)
    y = torch.randint(0, v, (n,), generator=gen)
    y[::4] = data.IGNORE_INDEX
    # A small chunk so that the token chunking (and its last, partial chunk) is exercised.
    ref = reference(x, w, y, softcap=softcap, chunk_bytes=3 * v * 8)
    loss, gx, gw = _autograd_float64(x, w, y, softcap)
    assert ref.valid_tokens == int((y != data.IGNORE_INDEX).sum())
    assert math.isclose(ref.loss, loss, rel_tol=1e-12)
    # The reference keeps float64 results rounded once to float32.
    assert relative_error(ref.grad_x, gx) < 1e-6
    assert relative_error(ref.grad_weight, gw) < 1e-6


def test_relative_error_is_chunked_norm_ratio():
    gen = torch.Generator().manual_seed(2)
    ref = torch.randn(53, 7, generator=gen)
    got = ref + 0.01 * torch.randn(53, 7, generator=gen)
    expected = float((got.double() - ref.double()).norm() / ref.double().norm())
    assert math.isclose(relative_error(got, ref, chunk_rows=10), expected, rel_tol=1e-9)


@pytest.mark.parametrize("kind", data.KINDS)
def test_make_inputs(kind):
    shape = data.Shape("t", 203, 301, 64)
    x, w, y = data.make_inputs(shape, kind, torch.device("cpu"), dtype=torch.float32, seed=3)
    assert x.shape == (203, 64) and w.shape == (301, 64) and y.shape == (203,)
    assert x.requires_grad and w.requires_grad and y.dtype == torch.long
    ignored = y == data.IGNORE_INDEX
    assert int(ignored.sum()) == round(0.1 * 203)
    assert bool(((y[~ignored] >= 0) & (y[~ignored] < 301)).all())
    z = (x @ w.T).detach()
    assert float(x.detach().std()) > 0.1 and float(w.detach().std()) > 0
    if kind == "lm":
        assert 3.5 < float(z.std()) < 5.5
        # Labels come from the model's own softmax: they are far likelier than chance to be a
        # high logit of their row.
        valid = ~ignored
        hit = z[valid].gather(1, y[valid, None]) >= z[valid].quantile(0.9, dim=1, keepdim=True)
        assert float(hit.float().mean()) > 0.5
    elif kind == "flat":
        assert 0.7 < float(z.std()) < 1.3
    else:
        # CCE's generator: token i's own row of W is x_i, the dominant logit of its row.
        assert bool((z.argmax(dim=1)[:203] == torch.arange(203)).all())


def test_make_inputs_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        data.make_inputs(data.Shape("t", 4, 5, 6), "zeros", torch.device("cpu"))


@pytest.mark.parametrize(
    "name,slug",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("Some Accelerator", "some-accelerator"),
    ],
)
def test_gpu_slug(name, slug):
    assert cli.gpu_slug(name) == slug


def test_parse_shape():
    s = data.parse_shape(TINY)
    assert (s.name, s.num_tokens, s.vocab_size, s.hidden_size) == ("tiny", 67, 1031, 48)
    with pytest.raises(ValueError, match="--shape"):
        data.parse_shape("tiny:67:1031")


def _run(tmp_path, *extra):
    args = [
        "--device",
        "cpu",
        "--shape",
        TINY,
        "--out",
        str(tmp_path),
        "--warmup",
        "1",
        "--iters",
        "1",
        "--anchor-wheels",
        str(tmp_path / "no-wheels"),
        "--tag",
        "t",
        "--no-plots",
        *extra,
    ]
    assert cli.main(args) == 0
    with open(tmp_path / "cpu-t.json") as f:
        return json.load(f)


def test_benchmark_runs_on_cpu(tmp_path):
    methods = "floor,torch,flce_gif,flce_recompute,flce_auto,cce,cce_exact,liger"
    out = _run(
        tmp_path,
        "--methods",
        methods,
        "--scaling-n",
        "64,96",
        "--scaling-v",
        "1031",
        "--scaling-d",
        "48",
        "--scaling-methods",
        "flce_auto,torch",
    )
    rows = {r["method"]: r for r in out["results"]}
    assert list(rows) == methods.split(",")
    assert all(r["shape"] == "tiny" and r["kind"] == "lm" for r in rows.values())
    assert rows["floor"]["status"] == "ok" and rows["floor"]["fwd_bwd_ms"] > 0
    for name in ("torch", "flce_gif", "flce_recompute", "flce_auto"):
        r = rows[name]
        assert r["status"] == "ok", (name, r["error"])
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["ratio_floor"] > 0
        # bf16 inputs: PyTorch's own error (bf16 logits) is ~1e-2 at this size.
        assert r["loss_rel_err"] < 2e-2 and r["dx_rel_err"] < 3e-2 and r["dw_rel_err"] < 3e-2
    for name in ("flce_gif", "flce_recompute", "flce_auto"):
        assert rows[name]["plan"]["strategy"] in ("grad_in_forward", "recompute")
    assert rows["flce_recompute"]["plan"]["strategy"] == "recompute"
    assert rows["flce_auto"]["fwd_only_ms"] > 0
    for name in ("cce", "cce_exact", "liger"):  # the anchors need CUDA: skipped with a reason
        assert rows[name]["status"] == "skipped" and rows[name]["error"]
    assert [(r["method"], r["N"]) for r in out["scaling"]] == [
        ("flce_auto", 64),
        ("torch", 64),
        ("flce_auto", 96),
        ("torch", 96),
    ]
    assert all(r["status"] == "ok" and r["fwd_bwd_ms"] > 0 for r in out["scaling"])
    md = (tmp_path / "cpu-t.md").read_text()
    assert "## tiny, lm data (N=67, V=1031, D=48)" in md and "| flce_auto |" in md
    assert "Memory and time as N grows" in md

    # --replot rewrites the markdown from the JSON alone.
    (tmp_path / "cpu-t.md").unlink()
    assert cli.main(["--replot", str(tmp_path / "cpu-t.json")]) == 0
    assert (tmp_path / "cpu-t.md").read_text() == md

    # --append keeps what the earlier run measured and replaces what is measured again. The
    # earlier rows are stamped with another flce version here, which the report must point out.
    with open(tmp_path / "cpu-t.json") as f:
        earlier = json.load(f)
    for r in earlier["results"]:
        r["versions"]["flce"] = "0.0.9 (git 0000000)"
    with open(tmp_path / "cpu-t.json", "w") as f:
        json.dump(earlier, f)
    out = _run(
        tmp_path,
        "--append",
        "--methods",
        "torch",
        "--kinds",
        "flat",
        "--scaling-n",
        "none",
        "--no-forward-only",
    )
    keys = [(r["kind"], r["method"]) for r in out["results"]]
    assert ("lm", "flce_auto") in keys and ("flat", "torch") in keys
    assert len(keys) == len(set(keys)) == len(methods.split(",")) + 1
    assert len(out["scaling"]) == 4
    # The merged report names both commands, in order.
    first, second = out["meta"]["commands"]
    assert "--append" not in first and "--append" in second and second == out["meta"]["command"]
    md = (tmp_path / "cpu-t.md").read_text()
    assert "Commands, merged into this report" in md and md.index(first) < md.index(second)
    assert "different flce versions (0.0.9 (git 0000000), " in md


def test_report_names_flce_environment(tmp_path, monkeypatch):
    # flce's environment switches change what is measured (FLCE_GEMM_TUNING), so the JSON and
    # the report name them.
    monkeypatch.setenv("FLCE_GEMM_TUNING", "1")
    out = _run(tmp_path, "--methods", "floor", "--scaling-n", "none", "--no-forward-only")
    assert out["meta"]["environment"]["FLCE_GEMM_TUNING"] == "1"
    assert "`FLCE_GEMM_TUNING=1`" in (tmp_path / "cpu-t.md").read_text()


def test_report_shows_clock_where_measured(tmp_path):
    # On the CPU no clock is sampled: the rows say so and the table has no clock column. Where
    # NVML answered, the per-shape table gives the SM clock and board power of the fwd+bwd runs.
    out = _run(tmp_path, "--methods", "floor,flce_auto", "--scaling-n", "none", "--no-forward-only")
    assert all(r["sm_clock_mhz"] is None and r["power_w"] is None for r in out["results"])
    assert "SM clock" not in (tmp_path / "cpu-t.md").read_text()
    assert measure.ClockSampler(torch.device("cpu")).medians() == (None, None)
    floor, auto = out["results"]
    floor.update(sm_clock_mhz=1980.0, power_w=420.4)
    auto.update(sm_clock_mhz=1635.0, power_w=512.6)
    md = report.markdown(out["meta"], out["results"], [])
    assert "| dW err | fwd+bwd SM clock, power |" in md
    assert "| 1980 MHz, 420 W |" in md and "| 1635 MHz, 513 W |" in md


def test_failures_are_reported_not_hidden(tmp_path):
    # A budget far too small for any plan: flce must fail with its message, the run go on.
    out = _run(
        tmp_path,
        "--methods",
        "torch,flce_recompute",
        "--recompute-budget",
        "64",
        "--scaling-n",
        "none",
    )
    rows = {r["method"]: r for r in out["results"]}
    assert rows["torch"]["status"] == "ok"
    assert rows["flce_recompute"]["status"] == "failed"
    assert "memory_budget" in rows["flce_recompute"]["error"]


@pytest.mark.gpu
def test_benchmark_runs_on_cuda(tmp_path, device):
    out_dir = tmp_path / "cuda"
    args = [
        "--device",
        "cuda",
        "--shape",
        TINY,
        "--out",
        str(out_dir),
        "--warmup",
        "1",
        "--iters",
        "2",
        "--tag",
        "t",
        "--scaling-n",
        "128,256",
        "--scaling-v",
        "1031",
        "--scaling-d",
        "48",
    ]
    assert cli.main(args) == 0
    (path,) = out_dir.glob("*-t.json")
    with open(path) as f:
        out = json.load(f)
    rows = {r["method"]: r for r in out["results"]}
    for name in ("floor", "torch", "torch_compile", "flce_gif", "flce_recompute", "flce_auto"):
        r = rows[name]
        assert r["status"] == "ok", (name, r["error"])
        assert r["extra_bytes"] > 0 and r["fwd_bwd_ms"] > 0
    for name in ("cce", "cce_exact", "liger"):  # optional: never silently missing
        assert rows[name]["status"] == "ok" or rows[name]["error"]
    assert rows["torch"]["ratio_compile"] > 0
    assert all(r["extra_bytes"] is not None for r in out["scaling"] if r["status"] == "ok")


@pytest.mark.parametrize(
    "name,label",
    [
        (
            (
                "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cute::tuple<int>, "
                "cutlass::gemm::collective::CollectiveMma<cutlass::gemm::MainloopSm90TmaGmmaWarp"
                "SpecializedPingpong<4>, cutlass::gemm::KernelTmaWarpSpecializedPingpong>, "
                "flce::detail::cuda::sm90::StatsMath<true>>>(Params)"
            ),
            "fused statistics + e GEMM (ping-pong)",
        ),
        (
            (
                "void cutlass::device_kernel<GemmUniversal<KernelTmaWarpSpecializedCooperative, "
                "flce::detail::cuda::sm90::GradMath<__nv_bfloat16>>>(Params)"
            ),
            "fused dZ GEMM (cooperative)",
        ),
        ("flce::detail::cuda::sm90::StatsMath<false>", "fused statistics GEMM"),
        (
            (
                "void flce::detail::cuda::(anonymous namespace)::rows_grad_from_exp_kernel"
                "<__nv_bfloat16, 8>(flce::detail::RowGradArgs)"
            ),
            "flce rows_grad_from_exp_kernel",
        ),
        ("nvjet_sm90_tst_128x256_64x4_1x2_h_bz_coopA_NNN",) * 2,
        ("flce::lce_forward", "flce::lce_forward"),
        ("x" * 200, "x" * 87 + "..."),
    ],
)
def test_kernel_label(name, label):
    assert kernels.kernel_label(name) == label


def test_kernel_table_runs_on_cpu(tmp_path):
    args = ["--device", "cpu", "--shape", TINY, "--iters", "2", "--reps", "2", "--warmup", "1"]
    args += ["--out", str(tmp_path)]
    assert kernels.main(args) == 0
    md = (tmp_path / "cpu-kernels.md").read_text()
    assert "median of 2 calls after 1 warm-up calls" in md
    for strategy in kernels.STRATEGIES:
        assert f"## tiny (N=67, V=1031, D=48), {strategy}" in md
    # Each table lists flce's forward op with one call per call (the profile is averaged).
    sections = md.split("\n## ")[1:]
    assert len(sections) == len(kernels.STRATEGIES)
    for sec in sections:
        lines = sec.splitlines()
        row = next(line for line in lines if line.startswith("| flce::lce_forward |"))
        ms, calls = row.split("|")[2:4]
        assert float(ms) > 0 and float(calls) == 1
    # recompute computes the gradients in its backward op; the forward alone runs none.
    assert "| flce::lce_backward |" in sections[1]
    assert "| flce::lce_backward |" not in sections[2]


def test_kernel_table_at_given_budgets(tmp_path):
    # One auto section per budget, each naming the plan it ran: the smallest budget that fits
    # (3.1 MiB at this shape) takes the lean strategy, a large one computes the gradients in the
    # forward; "default" is flce's own budget.
    args = ["--device", "cpu", "--shape", TINY, "--iters", "2", "--reps", "2"]
    args += ["--strategies", "auto", "--budgets-mib", "3.1,64,default", "--out", str(tmp_path)]
    assert kernels.main(args) == 0
    sections = (tmp_path / "cpu-kernels.md").read_text().split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "tiny (N=67, V=1031, D=48), auto at a budget of 3 MiB",
        "tiny (N=67, V=1031, D=48), auto at a budget of 64 MiB",
        "tiny (N=67, V=1031, D=48), auto",
    ]
    assert "Plan: strategy recompute," in sections[0]
    assert "Plan: strategy grad_in_forward," in sections[1]
    with pytest.raises(SystemExit):
        kernels.main(["--device", "cpu", "--budgets-mib", "lots", "--out", str(tmp_path)])


def test_kernel_table_on_other_data(tmp_path, capsys):
    # --data picks the inputs' kind; the header names it, and an unknown kind is refused.
    args = ["--device", "cpu", "--shape", TINY, "--iters", "1", "--reps", "1"]
    args += ["--strategies", "forward", "--data", "cce", "--out", str(tmp_path)]
    assert kernels.main(args) == 0
    md = (tmp_path / "cpu-kernels.md").read_text()
    assert "float32, cce data, 10% ignored labels" in md
    assert md.count("\n## tiny") == 1
    with pytest.raises(SystemExit):
        kernels.main(["--device", "cpu", "--data", "peaked", "--out", str(tmp_path)])
    assert "--data" in capsys.readouterr().err


def test_kernel_table_rejects_unknown_strategy(tmp_path):
    with pytest.raises(SystemExit):
        kernels.main(["--device", "cpu", "--strategies", "fast", "--out", str(tmp_path)])


@pytest.mark.parametrize("flag", [["--warmup", "-1"], ["--iters", "0"], ["--reps", "0"]])
def test_kernel_table_rejects_bad_counts(tmp_path, flag, capsys):
    with pytest.raises(SystemExit):
        kernels.main(["--device", "cpu", *flag, "--out", str(tmp_path)])
    assert flag[0] in capsys.readouterr().err


@pytest.mark.gpu
def test_kernel_table_runs_on_cuda(tmp_path, device):
    args = ["--device", "cuda", "--shape", TINY, "--iters", "2", "--reps", "2"]
    args += ["--out", str(tmp_path)]
    assert kernels.main(args) == 0
    (path,) = tmp_path.glob("*-kernels.md")
    md = path.read_text()
    assert md.count("\n## tiny") == len(kernels.STRATEGIES)
    assert "| kernel | ms per call | launches per call | share |" in md
