"""Compile every Triton kernel launch of the ``triton`` backend for an H100 (sm_90) without a GPU, and report what
the compiler made of it: registers, spills, shared memory, tensor-core and async-copy instructions, fp64 → fp32
conversions.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not whether they compile for a GPU, nor how:
a block shape tl.dot rejects, a silent fallback from tensor cores to FMA loops, a pipeline that did not form, or
a register spill only shows in the compiled code. Triton ships ptxas, so the whole pipeline down to SASS runs here.

How: the kernels are defined in compiler mode (no TRITON_INTERPRET) and ``JITFunction.run`` is replaced by a
recorder; each loss call then records its launches (arguments, constexprs, warps, stages) instead of running them,
with the GPU tile configuration and tl.dot precision forced. Each distinct launch is compiled with the same
specialization Triton would apply at run time (16-byte alignment, divisibility by 16, integer 1 as a constant).

    python python_tests/triton_sm90.py            # a table; exit status 1 if a check fails
Used by test_triton_compile.py (in a subprocess: the test session runs the interpreter).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmts_kernels as mk  # noqa: E402
import mmts_kernels.topk  # noqa: E402,F401  (mk.topk)
import mmts_kernels.triton_backend as tb  # noqa: E402
from mmts_kernels.stats import StatsRequest  # noqa: E402
from mmts_kernels.triton_backend import backward, forward, op  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_TYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int64: "i64", torch.int32: "i32"}

_recorded = []


def _record(self, *args, grid, warmup, **kwargs):
    _recorded.append((self, args, kwargs))


def _pretend_gpu(precision: str) -> None:
    """The CPU tensors of the recording stand for CUDA ones: no availability check, no interpreter upcast, the
    tl.dot precision and the ∂L/∂S panel dtype a GPU would use, and no host GEMMs (their inputs would be the
    recorded kernels' outputs)."""
    JITFunction.run = _record
    tb.unavailable_reason = lambda device=None: None
    tb._check_mode = lambda x: None
    forward.dot_upcast = backward.dot_upcast = lambda x: False
    forward.dot_precision = backward.dot_precision = lambda x: precision
    backward._gemm_dtype = lambda x, cdt: x.dtype if x.dtype in (torch.bfloat16, torch.float16) else cdt
    backward.matmul = lambda *args, **kwargs: None


def _stats_case(kind: str, dtype: torch.dtype, n: int, m: int, g: torch.Generator):
    """compute_stats arguments of one of issue 18's statistics requests (sigmoid, same-label mask or positive),
    with x, y and every per-row vector requiring grad as a loss would have them: the ``stats=`` cases of CASES."""
    square = not kind.startswith("sigmoid") or kind == "sigmoid_positive"
    m = n if square else m
    x = torch.randn(1, n, 64, generator=g).to(dtype).requires_grad_()
    y = x if kind == "ntxent_mask" else torch.randn(1, m, 64, generator=g).to(dtype).requires_grad_()
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    tau = (0.05 + torch.rand(1, n, generator=g)).to(cdt).requires_grad_()
    bias = (-10.0 + torch.rand(1, n, generator=g)).to(cdt).requires_grad_()
    margin = (0.1 + 0.2 * torch.rand(1, n, generator=g)).to(cdt).requires_grad_()
    labels = torch.randint(0, 16, (n,), generator=g)
    targets, self_cols = torch.arange(n), None
    if kind == "sigmoid" or kind == "sigmoid_mask":  # the ring's blocks of other ranks: no positive (−1)
        targets = torch.where(torch.rand(n, generator=g) < 0.5, -1, torch.randint(0, m, (n,), generator=g))
    if kind == "ntxent_mask":  # Z against itself: positive a ± n/2, self a
        half = torch.arange(n // 2)
        targets, self_cols = torch.cat((half + n // 2, half)), torch.cat((half, half + n // 2))
    kwargs = dict(self_cols=self_cols, bias=None, labels=(labels, labels[:m]))
    if kind.startswith("sigmoid"):
        same = {"sigmoid": None, "sigmoid_mask": "mask", "sigmoid_positive": "positive"}[kind]
        request = StatsRequest(sigmoid=True, same_label=same)
        kwargs.update(bias=bias, labels=kwargs["labels"] if same else None)
        return (x, y, tau, None, targets, request), kwargs
    request = dict(lse_mask=dict(lse=True, ws=True, cols=True),
                   dystress_grad_mask=dict(lse=True, cols=True, dystress=mk.DySTreSS(0.1, 0.2, detach=False)),
                   ntxent_mask=dict(lse=True, ws=True, decoupled=True),
                   hinge_mask=dict(hinge=True, cols=True), hard_mask=dict(hard=True, cols=True))[kind]
    request = StatsRequest(same_label="mask", **request)
    lse_tau = tau if request.lse and request.dystress is None else None
    return (x, y, lse_tau, margin if request.hinge else None, targets, request), kwargs


def record(dtype: torch.dtype, precision: str, **loss_kw):
    """The launches of one forward + backward of ``mk.contrastive_loss(backend="triton", **loss_kw)``, of
    ``mk.nt_xent`` on two views of n/2 rows each (``ntxent=True``), or of the triton backend's ``compute_stats``
    for a statistics request (``stats=kind``, see ``_stats_case``) with a weighted sum of its fields as the loss."""
    _recorded.clear()
    _pretend_gpu(precision)
    g = torch.Generator().manual_seed(0)
    n = loss_kw.pop("n", 512)
    m = loss_kw.pop("m", n)
    ntxent = loss_kw.pop("ntxent", False)
    k = loss_kw.pop("topk", None)
    stats_kind = loss_kw.pop("stats", None)
    if stats_kind is not None:
        args, kwargs = _stats_case(stats_kind, dtype, n, n * 3 // 4, g)
        with op.tile_config(op.GPU_CONFIG_FP64 if dtype == torch.float64 else op.GPU_CONFIG):
            stats = tb.compute_stats(*args, **kwargs)
            total = sum(v.sum() for name, v in stats._asdict().items()
                        if v is not None and v.is_floating_point() and name not in ("ws", "ws_c"))
            total.backward()
        return list(_recorded)
    if k is not None:  # the top-k statistic (AMCL's hardest negatives) of n rows against themselves: no backward
        z, rows = torch.randn(n, 64, generator=g).to(dtype), torch.arange(n)
        mk.topk.compute_topk(z, z, (rows + n // 2) % n, k, self_cols=rows, backend="triton")
        return list(_recorded)
    x = torch.randn(n // 2 if ntxent else n, 64, generator=g).to(dtype).requires_grad_()
    y = torch.randn(n // 2 if ntxent else m, 64, generator=g).to(dtype).requires_grad_()
    cfg = op.GPU_CONFIG_FP64 if dtype == torch.float64 else op.GPU_CONFIG
    with op.tile_config(cfg):
        loss = mk.nt_xent if ntxent else mk.contrastive_loss
        loss(x, y, backend="triton", **loss_kw).backward()
    return list(_recorded)


def compile_launch(kernel, args, kwargs):
    kw = dict(kwargs)
    options = {k: kw.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kw}
    signature, constants, attrs = {}, {}, {}
    values = iter(args)
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            # a constexpr left to its default (the new switches of a variant that does not use them)
            signature[p.name], constants[p.name] = "constexpr", kw[p.name] if p.name in kw else p.default
            continue
        v = next(values)
        specialize = not p.do_not_specialize
        if isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _TYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            if specialize and v == 1:
                signature[p.name], constants[p.name] = "constexpr", 1
                continue
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if specialize and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {p.name} of type {type(v).__name__}")
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=TARGET, options=options)


def ptxas_report(ptx: str) -> dict:
    """Registers, spill stores and stack frame from ptxas -v on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([os.path.join(BIN, "ptxas"), "-arch=sm_90a", "-v", path, "-o", path + ".o"],
                             capture_output=True, text=True, check=True).stderr

    def number(pattern):
        found = re.findall(pattern, out)
        return max((int(v) for v in found), default=0)

    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                stack=number(r"(\d+) bytes stack frame"))


CASES = [  # (name, dtype, tl.dot precision, loss keywords)
    ("infonce per-sample tau", torch.bfloat16, "tf32", dict(temperature="per_sample")),
    ("infonce per-sample tau", torch.float16, "tf32", dict(temperature="per_sample")),
    ("infonce per-sample tau", torch.float32, "tf32x3", dict(temperature="per_sample")),
    ("infonce per-sample tau", torch.float32, "tf32", dict(temperature="per_sample")),
    ("infonce per-sample tau", torch.float64, "ieee", dict(temperature="per_sample")),
    ("infonce DySTreSS", torch.bfloat16, "tf32", dict(temperature="dystress")),
    ("infonce DySTreSS", torch.float64, "ieee", dict(temperature="dystress")),
    ("infonce one-directional", torch.bfloat16, "tf32", dict(temperature="per_sample", symmetric=False)),
    ("max-margin", torch.bfloat16, "tf32", dict(loss="max_margin", margin="per_sample")),
    ("max-margin", torch.float64, "ieee", dict(loss="max_margin", margin="per_sample")),
    ("max-margin hardest", torch.bfloat16, "tf32", dict(loss="max_margin", hardest_negative=True)),
    ("infonce DySTreSS detach=False", torch.bfloat16, "tf32", dict(temperature="dystress_grad")),
    # NT-Xent: the self column masked in the tiles (MASK_SELF), DCL (DECOUPLED), DySTreSS's gradient through τ
    ("nt_xent per-sample tau", torch.bfloat16, "tf32", dict(ntxent=True, temperature="per_sample_views")),
    ("nt_xent per-sample tau", torch.float32, "tf32x3", dict(ntxent=True, temperature="per_sample_views")),
    ("nt_xent DCL", torch.bfloat16, "tf32", dict(ntxent=True, decoupled=True, temperature="per_sample_views")),
    ("nt_xent DCL DySTreSS detach=False", torch.bfloat16, "tf32",
     dict(ntxent=True, decoupled=True, temperature="dystress_grad")),
    ("nt_xent DySTreSS detach=False", torch.float64, "ieee", dict(ntxent=True, temperature="dystress_grad")),
    # the top-k statistic: K_PAD = 16 (4 warps), 128 (AMCL's k = 100) and 256 (MAX_FUSED_K, 8 warps)
    ("top-k k=16", torch.bfloat16, "tf32", dict(topk=16)),
    ("top-k k=100", torch.bfloat16, "tf32", dict(topk=100)),
    ("top-k k=100", torch.float32, "tf32x3", dict(topk=100)),
    ("top-k k=100", torch.float64, "ieee", dict(topk=100)),
    ("top-k k=256", torch.float32, "tf32x3", dict(topk=256)),
    # issue 18: the sigmoid statistic (per-row τ and bias requiring grad, N ≠ M, rows without a positive) and the
    # same-label switches, at the statistics level
    ("sigmoid", torch.bfloat16, "tf32", dict(stats="sigmoid")),
    ("sigmoid", torch.float32, "tf32x3", dict(stats="sigmoid")),
    ("sigmoid", torch.float64, "ieee", dict(stats="sigmoid")),
    ("sigmoid same_label=mask", torch.bfloat16, "tf32", dict(stats="sigmoid_mask")),
    ("sigmoid same_label=positive", torch.bfloat16, "tf32", dict(stats="sigmoid_positive")),
    ("infonce same_label=mask", torch.bfloat16, "tf32", dict(stats="lse_mask")),
    ("infonce same_label=mask", torch.float64, "ieee", dict(stats="lse_mask")),
    ("infonce DySTreSS detach=False same_label=mask", torch.bfloat16, "tf32", dict(stats="dystress_grad_mask")),
    ("nt_xent DCL same_label=mask", torch.bfloat16, "tf32", dict(stats="ntxent_mask")),
    ("max-margin same_label=mask", torch.bfloat16, "tf32", dict(stats="hinge_mask")),
    ("max-margin hardest same_label=mask", torch.bfloat16, "tf32", dict(stats="hard_mask")),
]


def _loss_kwargs(kw: dict, n: int) -> dict:
    kw = dict(kw)
    if kw.get("temperature") == "per_sample":  # learnable: the backward's ws path too
        kw["temperature"] = (0.05 + torch.rand(n)).requires_grad_()
    elif kw.get("temperature") == "per_sample_views":  # nt_xent: one τ per sample of the n/2
        kw["temperature"] = (0.05 + torch.rand(n // 2)).requires_grad_()
    elif kw.get("temperature") == "dystress":
        kw["temperature"] = mk.DySTreSS(0.1, 0.2)
    elif kw.get("temperature") == "dystress_grad":
        kw["temperature"] = mk.DySTreSS(0.1, 0.2, detach=False)
    if kw.get("margin") == "per_sample":
        kw["margin"] = (0.1 + 0.2 * torch.rand(n)).requires_grad_()
    if kw.get("symmetric") is False:
        kw["targets"] = torch.randperm(n)
    return kw


def check_all() -> list:
    rows = []
    for name, dtype, precision, kw in CASES:
        seen = set()
        for kernel, args, kwargs in record(dtype, precision, **_loss_kwargs(kw, 512)):
            key = (kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
            if key in seen:
                continue
            seen.add(key)
            compiled = compile_launch(kernel, args, kwargs)
            ptx = compiled.asm["ptx"]
            rows.append(dict(case=name, dtype=str(dtype).replace("torch.", ""), precision=precision,
                             kernel=kernel.fn.__name__, shared=compiled.metadata.shared,
                             wgmma=ptx.count("wgmma.mma_async"), cp_async=ptx.count("cp.async"),
                             f64_to_f32=ptx.count("cvt.rn.f32.f64"), fma_f32=ptx.count("fma.rn.f32"),
                             **ptxas_report(ptx)))
    return rows


if __name__ == "__main__":
    table = check_all()
    if "--json" in sys.argv:
        print(json.dumps(table))
    else:
        cols = list(table[0])
        print(" | ".join(cols))
        for row in table:
            print(" | ".join(str(row[c]) for c in cols))
