"""Data-parallel losses (DESIGN §8) against one process on the concatenated batch.

Groups of 2 and 3 gloo processes on this machine (file:// rendezvous, loopback only) run every case of ``CASES``:
two small encoders (a Linear tower per modality, plus a head for per-sample τ / margins) on each rank's slice of a
global batch — unequal local batch sizes — with ``mk.contrastive_loss(..., process_group=WORLD)``, backward, and
parameter gradients averaged over ranks as DDP does (all-reduce / world size, or a real DDP wrapper). The parent
process compares, against the float64 single-process loss on the whole batch:

    mean / sum   mean over ranks of the returned losses == the single-process loss; parameter gradients equal
    none         the ranks' outputs, concatenated along the anchor axis == the single-process output

Spawning is the expensive part: one group per world size runs every case and writes its results to a file.
"""
from __future__ import annotations

import datetime
import itertools
import math
import os
import traceback
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

import mmts_kernels as mk
from mmts_kernels import backends
from support import backend_marker

DIN, D = 6, 5  # encoder input and embedding sizes
WORLD_SIZES = (2, 3)
SPAWN_TIMEOUT_S = 240
N_SIZES = {2: (3, 5), 3: (1, 4, 3)}  # local batch sizes (rows; and columns of symmetric losses); 1 works
M_SIZES = {2: (4, 2), 3: (3, 1, 5)}  # local y sizes of one-directional rectangular cases
EQUAL_SIZE = 4
DATASET_SIZE = 20  # MM-TS module cases: the batch is drawn from a dataset of this many samples


@dataclass(frozen=True)
class Case:
    name: str
    loss: str = "infonce"
    hardest: bool = False
    reduction: str = "mean"
    symmetric: bool = True
    mode: str = "fixed_per_sample"  # τ (InfoNCE) or margin (max-margin): float | fixed_per_sample |
    #                                 learnable_per_sample | learnable_scalar | dystress
    heads: Optional[int] = None
    dtype: torch.dtype = torch.float64
    ddp: bool = False  # a real DistributedDataParallel wrapper instead of a manual gradient all-reduce
    equal: bool = False  # equal local batch sizes
    backend: str = "torch"
    module: Optional[str] = None  # through a loss module: "contrastive" (mk ContrastiveLoss, learnable τ) | "mmts"
    seed: int = 0
    same_label: Optional[str] = None  # with class labels (3 classes): "positive" | "ignore"


