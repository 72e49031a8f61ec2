"""The measurements of the GPU run (``python -m bench.gpu_run``): correctness cases against float64, and speed rows
with the goals of issue 11. Sizes: a GPU's, or tiny ones on a CPU (the cpp backend, or triton under
TRITON_INTERPRET=1) for the CI smoke test.

Correctness. Every case runs the backend under test through the public API (``mk.contrastive_loss``) and the
``torch`` backend in float64 on the same inputs rounded to the case's dtype (so the error measured is the
arithmetic's, not the input rounding's), and compares the loss and every gradient — x, y, the per-sample τ or the
per-sample margins — by ‖out − ref‖ / ‖ref‖. Bars (DESIGN §6): float64 1e-12; fp32 under "highest" matmul
precision 1e-5; fp32 under "high" (TF32) 2e-3; bf16 1e-2 and fp16 2e-3 — or, for those three, twice the error of
the open_clip-style loss computed in the same precision, whichever is larger. Modes: symmetric InfoNCE with
per-sample τ, one-directional rectangular InfoNCE with targets, max-margin over all negatives and over the hardest
one (per-sample margins), DySTreSS, and ``deterministic=True`` (also run twice: loss and gradients must be bitwise
equal); issue 18's: the sigmoid loss with per-sample τ and bias (square, and rectangular with targets), with labels
(same_label="positive"), and InfoNCE with false-negative elimination (same_label="ignore"); these compare to the
fixed bar (there is no open_clip-style loss of every one of them to set a same-precision one), and the sigmoid's
bias gradient is checked too. One loss value at N·M ≥ 2³¹ is checked against a chunked float64 computation (rows
of S a chunk at a time, columns by an online log-sum-exp across chunks: memory chunk·M, never N·M).

Speed. ``triton.testing.do_bench`` medians in this process (``bench.timing``): forward, backward, forward+backward,
the peak memory a fwd+bwd adds over its inputs (``torch.cuda.max_memory_allocated`` after a reset), TFLOP/s at
8·N·M·D per fwd+bwd (2 for S forward; 6 backward: S again, dS·y, dSᵀ·x), next to what users would run instead
(``bench.competitors``: openclip eager and compiled, the library's torch backend, Inf-CL when installed) and a bare
GEMM (2·N·N·D) in the same dtype, measured in the same run; ``row_goals`` judges a row against the goals of
issue 11 on these numbers. The sigmoid row times the fused loss against the materialized one: open_clip's
``SigLipLoss`` formula (``materialized_sigmoid``) eager and compiled, and the torch backend.
"""
from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

import mmts_kernels as mk

from . import competitors, report
from .timing import measure_ms
from .worker import describe, measure_passes

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
MODES = ("infonce", "infonce_rect", "max_margin", "max_margin_hardest", "dystress", "deterministic")
# issue 18: the sigmoid statistic and the label switches (run after the modes above: the older modes come first)
LABEL_MODES = ("sigmoid", "sigmoid_rect", "sigmoid_labels", "infonce_ignore")
BAR = {("float64", None): 1e-12, ("float32", "highest"): 1e-5, ("float32", "high"): 2e-3,
       ("bfloat16", None): 1e-2, ("float16", None): 2e-3}
TIMING_COMPETITORS = ("openclip", "openclip_compile", "torch", "inf_cl")
DYSTRESS = mk.DySTreSS(0.1, 0.2)


@dataclass(frozen=True)
class Case:
    """One correctness check: a loss ``mode`` at (N, M, D) in ``dtype`` (fp32: under ``precision``)."""

    mode: str
    dtype: str
    N: int
    M: int
    D: int
    precision: Optional[str] = None
    value_only: bool = False  # the N·M ≥ 2³¹ case: the loss value against the chunked float64 computation

    @property
    def label(self) -> str:
        p = f"/{self.precision}" if self.precision else ""
        return f"{self.mode} {SHORT[self.dtype]}{p} N={self.N} M={self.M} D={self.D}"


