"""Outputs of a benchmark sweep: the CSV, the table on stdout, the markdown summary and the PNG plot.

A result row is a dict with the CSV fields (``CSV_FIELDS``) plus ``note`` (why a value is missing: OOM, a compile
failure, …), which goes to the table and the markdown but not to the CSV. Missing values are ``nan``.
``ms_q1``/``ms_q3`` are the quartiles of the timed repeats (``repeats`` of them); a cell whose spread is too wide
to trust, or whose forward took longer than its forward+backward, is flagged in the table (``trust_flags``).
"""
from __future__ import annotations

import csv
import math
import os
import platform
import re
import textwrap
from collections import defaultdict
from typing import Dict, List, Optional

import torch

from .competitors import SIGLIP_CHUNK

CSV_FIELDS = ["device", "backend", "loss", "dtype", "N", "M", "D", "pass", "ms_median", "peak_mem_bytes", "tflops",
              "ms_q1", "ms_q3", "repeats"]
REFERENCE = "torch"
RIVAL = "openclip_compile"  # what a user would otherwise run at its fastest: the second ratio column
GEMM = "gemm"
# A cell is flagged when the interquartile range of some pass's repeats exceeds this fraction of its median.
NOISY_SPREAD = 0.25
# Flops of one pass of a loss over S = x yᵀ, in units of N·M·D: forward 2 (S), backward 6 (S again, dS·y, dSᵀ·x).
FLOP_FACTOR = {"forward": 2, "backward": 6, "full": 8}


def flops(backend: str, pass_: str, N: int, M: int, D: int) -> int:
    return 2 * N * M * D if backend == GEMM else FLOP_FACTOR[pass_] * N * M * D


def tflops(backend: str, pass_: str, N: int, M: int, D: int, ms: float) -> float:
    if ms is None or not math.isfinite(ms) or ms <= 0:
        return float("nan")
    return flops(backend, pass_, N, M, D) / (ms * 1e-3) / 1e12


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo: what result files are named after."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def file_stem(device_name: str, date: str) -> str:
    """``<device>-<date>`` with the device name made safe for a file name."""
    safe = re.sub(r"[^A-Za-z0-9._+]+", "-", device_name).strip("-.") or "device"
    return f"{safe}-{date}"


def new_stem(out_dir: str, stem: str, suffixes) -> str:
    """``out_dir/stem`` (then ``stem-2``, ``stem-3``, …): the first path stem none of whose ``suffixes`` files exists,
    so that a run never overwrites an earlier one."""
    os.makedirs(out_dir, exist_ok=True)
    base, k = os.path.abspath(os.path.join(out_dir, stem)), 1
    path = base
    while any(os.path.exists(path + suffix) for suffix in suffixes):
        k += 1
        path = f"{base}-{k}"
    return path


def write_csv(rows: List[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "x", newline="") as f:  # "x": never overwrite a result
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for r in rows:
            writer.writerow([_csv_value(r.get(k, math.nan)) for k in CSV_FIELDS])


def start_csv(path: str) -> None:
    """A new CSV with only the header ("x": never overwrite a result); ``append_csv`` adds rows as they come."""
    write_csv([], path)


def append_csv(rows: List[dict], path: str) -> None:
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        for r in rows:
            writer.writerow([_csv_value(r.get(k, math.nan)) for k in CSV_FIELDS])


def _csv_value(v):
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.6g}"
    return "nan" if v is None else v


# ---------------------------------------------------------------------------------------------------------------
# The summary table: one line per (loss, dtype, N, D, backend), the three passes side by side.