def _cases() -> list[Case]:
    modes = ("fixed_per_sample", "learnable_per_sample", "float", "learnable_scalar")
    out = []
    variants = (("infonce", False), ("max_margin", False), ("max_margin", True))
    for i, ((loss, hardest), reduction, symmetric) in enumerate(
            itertools.product(variants, ("mean", "sum", "none"), (True, False))):
        out.append(Case(
            name=f"{loss}{'_hardest' if hardest else ''}-{reduction}-{'sym' if symmetric else 'onedir'}-{i}",
            loss=loss, hardest=hardest, reduction=reduction, symmetric=symmetric, mode=modes[i % len(modes)],
            heads=2 if i % 5 == 1 else None, dtype=torch.float32 if i % 3 == 0 else torch.float64, seed=i))
    out += [
        Case("infonce-dystress-sym", mode="dystress", seed=101),
        Case("infonce-dystress-onedir-none", mode="dystress", symmetric=False, reduction="none", seed=102),
        Case("infonce-ddp", mode="learnable_per_sample", ddp=True, seed=103),
        Case("max_margin-ddp-f32", loss="max_margin", mode="learnable_per_sample", ddp=True,
             dtype=torch.float32, reduction="sum", seed=104),
        Case("max_margin_hardest-ddp-heads", loss="max_margin", hardest=True, mode="learnable_per_sample",
             ddp=True, heads=3, seed=105),
        Case("infonce-equal-sizes", mode="learnable_per_sample", equal=True, seed=106),
        Case("infonce-learnable-scalar-heads-sum", mode="learnable_scalar", heads=2, reduction="sum", seed=107),
        Case("infonce-auto-backend-f32", backend="auto", dtype=torch.float32, seed=108),
        Case("max_margin-auto-backend-f32", loss="max_margin", backend="auto", dtype=torch.float32, seed=109),
        # Through the fused backends by name (cpp in float64: it matches the reference to 1e-12).
        Case("cpp-max_margin_hardest-sym", loss="max_margin", hardest=True, mode="learnable_per_sample",
             backend="cpp", seed=120),
        Case("cpp-max_margin_hardest-onedir-heads-sum", loss="max_margin", hardest=True, symmetric=False,
             reduction="sum", mode="fixed_per_sample", heads=2, backend="cpp", seed=121),
        Case("cpp-infonce-onedir-none", symmetric=False, reduction="none", mode="learnable_per_sample",
             backend="cpp", seed=122),
        Case("cpp-infonce-learnable-scalar", mode="learnable_scalar", backend="cpp", seed=123),
        Case("cpp-infonce-dystress-f32", mode="dystress", dtype=torch.float32, backend="cpp", seed=124),
        Case("cpp-module-contrastive-learnable-tau", mode="float", module="contrastive", backend="cpp", seed=125),
        # triton under its interpreter on the CPU (slow: few, tiny cases).
        Case("triton-infonce-learnable-f32", mode="learnable_per_sample", dtype=torch.float32, backend="triton",
             seed=130),
        Case("triton-max_margin_hardest-onedir-f32", loss="max_margin", hardest=True, symmetric=False,
             mode="learnable_per_sample", dtype=torch.float32, backend="triton", seed=131),
        Case("module-contrastive-learnable-tau", mode="float", module="contrastive", seed=110),
        Case("module-contrastive-ddp-f32", mode="float", module="contrastive", ddp=True, dtype=torch.float32,
             seed=111),
        Case("module-mmts-infonce", mode="float", module="mmts", seed=112),
        Case("module-mmts-max_margin-sum", loss="max_margin", mode="float", module="mmts", reduction="sum",
             seed=113),
        # The sigmoid loss: y blocks passed around the ring (τ as the mode says, a learnable bias).
        Case("sigmoid-mean-sym", loss="sigmoid", mode="learnable_per_sample", seed=140),
        Case("sigmoid-none-onedir", loss="sigmoid", symmetric=False, reduction="none", seed=141),
        Case("sigmoid-sum-heads-f32", loss="sigmoid", mode="learnable_scalar", heads=2, reduction="sum",
             dtype=torch.float32, seed=142),
        Case("sigmoid-ddp-equal", loss="sigmoid", mode="learnable_per_sample", ddp=True, equal=True, seed=143),
        Case("sigmoid-labels-positive-onedir", loss="sigmoid", symmetric=False, same_label="positive", seed=144),
        Case("sigmoid-labels-ignore", loss="sigmoid", same_label="ignore", mode="learnable_per_sample", seed=145),
        Case("cpp-sigmoid-onedir", loss="sigmoid", symmetric=False, mode="learnable_per_sample", backend="cpp",
             seed=146),
        Case("triton-sigmoid-f32", loss="sigmoid", mode="learnable_per_sample", dtype=torch.float32,
             backend="triton", seed=147),
        # Label-aware positives: labels gathered with the features.
        Case("infonce-labels-positive-sym", same_label="positive", mode="learnable_per_sample", seed=150),
        Case("infonce-labels-ignore-onedir-none", same_label="ignore", symmetric=False, reduction="none", seed=151),
        Case("max_margin-labels-positive", loss="max_margin", same_label="positive", seed=152),
        Case("cpp-infonce-labels-positive-onedir", same_label="positive", symmetric=False, backend="cpp",
             mode="learnable_per_sample", seed=153),
        Case("cpp-infonce-labels-ignore-sym", same_label="ignore", backend="cpp", seed=154),
    ]
    return out


CASES = _cases()


# ---------------------------------------------------------------------------------------------------------------
# One case: the model and the global batch, built identically by every rank and by the single-process reference.