@dataclass(frozen=True)
class Row:
    """One line of the speed table."""

    key: str
    dtype: str
    N: int
    D: int
    mode: str = "infonce"
    precision: Optional[str] = None
    competitors: Tuple[str, ...] = TIMING_COMPETITORS
    gemm: bool = True


@dataclass
class Config:
    small: Tuple[int, int, int]           # N, M, D of the square cases
    rect: Tuple[int, int, int]            # N, M, D of the rectangular case (awkward sizes)
    large: Tuple[int, int, int]
    huge: Tuple[int, int, int]            # loss value only; N·M ≥ 2³¹ on a GPU
    chunk_elems: int                      # float64 elements per chunk of the huge reference
    cases: List[Case] = field(default_factory=list)


def _cases(small, rect, large, huge, plan) -> List[Case]:
    """The first dtype's small cases, the N·M ≥ 2³¹ value, the large cases, then the other dtypes' small cases:
    what matters most comes first, in case the time budget runs out."""
    small_cases, large_cases = [], []
    for dtype, precision, modes, big_modes in plan:
        small_cases += [Case(m, dtype, *(rect if m.endswith("_rect") else small), precision=precision) for m in modes]
        large_cases += [Case(m, dtype, *large, precision=precision) for m in big_modes]
    first = len(plan[0][2])
    return (small_cases[:first] + [Case("infonce", "bfloat16", *huge, value_only=True)] + large_cases
            + small_cases[first:])


def config(device: torch.device, quick: bool, tiny: bool) -> Config:
    every = MODES
    if tiny or device.type != "cuda":
        small, rect, large, huge = (48, 48, 16), (37, 53, 24), (96, 96, 32), (300, 300, 16)
        plan = [("bfloat16", None, every, ("infonce",)), ("float32", "highest", every, ()),
                ("float32", "high", ("infonce",), ()), ("float16", None, ("infonce", "max_margin"), ()),
                ("float64", None, ("infonce", "infonce_rect", "max_margin", "dystress"), ())]
        plan.append(("float64", None, LABEL_MODES, ()))
        if quick:
            plan = [("bfloat16", None, ("infonce", "max_margin"), ()), ("float64", None, ("infonce",), ()),
                    ("float64", None, ("sigmoid_labels", "infonce_ignore"), ())]
        return Config(small, rect, large, huge, chunk_elems=64 * 300, cases=_cases(small, rect, large, huge, plan))
    small, rect, large, huge = (2048, 2048, 256), (1537, 4099, 200), (16384, 16384, 512), (65536, 65536, 256)
    if quick:
        plan = [("bfloat16", None, every, ("infonce",)), ("float32", "highest", ("infonce", "infonce_rect"), ()),
                ("float32", "high", ("infonce",), ()), ("float16", None, ("infonce",), ()),
                ("float64", None, ("infonce", "max_margin"), ()),
                ("bfloat16", None, LABEL_MODES, ()),
                ("float64", None, ("sigmoid", "sigmoid_labels", "infonce_ignore"), ())]
    else:
        plan = [("bfloat16", None, every, ("infonce", "max_margin", "deterministic")),
                ("float32", "highest", every, ("infonce",)),
                ("float32", "high", ("infonce", "infonce_rect", "max_margin"), ()),
                ("float16", None, ("infonce", "infonce_rect", "max_margin", "max_margin_hardest"), ()),
                ("float64", None, ("infonce", "infonce_rect", "max_margin", "max_margin_hardest", "dystress"), ()),
                ("bfloat16", None, LABEL_MODES, ("sigmoid",)), ("float32", "highest", LABEL_MODES, ()),
                ("float16", None, ("sigmoid", "sigmoid_labels"), ()), ("float64", None, LABEL_MODES, ())]
    return Config(small, rect, large, huge, chunk_elems=2**27, cases=_cases(small, rect, large, huge, plan))


# ---------------------------------------------------------------------------------------------------------------
# Inputs and losses