def summary(rows: List[dict]) -> List[dict]:
    """Pivoted lines with ratios against the torch reference, the compiled open_clip-style loss and the GEMM rate
    of the same (dtype, N, D)."""
    cells: Dict[tuple, dict] = defaultdict(dict)
    notes: Dict[tuple, set] = defaultdict(set)
    gemm: Dict[tuple, dict] = {}
    for r in rows:
        if r["backend"] == GEMM:
            gemm[(r["dtype"], r["N"], r["D"])] = r
            continue
        key = (r["loss"], r["dtype"], r["N"], r["D"], r["backend"])
        cells[key][r["pass"]] = r
        if r.get("note"):
            notes[key].add(r["note"])
    lines = []
    for key, passes in cells.items():
        loss, dtype, N, D, backend = key
        ref = cells.get((loss, dtype, N, D, REFERENCE), {})
        full, ref_full = passes.get("full", {}), ref.get("full", {})
        rival_full = cells.get((loss, dtype, N, D, RIVAL), {}).get("full", {})
        g = gemm.get((dtype, N, D), {})
        spread = max((_spread(r) for r in passes.values()), default=math.nan, key=_nan_low)
        flags = trust_flags(passes)
        lines.append(dict(
            loss=loss, dtype=dtype, N=N, D=D, backend=backend, spread=spread,
            fwd_ms=_get(passes, "forward", "ms_median"), bwd_ms=_get(passes, "backward", "ms_median"),
            full_ms=full.get("ms_median", math.nan), full_tflops=full.get("tflops", math.nan),
            of_gemm=ratio(full.get("tflops"), g.get("tflops")),
            full_mib=_mib(full.get("peak_mem_bytes")),
            speedup=ratio(ref_full.get("ms_median"), full.get("ms_median")),
            mem_ratio=ratio(full.get("peak_mem_bytes"), ref_full.get("peak_mem_bytes")),
            vs_rival=ratio(rival_full.get("ms_median"), full.get("ms_median")),
            note="; ".join(flags + sorted(notes[key])),
        ))
    order: Dict[tuple, int] = {}  # each loss's backends in the order they were measured (the sweep's plan)
    for r in rows:
        order.setdefault((r["loss"], r["backend"]), len(order))
    lines.sort(key=lambda l: (l["loss"], l["dtype"], l["D"], l["N"], order[(l["loss"], l["backend"])]))
    return lines


def trust_flags(passes: Dict[str, dict]) -> List[str]:
    """Why the times of one cell (its rows by pass) should not be trusted; empty when nothing looks wrong."""
    flags = []
    wide = [p for p, r in passes.items() if _spread(r) > NOISY_SPREAD]
    if wide:
        worst = max(_spread(passes[p]) for p in wide)
        flags.append(f"NOISY: repeats spread {worst:.0%} of the median ({', '.join(wide)})")
    fwd, full = _get(passes, "forward", "ms_median"), _get(passes, "full", "ms_median")
    if math.isfinite(fwd) and math.isfinite(full) and fwd > full:
        flags.append("NOISY: forward slower than forward+backward")
    return flags


def _spread(row: dict) -> float:
    """The interquartile range of a row's repeats over its median (nan when unknown, or from fewer than 3 repeats:
    no spread to speak of)."""
    try:
        q1, q3, med = float(row.get("ms_q1")), float(row.get("ms_q3")), float(row.get("ms_median"))
        if int(row.get("repeats") or 0) < 3:
            return math.nan
    except (TypeError, ValueError):
        return math.nan
    return (q3 - q1) / med if all(map(math.isfinite, (q1, q3, med))) and med > 0 else math.nan


def _nan_low(v: float) -> float:
    return v if math.isfinite(v) else -math.inf


def gemm_lines(rows: List[dict]) -> List[dict]:
    out = [dict(dtype=r["dtype"], N=r["N"], D=r["D"], ms=r["ms_median"], tflops=r["tflops"],
                mib=_mib(r["peak_mem_bytes"]), spread=_spread(r),
                note="; ".join(trust_flags({"forward": r}) + ([r["note"]] if r.get("note") else [])))
           for r in rows if r["backend"] == GEMM]
    return sorted(out, key=lambda l: (l["dtype"], l["D"], l["N"]))