class Towers(torch.nn.Module):
    """A Linear tower per modality and a head that gives each sample its τ / margin from the x-side input."""

    def __init__(self, case: Case):
        super().__init__()
        H = case.heads or 1
        self.case = case
        self.enc_x = torch.nn.Linear(DIN, H * D)
        self.enc_y = torch.nn.Linear(DIN, H * D)
        self.value_head = torch.nn.Linear(DIN, H if case.heads else 1)
        base = 0.1 if case.loss == "infonce" else 0.2
        self.log_value = torch.nn.Parameter(torch.tensor(math.log(base)))
        if case.loss == "sigmoid":  # its b (only then: DDP expects every parameter to get a gradient)
            self.bias = torch.nn.Parameter(torch.tensor(-2.0))

    def embed(self, enc, a):
        z = enc(a)
        return z.view(a.shape[0], self.case.heads, D).transpose(0, 1) if self.case.heads else z

    def forward(self, a, b, fixed):
        x, y = self.embed(self.enc_x, a), self.embed(self.enc_y, b)
        mode = self.case.mode
        if mode == "float":
            value = 0.1 if self.case.loss == "infonce" else 0.2
        elif mode == "fixed_per_sample":
            value = fixed
        elif mode == "learnable_scalar":
            value = self.log_value.exp()
        elif mode == "learnable_per_sample":  # τ_i = τ₀ · (0.5 + sigmoid(head(a_i))): [N] or [H, N]
            value = self.log_value.exp() * (0.5 + torch.sigmoid(self.value_head(a)))
            value = value.T if self.case.heads else value.squeeze(1)
        else:
            value = mk.DySTreSS(0.1, 0.2)
        return x, y, ((value, self.bias) if self.case.loss == "sigmoid" else value)


def _sizes(case: Case, world: int):
    n = (EQUAL_SIZE,) * world if case.equal else N_SIZES[world]
    m = n if case.symmetric else M_SIZES[world]
    return n, m


def build(case: Case, world: int):
    """The model (float64) and the global batch: inputs, fixed per-sample values, targets, upstream weights."""
    n_sizes, m_sizes = _sizes(case, world)
    N, M = sum(n_sizes), sum(m_sizes)
    g = torch.Generator().manual_seed(case.seed)
    torch.manual_seed(case.seed)
    model = Towers(case).double()
    a = torch.randn(N, DIN, generator=g, dtype=torch.float64)
    b = torch.randn(M, DIN, generator=g, dtype=torch.float64)
    fixed = (0.05 if case.loss == "infonce" else 0.1) + 0.3 * torch.rand(N, generator=g, dtype=torch.float64)
    targets = None
    if not case.symmetric:  # local targets index the local y; globally, offset by the y's of lower ranks
        local = [torch.randint(0, m, (n,), generator=g) for n, m in zip(n_sizes, m_sizes)]
        offsets = [sum(m_sizes[:r]) for r in range(world)]
        targets = {"local": local, "global": torch.cat([t + o for t, o in zip(local, offsets)])}
    if case.reduction == "none":
        shape = ([case.heads] if case.heads else []) + ([2] if case.symmetric and case.loss != "sigmoid" else []) + [N]
        upstream = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        upstream = torch.tensor(0.5 + torch.rand((), generator=g, dtype=torch.float64).item())
    index = torch.randperm(DATASET_SIZE, generator=g)[:N] if case.module == "mmts" else None
    labels = None
    if case.same_label is not None:  # 3 classes; a row's target carries its label
        label_y = torch.randint(0, 3, (M,), generator=g)
        label_x = label_y if case.symmetric else label_y[targets["global"]]
        labels = {"x": label_x, "y": label_y}
    return model, a, b, fixed, targets, upstream, index, labels


def loss_module(case: Case, group):
    """The loss module of a ``module`` case; ``group`` is forwarded to ``mk.contrastive_loss``."""
    from mmts_kernels import modules

    common = dict(loss=case.loss, hardest_negative=case.hardest, symmetric=case.symmetric,
                  reduction=case.reduction, backend=case.backend, process_group=group)
    if case.module == "contrastive":
        return modules.ContrastiveLoss(0.1, learnable_temperature=True, **common)
    cluster_sizes = torch.randint(1, 50, (DATASET_SIZE,), generator=torch.Generator().manual_seed(case.seed))
    return modules.MMTSLoss(cluster_sizes, period=100, alpha=0.2, shift_min=0.17, shift_max=0.30, **common)


def compute_loss(case: Case, x, y, value, targets, index, group, labels=None):
    """The loss under test: ``mk.contrastive_loss`` or a loss module, with ``process_group=group``."""
    if case.module is None:
        kw = loss_kwargs(case, value, targets)
        if labels is not None:
            kw.update(labels=labels["x"] if case.symmetric else (labels["x"], labels["y"]),
                      same_label=case.same_label)
        return mk.contrastive_loss(x, y, process_group=group, **kw)
    module = loss_module(case, group).to(x.dtype)  # a float64 case learns a float64 temperature
    if case.module == "contrastive":
        return module(x, y, targets), module
    return module(x, y, step=37, index=index, targets=targets), module