def make_inputs(N: int, M: int, D: int, dtype: torch.dtype, device: torch.device, mode: str, seed: int = 0):
    """Unit-norm rows (as CLIP-style training uses them) rounded to ``dtype``; the per-sample τ ∈ [0.05, 0.15] or
    margin ∈ [0.1, 0.3] in fp32 (fp64 for fp64 inputs); targets for the rectangular mode."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = F.normalize(torch.randn(N, D, generator=g, device=device), dim=1).to(dtype)
    y = F.normalize(torch.randn(M, D, generator=g, device=device), dim=1).to(dtype)
    lo, hi = (0.1, 0.3) if mode.startswith("max_margin") else (0.05, 0.15)
    side_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    per_sample = (lo + (hi - lo) * torch.rand(N, generator=g, device=device)).to(side_dtype)
    targets = torch.randint(0, M, (N,), generator=g, device=device) if mode.endswith("_rect") else None
    return x, y, per_sample, targets


def label_inputs(N: int, mode: str, per_sample: torch.Tensor, seed: int = 0):
    """(bias, labels) of issue 18's modes, else (None, None): a per-row bias around SigLIP's −10 in the per-sample
    vector's dtype, and classes of about 8 samples each in a random order (many same-label pairs per row)."""
    device = per_sample.device
    g = torch.Generator(device=device).manual_seed(seed + 1)
    bias = None
    if mode.startswith("sigmoid"):
        bias = (-10.0 + 2.0 * torch.rand(N, generator=g, device=device)).to(per_sample.dtype)
    labels = None
    if mode in ("sigmoid_labels", "infonce_ignore"):
        labels = torch.arange(N, device=device)[torch.randperm(N, generator=g, device=device)] % max(2, N // 8)
    return bias, labels


def loss_kwargs(mode: str, per_sample, targets=None, bias=None, labels=None) -> dict:
    """``mk.contrastive_loss`` keywords of a mode; the sigmoid's ``bias`` defaults to SigLIP's −10."""
    if mode.startswith("sigmoid"):
        kw = dict(loss="sigmoid", temperature=per_sample, bias=-10.0 if bias is None else bias)
        if mode == "sigmoid_rect":
            kw.update(targets=targets, symmetric=False)
        if mode == "sigmoid_labels":
            kw.update(labels=labels, same_label="positive")
        return kw
    if mode == "infonce_ignore":
        return dict(loss="infonce", temperature=per_sample, labels=labels, same_label="ignore")
    if mode in ("infonce", "deterministic"):
        kw = dict(loss="infonce", temperature=per_sample)
        return dict(kw, deterministic=True) if mode == "deterministic" else kw
    if mode == "infonce_rect":
        return dict(loss="infonce", temperature=per_sample, symmetric=False, targets=targets)
    if mode in ("max_margin", "max_margin_hardest"):
        return dict(loss="max_margin", margin=per_sample, hardest_negative=mode == "max_margin_hardest")
    if mode == "dystress":
        return dict(loss="infonce", temperature=DYSTRESS)
    raise ValueError(f"unknown mode {mode!r}")


def uses_per_sample(mode: str) -> bool:
    return mode != "dystress"


def openclip_same_precision(x, y, per_sample, mode: str, targets=None):
    """The open_clip-style loss of a mode, S in the input dtype: the low-precision baseline of the accuracy bar."""
    if mode in ("infonce", "deterministic"):
        return competitors.openclip_infonce(x, y, per_sample)
    if mode == "infonce_rect":
        return competitors.openclip_infonce(x, y, per_sample, targets=targets)
    if mode == "dystress":
        return competitors.openclip_infonce(x, y, None, dystress=DYSTRESS)
    return competitors.openclip_max_margin(x, y, per_sample, hardest_negative=mode == "max_margin_hardest")


def materialized_sigmoid(x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor, bias=-10.0) -> torch.Tensor:
    """The sigmoid loss as open_clip's ``SigLipLoss`` computes it (``logit_scale * x @ y.T + logit_bias``, labels
    2I − 1, −Σ logsigmoid / N), S materialized in the input dtype, the per-row scale 1/τ_i: the speed row's
    baseline, needing no open-clip-torch (the GPU machine has none)."""
    logits = (tau.reciprocal().to(x.dtype)[:, None] * x) @ y.T + bias
    labels = 2 * torch.eye(x.shape[0], device=x.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / x.shape[0]


def loss_and_grads(fn, x, y, per_sample, mode: str, bias=None):
    """(loss, [dx, dy, d per_sample?, d bias?]) of ``fn(x, y, per_sample)`` (``fn(x, y, per_sample, bias)`` when a
    bias is given, which is then a leaf too), all detached."""
    leaves = [x.detach().requires_grad_(), y.detach().requires_grad_()]
    ps = per_sample.detach().requires_grad_(uses_per_sample(mode))
    if uses_per_sample(mode):
        leaves.append(ps)
    if bias is not None:
        leaves.append(bias.detach().requires_grad_())
        out = fn(leaves[0], leaves[1], ps, leaves[-1])
    else:
        out = fn(leaves[0], leaves[1], ps)
    grads = torch.autograd.grad(out, leaves)
    return out.detach(), [g.detach() for g in grads]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    den = float(torch.linalg.vector_norm(ref))
    num = float(torch.linalg.vector_norm(a - ref))
    return num / den if den > 0 else num


def chunked_infonce_fp64(x, y, tau, chunk_elems: int) -> float:
    """Symmetric InfoNCE with per-sample τ in float64, S never whole: rows of S ``chunk_elems // M`` at a time
    (row log-sum-exp per chunk), columns by an online log-sum-exp merged across chunks."""
    N, M = x.shape[0], y.shape[0]
    yd, t = y.double(), tau.double()
    rows = max(1, chunk_elems // M)
    row_terms = torch.empty(N, dtype=torch.float64, device=x.device)
    pos = torch.empty(N, dtype=torch.float64, device=x.device)
    col_lse = torch.full((M,), -math.inf, dtype=torch.float64, device=x.device)
    for i0 in range(0, N, rows):
        i1 = min(N, i0 + rows)
        S = x[i0:i1].double() @ yd.T
        p = S[torch.arange(i1 - i0, device=x.device), torch.arange(i0, i1, device=x.device)]
        row_terms[i0:i1] = torch.logsumexp(S / t[i0:i1, None], dim=1) - p / t[i0:i1]
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(S / t[None, :], dim=0))
        pos[i0:i1] = p
        del S
    return float(0.5 * (row_terms.mean() + (col_lse - pos / t).mean()))


@contextlib.contextmanager
def matmul_precision(precision: Optional[str]):
    old = torch.get_float32_matmul_precision()
    if precision:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Correctness

def check_case(case: Case, backend: str, device: torch.device, chunk_elems: int) -> List[dict]:
    """Measurement rows of one case: one per compared quantity (and one for the bitwise repeat)."""
    x, y, per_sample, targets = make_inputs(case.N, case.M, case.D, DTYPES[case.dtype], device, case.mode)
    bias, labels = label_inputs(case.N, case.mode, per_sample)
    bar = BAR[(case.dtype, case.precision)]
    base = dict(section="correctness", name=case.label, dtype=case.dtype, precision=case.precision or "",
                N=case.N, M=case.M, D=case.D, mode=case.mode, method=backend)

    def run(name, labels=labels):
        def fn(a, b, ps, bl=None):
            return mk.contrastive_loss(a, b, backend=name, **loss_kwargs(case.mode, ps, targets, bl, labels))
        return fn

    ours = run(backend)

    with matmul_precision(case.precision):
        if case.value_only:
            with torch.no_grad():
                value = float(ours(x, y, per_sample))
            ref = chunked_infonce_fp64(x, y, per_sample, chunk_elems)
            err = abs(value - ref) / abs(ref)
            return [dict(base, metric="loss", value=err, bar=bar, status=_status(err, bar),
                         note=f"chunked float64 reference {ref:.10g}, N·M = {case.N * case.M:,}")]
        out, grads = loss_and_grads(ours, x, y, per_sample, case.mode, bias)
        ref_out, ref_grads = loss_and_grads(run("torch", labels), x.double(), y.double(), per_sample.double(),
                                            case.mode, None if bias is None else bias.double())
        baseline = None
        if case.dtype != "float64" and case.precision != "highest" and case.mode in MODES:  # the same-precision bar
            base_out, base_grads = loss_and_grads(
                lambda a, b, ps: openclip_same_precision(a, b, ps, case.mode, targets), x, y, per_sample, case.mode)
            baseline = [rel_err(base_out, ref_out)] + [rel_err(g, r) for g, r in zip(base_grads, ref_grads)]
            del base_out, base_grads
        repeat = None
        if case.mode == "deterministic":
            out2, grads2 = loss_and_grads(ours, x, y, per_sample, case.mode, bias)
            repeat = torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
            del out2, grads2
    names = ["loss", "dx", "dy"] + (["dmargin" if case.mode.startswith("max_margin") else "dtau"]
                                    if uses_per_sample(case.mode) else []) + (["dbias"] if bias is not None else [])
    rows = []
    for k, (name, a, r) in enumerate(zip(names, [out] + grads, [ref_out] + ref_grads)):
        err = rel_err(a, r)
        case_bar = bar if baseline is None else max(bar, 2 * baseline[k])
        note = "" if baseline is None else f"open_clip-style in the same precision: {baseline[k]:.2e}"
        rows.append(dict(base, metric=name, value=err, bar=case_bar, status=_status(err, case_bar), note=note))
    if repeat is not None:
        rows.append(dict(base, metric="bitwise repeat", value=float(repeat), bar=1.0,
                         status="PASS" if repeat else "FAIL", note="loss and gradients of two runs torch.equal"))
    return rows


def _status(err: float, bar: float) -> str:
    return "PASS" if math.isfinite(err) and err <= bar else "FAIL"


# ---------------------------------------------------------------------------------------------------------------
# Speed

def time_row(row: Row, backend: str, device: torch.device, repeats: int, wanted_competitors) -> List[dict]:
    """Measurement rows of one line of the speed table: ours (three passes, memory), each competitor, the GEMM."""
    x, y, per_sample, _ = make_inputs(row.N, row.N, row.D, DTYPES[row.dtype], device, row.mode)
    x.requires_grad_()
    y.requires_grad_()
    base = dict(section="speed", name=row.key, dtype=row.dtype, precision=row.precision or "", N=row.N, M=row.N,
                D=row.D, mode=row.mode)
    out = []
    methods = [("ours", backend)] + [(c, c) for c in row.competitors if c in wanted_competitors]
    with matmul_precision(row.precision):
        for method, name in methods:
            reason = _method_reason(name, backend, device, row.mode)
            if reason:
                out.append(dict(base, method=name, metric="full_ms", value=math.nan, note=reason))
                continue
            fn = _method_fn(name, row.mode)
            res = measure_passes(lambda: fn(x, y, per_sample), (x, y), device, repeats)
            by_pass = {r["pass"]: r for r in res["rows"]}
            note = res["note"]
            for p, metric in (("forward", "fwd_ms"), ("backward", "bwd_ms"), ("full", "full_ms")):
                r = by_pass.get(p, {})
                out.append(dict(base, method=name, metric=metric, value=_num(r.get("ms")),
                                note="; ".join(n for n in (note, r.get("note", "")) if n)))
            out.append(dict(base, method=name, metric="peak_extra_mib",
                            value=_num(by_pass.get("full", {}).get("mem")) / 2**20, note=note))
            x.grad = y.grad = None
            free_memory(device)
        if row.gemm:
            a, b = x.detach(), y.detach()
            try:
                ms = measure_ms(lambda: a @ b.T, device, repeats=repeats).median
                note = ""
            except Exception as exc:  # noqa: BLE001
                ms, note = math.nan, describe(exc)
            out.append(dict(base, method="gemm", metric="ms", value=ms, note=note))
    return out


def allow_recompiles(limit: int = 64) -> None:
    """Keep every compiled graph of the run: openclip_compile compiles once per (shape, dtype) and the rows come back
    to shapes already seen, so raise dynamo's per-function recompile limit instead of resetting it between rows
    (a reset would compile those shapes again, inside the timed budget)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # older torch: cache_size_limit only
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))


def _method_reason(name: str, backend: str, device: torch.device, mode: str) -> Optional[str]:
    if name == backend or name == "torch":
        return mk.backends.unavailable_reason(name, device)
    if mode == "sigmoid":  # openclip / openclip_compile: the materialized formula, written here
        return None if name in ("openclip", "openclip_compile") else f"{name} has no sigmoid loss"
    return competitors.unavailable_reason(name, device, "infonce" if mode == "infonce" else "other")


def _method_fn(name: str, mode: str):
    if mode == "sigmoid" and name in ("openclip", "openclip_compile"):
        return materialized_sigmoid if name == "openclip" else _compiled_sigmoid()
    if name in competitors.COMPETITORS:
        return competitors.loss_function(name, "infonce")

    def f(a, b, ps):
        return mk.contrastive_loss(a, b, backend=name, **loss_kwargs(mode, ps))
    return f


_COMPILED = {}


def _compiled_sigmoid():
    """One torch.compile of ``materialized_sigmoid`` for the whole run (no recompile between rows)."""
    if "sigmoid" not in _COMPILED:
        _COMPILED["sigmoid"] = torch.compile(materialized_sigmoid, dynamic=False)
    return _COMPILED["sigmoid"]


def _num(v) -> float:
    return math.nan if v is None else float(v)


def speed_header(backend: str) -> List[str]:
    return ["config", "N", "D", f"{backend} fwd ms", "bwd ms", "fwd+bwd ms", "fwd share", "peak extra MiB",
            "TFLOP/s", "of GEMM", "openclip ms (MiB)", "openclip_compile ms", "torch ms", "inf_cl ms",
            "GEMM ms (TFLOP/s)"]


def speed_table(rows: List[dict], backend: str) -> Tuple[List[str], List[List[str]]]:
    """(header, cells) of the speed table from the measurement rows."""
    by = {(r["name"], r["method"], r["metric"]): r for r in rows if r["section"] == "speed"}
    names = list(dict.fromkeys(r["name"] for r in rows if r["section"] == "speed"))
    header = speed_header(backend)
    cells = []
    for name in names:
        def v(method, metric):
            r = by.get((name, method, metric))
            return math.nan if r is None else r["value"]
        some = next(r for r in rows if r["section"] == "speed" and r["name"] == name)
        N, D = some["N"], some["D"]
        full = v(backend, "full_ms")
        gemm = v("gemm", "ms")
        t = report.tflops("torch", "full", N, N, D, full)
        g_rate = report.tflops("gemm", "forward", N, N, D, gemm)
        cells.append([name, str(N), str(D), _f(v(backend, "fwd_ms"), ".2f"), _f(v(backend, "bwd_ms"), ".2f"),
                      _f(full, ".2f"), _f(_div(v(backend, "fwd_ms"), full), ".0%"),
                      _f(v(backend, "peak_extra_mib"), ".1f"), _f(t, ".3g"), _f(_div(t, g_rate), ".0%"),
                      f"{_f(v('openclip', 'full_ms'), '.2f')} ({_f(v('openclip', 'peak_extra_mib'), '.0f')})",
                      _f(v("openclip_compile", "full_ms"), ".2f"), _f(v("torch", "full_ms"), ".2f"),
                      _f(v("inf_cl", "full_ms"), ".2f"), f"{_f(gemm, '.3f')} ({_f(g_rate, '.3g')})"])
    return header, cells


HEADLINE = "bf16"  # the speed row every other row's goal is judged against (bf16 symmetric InfoNCE, per-sample τ)
PER_MODE_GOAL = 1.3  # max-margin, hardest negative, DySTreSS, deterministic: ≤ 1.3× the headline's fwd+bwd
# the sigmoid row against the materialized loss eager: issue 18's bar (half the time, 5% of the peak memory)
SIGMOID_TIME, SIGMOID_MEMORY = 0.5, 0.05


def row_goals(got: List[dict], headline: List[dict], backend: str) -> List[dict]:
    """The goals of issue 11 that apply to one speed row, judged on this run's numbers, as CSV rows (section
    "goal": value measured, bar, status PASS / FAIL / n/a, note the value formatted). ``got``: the row's
    measurements (``time_row``); ``headline``: the headline row's (``got`` itself for the headline)."""
    first = got[0]
    N, D, mode, precision = first["N"], first["D"], first["mode"], first["precision"]
    head_N = headline[0]["N"] if headline else math.nan

    def v(rows, method, metric):
        return next((r["value"] for r in rows if r["method"] == method and r["metric"] == metric), math.nan)

    full = v(got, backend, "full_ms")
    head = v(headline, backend, "full_ms")
    out = []

    def goal(text, value, bar, at_most, fmt):
        status = "n/a" if not math.isfinite(value) else ("PASS" if (value <= bar if at_most else value >= bar)
                                                         else "FAIL")
        out.append(dict(first, section="goal", method=backend, metric=text, value=value, bar=bar, status=status,
                        note=_f(value, fmt)))

    if mode == "sigmoid":
        goal(f"≤ {SIGMOID_TIME:g}× the materialized sigmoid's time", _div(full, v(got, "openclip", "full_ms")),
             SIGMOID_TIME, True, ".2f")
        goal(f"peak extra memory ≤ {SIGMOID_MEMORY:.0%} of the materialized sigmoid's",
             _div(v(got, backend, "peak_extra_mib"), v(got, "openclip", "peak_extra_mib")), SIGMOID_MEMORY, True,
             ".2%")
        goal(f"≤ {PER_MODE_GOAL}× the {HEADLINE} InfoNCE time", _div(full, head), PER_MODE_GOAL, True, ".2f")
    elif mode != "infonce":
        goal(f"≤ {PER_MODE_GOAL}× the {HEADLINE} InfoNCE time", _div(full, head), PER_MODE_GOAL, True, ".2f")
    elif precision:
        bar = 3.0 if precision == "highest" else 1.5
        goal(f"≤ {bar:g}× the {HEADLINE} time", _div(full, head), bar, True, ".2f")
    elif N > head_N:  # issue 11: N = 65536, 4× the headline's rows and 16× its work, within 17× its time
        goal(f"≤ 17× the {HEADLINE} time at N={head_N}", _div(full, head), 17.0, True, ".1f")
    else:  # bf16 / fp16 InfoNCE at the headline's N, any D
        rate = report.tflops("torch", "full", N, N, D, full)
        goal("fwd+bwd ≥ 40% of the GEMM rate", _div(rate, report.tflops("gemm", "forward", N, N, D,
                                                                       v(got, "gemm", "ms"))), 0.4, False, ".0%")
        goal("≥ 1.5× faster than openclip_compile", _div(v(got, "openclip_compile", "full_ms"), full), 1.5, False,
             ".2f")
        goal("≥ 3× faster than openclip (eager)", _div(v(got, "openclip", "full_ms"), full), 3.0, False, ".2f")
        goal("peak extra memory ≤ 2% of openclip's",
             _div(v(got, backend, "peak_extra_mib"), v(got, "openclip", "peak_extra_mib")), 0.02, True, ".2%")
        goal("forward ≤ 1/3 of fwd+bwd", _div(v(got, backend, "fwd_ms"), full), 1 / 3, True, ".0%")
    return out


_div = report.ratio


def _f(v, spec: str) -> str:
    return report.fmt(float(v), spec)


# ---------------------------------------------------------------------------------------------------------------
# What the run's command shares

CSV_FIELDS = ["section", "name", "dtype", "precision", "N", "M", "D", "mode", "method", "metric", "value", "bar",
              "status", "note"]


def pick_backend(choice: Optional[str], device: torch.device) -> str:
    if choice:
        return choice
    if device.type == "cuda":
        return "triton"
    return "cpp" if mk.backends.unavailable_reason("cpp", device) is None else "torch"


def csv_cell(v):
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.6g}"
    return v


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__