def _backend_order(rows):
    seen = []
    for r in rows:
        if r["backend"] not in seen:
            seen.append(r["backend"])
    return seen


def _get(passes, p, field):
    return passes.get(p, {}).get(field, math.nan)


def ratio(a, b) -> float:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return math.nan
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def _mib(nbytes) -> float:
    try:
        v = float(nbytes)
    except (TypeError, ValueError):
        return math.nan
    return v / 2**20


def fmt(v, spec: str, suffix: str = "") -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "—"
    return format(v, spec) + suffix


_COLUMNS = [  # the markdown table: (title, key, format, suffix)
    ("loss", "loss", "", ""), ("dtype", "dtype", "", ""), ("N", "N", "d", ""), ("D", "D", "d", ""),
    ("backend", "backend", "", ""), ("fwd ms", "fwd_ms", ".2f", ""), ("bwd ms", "bwd_ms", ".2f", ""),
    ("fwd+bwd ms", "full_ms", ".2f", ""), ("spread", "spread", ".0%", ""), ("TFLOP/s", "full_tflops", ".3f", ""),
    ("of GEMM", "of_gemm", ".0%", ""),
    ("peak MiB", "full_mib", ".1f", ""), ("speed vs torch", "speedup", ".2f", "×"),
    ("mem vs torch", "mem_ratio", ".2f", "×"), (f"speed vs {RIVAL}", "vs_rival", ".2f", "×"),
    ("note", "note", "", ""),
]


def _table_cells(lines: List[dict]) -> List[List[str]]:
    return [[fmt(l[key], spec, suffix) for _, key, spec, suffix in _COLUMNS] for l in lines]


# ---------------------------------------------------------------------------------------------------------------
# The terminal table: fixed columns, so that lines printed one at a time as cells finish line up, and at most
# WIDTH characters. Loss, dtype and D head each group of lines; a line's notes go on the lines below it.

WIDTH = 120
_LINE = [  # (title, key, width, format, suffix); the backend is left-aligned, the rest right-aligned
    ("N", "N", 6, "d", ""), ("backend", "backend", 16, "", ""), ("fwd ms", "fwd_ms", 8, "num", ""),
    ("bwd ms", "bwd_ms", 8, "num", ""), ("f+b ms", "full_ms", 8, "num", ""), ("spread", "spread", 6, ".0%", ""),
    ("TFLOP/s", "full_tflops", 7, ".3f", ""), ("%GEMM", "of_gemm", 5, ".0%", ""),
    ("peak MiB", "full_mib", 8, "num", ""), ("×torch", "speedup", 7, "ratio", "×"),
    ("mem÷torch", "mem_ratio", 9, "ratio", "×"), ("×oc_comp", "vs_rival", 8, "ratio", "×"),
]
LEGEND = textwrap.fill(
    "×torch, ×oc_comp: the fwd+bwd time of torch (the eager reference) and of openclip_compile over this one's "
    "(higher is faster); mem÷torch: this fwd+bwd peak memory over torch's (lower is leaner); %GEMM: the fwd+bwd "
    "TFLOP/s as a fraction of the bare GEMM's; spread: the widest interquartile range of a pass's repeats over "
    "its median.", WIDTH)


def _cell(value, spec: str, suffix: str) -> str:
    if spec == "num":  # at least 3 significant digits in 8 characters, from 0.001 to 10⁸ (ms: past a day)
        spec = ".3f" if abs(value) < 10 else ".1f" if abs(value) < 1e5 else ".0f"
    elif spec == "ratio":  # 7 characters up to 10⁶ (a ratio beyond that reads as an exponent)
        spec = ".2f" if abs(value) < 1e3 else ".0f" if abs(value) < 1e6 else ".1e"
    return fmt(value, spec, suffix)


def table_header() -> str:
    return " ".join(t.ljust(w) if key == "backend" else t.rjust(w) for t, key, w, *_ in _LINE).rstrip()