def loss_kwargs(case: Case, value, targets):
    key = "margin" if case.loss == "max_margin" else "temperature"
    kw = dict(loss=case.loss, hardest_negative=case.hardest, reduction=case.reduction, symmetric=case.symmetric,
              backend=case.backend, normalize=case.mode == "dystress")
    if case.loss == "sigmoid":
        value, kw["bias"] = value
    kw[key] = value
    if targets is not None:
        kw["targets"] = targets
    return kw


def single_process(case: Case, world: int):
    """Loss and parameter gradients of one process on the concatenated batch, in float64, on the torch reference
    whatever backend the ranks use."""
    case = replace(case, backend="torch")
    model, a, b, fixed, targets, upstream, index, labels = build(case, world)
    x, y, value = model(a, b, fixed)
    out = compute_loss(case, x, y, value, None if targets is None else targets["global"], index, None, labels)
    out, module = out if isinstance(out, tuple) else (out, None)
    (out * upstream).sum().backward()
    return out.detach(), _grads(model, module)


def _params(model, module) -> list:
    return list(model.named_parameters()) + ([] if module is None else
                                             [("loss." + k, p) for k, p in module.named_parameters()])


def _grads(model, module=None) -> dict:
    return {name: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
            for name, p in _params(model, module)}


# ---------------------------------------------------------------------------------------------------------------
# The spawned group.

def _run_case(case: Case, rank: int, world: int, group):
    model, a, b, fixed, targets, upstream, index, labels = build(case, world)
    model = model.to(case.dtype)
    n_sizes, m_sizes = _sizes(case, world)
    rows = slice(sum(n_sizes[:rank]), sum(n_sizes[: rank + 1]))
    cols = slice(sum(m_sizes[:rank]), sum(m_sizes[: rank + 1]))
    if labels is not None:
        labels = {"x": labels["x"][rows], "y": labels["y"][cols]}
    a, b, fixed = a[rows].to(case.dtype), b[cols].to(case.dtype), fixed[rows].to(case.dtype)
    # The value head is unused when τ / the margin is a float or comes from the loss module.
    net = torch.nn.parallel.DistributedDataParallel(model, process_group=group,
                                                    find_unused_parameters=case.mode == "float") if case.ddp else model
    x, y, value = net(a, b, fixed)
    out = compute_loss(case, x, y, value, None if targets is None else targets["local"][rank],
                       None if index is None else index[rows], group, labels)
    out, module = out if isinstance(out, tuple) else (out, None)
    if case.reduction == "none":  # the rank's columns of the single-process output; × W feeds DDP's average
        objective = world * (out.double() * upstream[..., rows]).sum()
    else:
        objective = out.double() * upstream
    objective.backward()
    # What DDP does: all-reduce the parameter gradients and divide by the world size (the loss module's learnable
    # temperature is a replicated parameter too; under a real DDP wrapper its gradient is averaged by hand).
    params = _params(model, module) if not case.ddp else _params(torch.nn.Module(), module)
    for _, p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, group=group)
            p.grad /= world
    # The backend that actually ran ("auto" must not quietly fall back to torch where cpp should run).
    chosen = backends.resolve(case.backend, x.device).__name__
    return {"out": out.detach(), "grads": _grads(model, module), "backend": chosen}


def _worker(rank: int, world: int, tmpdir: str, cases: list) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        group = torch.distributed.group.WORLD
        results = {}
        for case in cases:
            try:  # a case that fails on every rank alike (bad input, a backend that cannot run) fails alone
                results[case.name] = _run_case(case, rank, world, group)
            except Exception:
                results[case.name] = {"error": traceback.format_exc()}
        torch.save(results, os.path.join(tmpdir, f"rank{rank}.pt"))
        torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        torch.distributed.destroy_process_group()