def group_title(loss: str, dtype: str, D: int) -> str:
    return f"── {loss}, {dtype}, D = {D} " + "─" * 40


def format_line(line: dict) -> List[str]:
    """One table line (and its notes, wrapped, on the lines below it), each at most WIDTH characters."""
    cells = [_cell(line.get(key, math.nan), spec, suffix) for _, key, _, spec, suffix in _LINE]
    text = " ".join(c.ljust(w) if key == "backend" else c.rjust(w)
                    for c, (_, key, w, *_) in zip(cells, _LINE)).rstrip()
    out = [text[:WIDTH]]
    if line.get("note"):
        out += textwrap.wrap(line["note"], WIDTH, initial_indent=" " * 8 + "note: ", subsequent_indent=" " * 14)
    return out


def table_lines(rows: List[dict]) -> List[dict]:
    """The summary lines of ``rows`` in table order, each (loss, dtype, N, D) led by the GEMM rate of its
    (dtype, N, D) as a "gemm" line; GEMM rates with no loss line yet come last, in a group of loss "gemm"."""
    gemm = {(g["dtype"], g["N"], g["D"]): _gemm_line(g) for g in gemm_lines(rows)}
    out, placed = [], set()
    for line in summary(rows):
        key = (line["dtype"], line["N"], line["D"])
        if key in gemm and (line["loss"],) + key not in placed:
            placed.add((line["loss"],) + key)
            out.append(dict(gemm[key], loss=line["loss"]))
        out.append(line)
    used = {k[1:] for k in placed}
    return out + [g for key, g in gemm.items() if key not in used]


def _gemm_line(g: dict) -> dict:
    return dict(loss=GEMM, dtype=g["dtype"], N=g["N"], D=g["D"], backend=GEMM, fwd_ms=g["ms"], spread=g["spread"],
                full_tflops=g["tflops"], full_mib=g["mib"], note=g["note"])


def cell_lines(rows: List[dict], backend: str, loss: str, dtype: str, N: int, D: int) -> List[str]:
    """The printed lines of one cell (a backend's, or the GEMM rate's) with the ratios ``rows`` allow so far."""
    if backend == GEMM:
        lines = [_gemm_line(g) for g in gemm_lines(rows) if (g["dtype"], g["N"], g["D"]) == (dtype, N, D)]
    else:
        lines = [l for l in summary(rows) if (l["backend"], l["loss"], l["dtype"], l["N"], l["D"]) ==
                 (backend, loss, dtype, N, D)]
    return [text for line in lines for text in format_line(line)]


def format_table(rows: List[dict]) -> str:
    """Plain-text table for stdout, at most WIDTH characters wide: the lines in groups, with the GEMM rate."""
    out, group = [table_header()], None
    for line in table_lines(rows):
        if (line["loss"], line["dtype"], line["D"]) != group:
            group = (line["loss"], line["dtype"], line["D"])
            out.append(group_title(*group))
        out += format_line(line)
    return "\n".join(out)


def markdown(rows: List[dict], meta: Dict[str, str]) -> str:
    """The markdown summary: how the run was made, then the table and the GEMM rate."""
    out = [f"# Benchmark: {meta.get('device', '?')}, {meta.get('date', '?')}", ""]
    out += [f"- **{k}**: {v}" for k, v in meta.items()]
    out += ["", "Times are medians after warm-up (GPU: `triton.testing.do_bench`; CPU: repeat-and-median, each "
            "repeat one forward and its backward, at least 3 repeats, more while cheap or spread out); peak "
            "memory is the op's growth over its inputs (GPU: `torch.cuda.max_memory_allocated`; CPU: RSS high-water "
            "mark growth, measured in a worker process in which glibc gives every buffer of 256 KiB or more its own "
            "mapping, so that memory freed before the op is not reused unseen). TFLOP/s count 8·N·M·D per "
            "forward+backward (2 forward, 6 backward). \"vs torch\": the eager torch reference's fwd+bwd time "
            "divided by this backend's (higher is faster), and this backend's fwd+bwd peak memory divided by the reference's (lower is leaner); "
            f"\"vs {RIVAL}\" likewise against the open_clip-style loss under torch.compile. "
            "\"of GEMM\": the fwd+bwd rate as a fraction of one bare N×D·D×N GEMM's rate. \"spread\": the "
            "widest interquartile range of a pass's timed repeats, as a fraction of its median; cells over "
            f"{NOISY_SPREAD:.0%}, or whose forward took longer than their forward+backward, are marked NOISY in the "
            "note: re-run them on a quiet machine before quoting them. Competitors (`bench/competitors.py`): "
            "openclip = open_clip's ClipLoss with the per-sample τ (S = x·yᵀ in the input dtype, cross_entropy over "
            "S/τ[:, None] and Sᵀ/τ[:, None]; for max-margin the plain-torch hinge; for the sigmoid loss "
            "open_clip's own SigLipLoss with logit_scale = 1/τ per row), eager; openclip_compile = the same under "
            f"torch.compile; openclip_chunked = open_clip's chunked SigLipLoss (chunk_size={SIGLIP_CHUNK}; from its "
            "main branch, written in bench/competitors.py as no release has it), sigmoid only; inf_cl = Inf-CL's "
            "cal_inf_loss, one scalar τ (the mean of the per-sample ones), InfoNCE only.", ""]
    header = [t for t, *_ in _COLUMNS]
    out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in _table_cells(summary(rows))]
    g = gemm_lines(rows)
    if g:
        out += ["", "## GEMM rate", "", "| dtype | N | D | ms | spread | TFLOP/s | note |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {l['dtype']} | {l['N']} | {l['D']} | {fmt(l['ms'], '.3f')} | {fmt(l['spread'], '.0%')} | "
                f"{fmt(l['tflops'], '.3f')} | {l['note']} |" for l in g]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The plot: fwd+bwd time and peak memory against N, log-log, one line per backend.

def plot(rows: List[dict], path: str, title: str = "") -> Optional[str]:
    """Write the PNG; returns None, or why no plot was made (matplotlib missing, nothing to plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[plot]'): no plot"
    groups = sorted({(r["loss"], r["dtype"], r["D"]) for r in rows if r["backend"] != GEMM})
    if not groups:
        return "nothing to plot"
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    backends = [b for b in _backend_order(rows) if b != GEMM]
    for (loss, dtype, D), (ax_t, ax_m) in zip(groups, axes):
        for b in backends:
            pts = sorted((r["N"], r["ms_median"], r["peak_mem_bytes"]) for r in rows
                         if (r["backend"], r["loss"], r["dtype"], r["D"], r["pass"]) == (b, loss, dtype, D, "full"))
            t = [(n, ms) for n, ms, _ in pts if _finite(ms)]
            m = [(n, mem / 2**20) for n, _, mem in pts if _finite(mem) and mem > 0]
            if t:
                ax_t.plot(*zip(*t), marker="o", label=b)
            if m:
                ax_m.plot(*zip(*m), marker="o", label=b)
        g = sorted((r["N"], r["ms_median"]) for r in rows
                   if r["backend"] == GEMM and r["dtype"] == dtype and r["D"] == D and _finite(r["ms_median"]))
        if g:  # fwd+bwd does 8·N²·D flops = 4 bare GEMMs: the time it would take at the GEMM rate
            ax_t.plot([n for n, _ in g], [4 * ms for _, ms in g], linestyle="--", color="gray",
                      label="8·N²·D flops at the bare-GEMM rate")
        ax_t.set_title(f"{loss}, {dtype}, D={D}: forward+backward time", fontsize=10)
        ax_m.set_title(f"{loss}, {dtype}, D={D}: forward+backward peak memory", fontsize=10)
        ax_t.set_ylabel("ms (median)")
        ax_m.set_ylabel("MiB")
        for ax in (ax_t, ax_m):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (= M)")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