def run_group(world: int, cases: list, tmpdir: str) -> list[dict]:
    """Spawn ``world`` gloo processes that run every case; their results, by rank."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_worker, args=(world, tmpdir, cases), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=SPAWN_TIMEOUT_S)
    while not context.join(timeout=5):
        if datetime.datetime.now() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the group of {world} processes did not finish within {SPAWN_TIMEOUT_S} s")
    return [torch.load(os.path.join(tmpdir, f"rank{r}.pt")) for r in range(world)]


_RESULTS: dict = {}


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def group_results(request, tmp_path_factory):
    world = request.param
    if world not in _RESULTS:
        if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
            pytest.skip("torch.distributed with gloo is not available in this torch build")
        _RESULTS[world] = run_group(world, CASES, str(tmp_path_factory.mktemp(f"dist{world}")))
    return world, _RESULTS[world]


# ---------------------------------------------------------------------------------------------------------------
# Checks.

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def _raise_worker_error(results, case: Case) -> None:
    for rank, per_rank in enumerate(results):
        if "error" in per_rank[case.name]:
            pytest.fail(f"{case.name} raised on rank {rank}:\n{per_rank[case.name]['error']}", pytrace=False)


def _tol(case: Case) -> float:
    return 1e-5 if case.dtype == torch.float32 else 1e-10


def _param(case: Case):
    marks = backend_marker(case.backend) if case.backend in ("cpp", "triton") else ()
    return pytest.param(case, marks=marks, id=case.name)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_matches_single_process(group_results, case):
    world, results = group_results
    _raise_worker_error(results, case)
    expected = backends.resolve(case.backend, torch.device("cpu")).__name__  # "auto": cpp wherever it runs
    assert [results[r][case.name]["backend"] for r in range(world)] == [expected] * world
    ref_out, ref_grads = single_process(case, world)
    outs = [results[r][case.name]["out"] for r in range(world)]
    expected_dtype = torch.float32 if case.dtype == torch.float32 else torch.float64
    assert all(o.dtype == expected_dtype for o in outs), [o.dtype for o in outs]
    if case.reduction == "none":
        n_sizes, _ = _sizes(case, world)
        for r, o in enumerate(outs):
            assert o.shape[-1] == n_sizes[r] and o.shape[:-1] == ref_out.shape[:-1], (o.shape, ref_out.shape)
        got = torch.cat(outs, dim=-1)
    else:
        assert all(o.shape == () for o in outs)
        got = torch.stack(outs).double().mean()  # the mean of the rank losses is the single-process loss
    err = _rel(got, ref_out)
    assert err <= _tol(case), f"{case.name}, world {world}: loss rel err {err:.2e}"
    # Each gradient relative to its own norm, floored at a tenth of the norm of all of them: some are 0 in exact
    # arithmetic (the y-tower bias under one-directional InfoNCE: a shift of every y leaves each row's softmax alone).
    floor = 0.1 * torch.cat([g.flatten() for g in ref_grads.values()]).norm().item()
    for r in range(world):
        for name, ref in ref_grads.items():
            g = results[r][case.name]["grads"][name]
            err = (g.double() - ref).norm().item() / max(ref.norm().item(), floor)
            assert err <= _tol(case), f"{case.name}, world {world}, rank {r}: grad {name} rel err {err:.2e}"


SCALING_CASES = [next(c for c in CASES if (c.loss, c.hardest, c.reduction) == variant and c.mode != "float")
                 for variant in (("infonce", False, "mean"), ("max_margin", False, "mean"),
                                 ("max_margin", True, "mean"), ("infonce", False, "sum"))]


@pytest.mark.parametrize("case", SCALING_CASES, ids=lambda c: c.name)
def test_gradient_not_scaled_by_world_size(group_results, case):
    """The classic data-parallel bug (open_clip#616, lightly#1528): gradients W times too large or too small."""
    world, results = group_results
    _raise_worker_error(results, case)
    _, ref_grads = single_process(case, world)
    ref = torch.cat([g.flatten() for g in ref_grads.values()])
    got = torch.cat([results[0][case.name]["grads"][k].double().flatten() for k in ref_grads])
    ratio = float(got @ ref / (ref @ ref))
    assert abs(ratio - 1) < 1e-4, f"gradients are {ratio:.4f}× the single-process ones (world size {world})"
    assert abs(ratio - world) > 0.5 and abs(ratio - 1 / world) > 0.1


def test_process_group_needs_initialized_distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("torch.distributed is initialized in this process")
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="process_group"):
        mk.info_nce(x, y, process_group=object())


def test_single_rank_group_still_needs_negatives(tmp_path):
    """A one-process group takes the local shortcut; it must still refuse a batch without negatives (§7)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        x, y = torch.randn(1, 3), torch.randn(1, 3)
        for kw in (dict(loss="infonce"), dict(loss="max_margin"), dict(loss="max_margin", hardest_negative=True)):
            with pytest.raises(ValueError, match="negative"):
                mk.contrastive_loss(x, y, process_group=dist.group.WORLD, **kw)
        two = torch.randn(2, 3)
        torch.testing.assert_close(mk.info_nce(two, two + 1, process_group=dist.group.WORLD), mk.info_nce(two, two + 1))
    finally:
        dist.destroy_process_group()
