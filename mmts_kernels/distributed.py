"""Data-parallel losses over torch.distributed (DESIGN §8): local loss against negatives gathered from every rank.

Every rank holds its local pairs (x_i, y_i, τ_i, m_i), i in [0, n_r); the global batch is their concatenation in
rank order, N = Σ_r n_r, and rank r's samples start at offset o_r = Σ_{r' < r} n_r' (local batch sizes may differ).
Each rank scores only its own anchors, but against every candidate of the global batch:

    row direction     local x_i (τ_i, m_i)  against all gathered y, positive column o_r + t_i
    column direction  local y_j (τ_j, m_j)  against all gathered x, positive row    o_r + j     (symmetric only)

Both directions are row statistics of a backend's ``compute_stats`` (cols=False): the column direction is the row
direction of Sᵀ with x and y swapped, and column j of the single-process loss uses τ_j and m_j, the values of
pair j — a local sample. So per-sample temperatures and margins never travel; only x and y are gathered (x only
for symmetric losses). Under DySTreSS the per-pair τ is a function of S and is recomputed where it is needed.
The per-anchor terms are exactly those of one process on the concatenated batch, and ``losses.per_anchor_terms``
builds them from the two row-statistics passes unchanged.

Gradients. The gather is an autograd Function: forward all-gathers the (padded) local blocks; backward
reduce-scatters (sums) the gradient of the gathered tensor, so each rank receives Σ_r' ∂L_r'/∂(its samples).
The local anchors also receive their direct gradient. Under DDP, which averages parameter gradients over the
W ranks, every parameter then gets (1/W) ∂(Σ_r L_r)/∂θ.

Reductions — the rule: **the mean over ranks of the returned losses is the single-process value**, so that

    mean_r L_r = L_single     and, with DDP's gradient averaging,   ∇θ = ∇θ L_single   (no world-size factor)

    "mean"  L_r = W · Σ_{local terms} / C, with C the GLOBAL count of DESIGN §4: InfoNCE 2N (N one-directional),
            max-margin Σ / 2N(N−1) (N(M−1) one-directional, M = Σ_r m_r), hardest negative 2N (N); per head,
            heads summed. With equal local batches this is the local mean, as in open_clip.
    "sum"   L_r = W · Σ_{local terms}   (mean over ranks = the global sum)
    "none"  this rank's per-anchor terms, unscaled: [2, n_r] symmetric, [n_r] one-directional, [H, …] with heads —
            the single-process output's columns o_r … o_r + n_r − 1, so an all_gather of them along the last axis
            is the single-process output. Reduce them yourself the same way: a sum of them that feeds DDP must be
            multiplied by W (what reduction="sum" does).

With explicit ``targets`` (one-directional), each rank's targets index its LOCAL y; they are offset by the number
of y samples on lower ranks. Every rank of the group must call the loss, and call backward on it, the same number
of times in the same order (the gather's backward is a collective).

NT-Xent (``distributed_nt_xent``) follows the same rules with one row-statistics pass: this rank's anchors (its z1
and z2 rows) against the gathered Z = cat(all z1, all z2), with global targets and self columns.

Labels travel with the features they label (gathered alongside, no gradient): the statistics compare this rank's
row labels with the gathered column labels, and same_label="positive"'s per-class sums run over the gathered
columns, so the terms stay those of one process.

The sigmoid loss (``distributed_sigmoid``) gathers nothing: it is one sum over all pairs with per-row τ_i and b_i,
so this rank's rows need every y block once, not at once. As in the SigLIP paper, the y blocks travel around the
ring (W − 1 point-to-point shifts, each rank sending to rank + 1 and receiving from rank − 1), and this rank adds
the sig statistic of its x against each block (the targets only in its own block; −1, no positive, elsewhere). The
backward runs the ring again, recomputing each block's statistic, and sends each block's gradient along with it,
one more shift bringing it home: memory per rank O((n_r + max_r m_r)·D), never the global batch. Same reduction
rules ("mean" is Σ / N, the global number of rows).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
import torch.distributed as dist

from . import losses
from .stats import Stats

# Collective names changed in torch 2.13 (the *_into_tensor / *_tensor names are deprecated there).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def distributed_loss(problem, impl, process_group):
    """The loss of ``problem`` (this rank's local batch) with negatives gathered over ``process_group``."""
    group = _check_group(process_group)
    world = dist.get_world_size(group)
    if world == 1:
        if problem.loss != "sigmoid":
            _check_negatives(problem.y.shape[1])
        return losses.loss_from_problem(problem, impl)
    rank = dist.get_rank(group)
    x, y = problem.x, problem.y  # [H, n, D], [H, m, D]
    n, m = x.shape[1], y.shape[1]
    sizes = _all_sizes((n, m), x.device, group)  # [W][2]
    n_sizes, m_sizes = [s[0] for s in sizes], [s[1] for s in sizes]
    n_all, m_all = sum(n_sizes), sum(m_sizes)
    row_offset, col_offset = sum(n_sizes[:rank]), sum(m_sizes[:rank])
    if problem.loss == "sigmoid":  # defined on a single pair: no negatives needed
        return distributed_sigmoid(problem, impl, group, sizes)
    _check_negatives(m_all)

    row_request = replace(problem.request, cols=False)
    if problem.symmetric:  # n == m on every rank: gather x and y in one collective
        xy_all = gather_with_grad(torch.stack((x, y)), n_sizes, dim=2, group=group)
        x_all, y_all = xy_all[0], xy_all[1]
    else:
        x_all, y_all = None, gather_with_grad(y, m_sizes, dim=1, group=group)
    row_labels = col_labels = positives = None
    if problem.labels is not None:
        lx, ly = problem.labels
        ly_all = _gather_labels(ly, m_sizes, group)
        lx_all = _gather_labels(lx, n_sizes, group) if problem.symmetric else None
        row_labels, col_labels = (lx, ly_all), (ly, lx_all)
        positives = losses.label_positives(problem, (x, y_all, lx, ly_all), (y, x_all, ly, lx_all))

    row = impl.compute_stats(x, y_all, problem.tau, problem.margin, problem.targets + col_offset, row_request,
                             **losses.kernel_extras(problem, row_labels))
    if problem.symmetric:
        own = torch.arange(n, device=x.device) + row_offset
        col = impl.compute_stats(y, x_all, problem.tau, problem.margin, own, row_request,
                                 **losses.kernel_extras(problem, col_labels))
        stats = Stats(pos=row.pos, lse=row.lse, hinge=row.hinge, cnt=row.cnt, hard=row.hard, arg=row.arg,
                      ws=row.ws, lse_c=col.lse, hinge_c=col.hinge, cnt_c=col.cnt, hard_c=col.hard,
                      arg_c=col.arg, ws_c=col.ws)
    else:
        stats = row
    terms = losses.per_anchor_terms(
        stats, loss=problem.loss, hardest_negative=problem.hardest_negative, tau=problem.tau,
        dystress=problem.request.dystress, margin=problem.margin, symmetric=problem.symmetric,
        positives=positives,
    )
    total = losses.reduce_terms(terms, loss=problem.loss, hardest_negative=problem.hardest_negative,
                                reduction="sum" if problem.reduction == "mean" else problem.reduction,
                                num_cols=m_all, has_heads=problem.has_heads)
    if problem.reduction == "none":
        return total
    if problem.reduction == "sum":
        return total * world
    global_count = losses.mean_count(loss=problem.loss, hardest_negative=problem.hardest_negative,
                                     anchors=2 * n_all if problem.symmetric else n_all, num_cols=m_all)
    return total * (world / global_count)


def distributed_nt_xent(problem, impl, process_group):
    """NT-Xent of this rank's views against the views of every rank (the module docstring's rules).

    The global Z is every rank's z1 in rank order, then every rank's z2 (B = Σ_r b_r rows each): exactly the Z of
    one process on the concatenated batch. This rank's 2b anchors are its z1 rows (global o_r + i) and z2 rows
    (global B + o_r + i), scored against all 2B rows with targets and self columns in global indices; per-anchor
    temperatures stay local. "mean" divides by the global 2B."""
    group = _check_group(process_group)
    world = dist.get_world_size(group)
    if world == 1:
        _check_views_total(problem.z1.shape[1])
        return losses.nt_xent_from_problem(problem, impl)
    rank = dist.get_rank(group)
    z1, z2 = problem.z1, problem.z2  # [H, b, D] each
    b = z1.shape[1]
    sizes = [s[0] for s in _all_sizes((b,), z1.device, group)]
    total, offset = sum(sizes), sum(sizes[:rank])
    _check_views_total(total)
    views = gather_with_grad(torch.stack((z1, z2)), sizes, dim=2, group=group)  # [2, H, B, D]
    Z = torch.cat((views[0], views[1]), dim=1)  # [H, 2B, D]
    anchors = torch.cat((z1, z2), dim=1)  # [H, 2b, D]: this rank's rows of Z, with their direct gradient
    targets, self_cols = losses.nt_xent_indices(b, offset, total, z1.device)
    extras, positives = {}, None
    if problem.labels is not None:
        every = _gather_labels(problem.labels, sizes, group)
        extras, positives = losses.nt_xent_labeled(problem, anchors, Z, torch.cat((problem.labels, problem.labels)),
                                                   torch.cat((every, every)), self_cols)
    stats = impl.compute_stats(anchors, Z, problem.tau, None, targets, problem.request, self_cols=self_cols,
                               **extras)
    terms = losses.nt_xent_terms(stats, problem.tau, problem.request.dystress, b, positives)
    reduction = problem.reduction
    local = losses.reduce_terms(terms, loss="infonce", hardest_negative=False,
                                reduction="sum" if reduction == "mean" else reduction, num_cols=2 * total,
                                has_heads=problem.has_heads)
    if reduction == "none":
        return local
    return local * world if reduction == "sum" else local * (world / (2 * total))


def distributed_sigmoid(problem, impl, group, sizes):
    """The sigmoid loss of this rank's rows against every rank's y block, passed around the ring (module
    docstring). ``sizes``: every rank's (n, m)."""
    world = len(sizes)
    n_all = sum(s[0] for s in sizes)
    sig = _SigmoidRing.apply(problem.x, problem.y, problem.tau, problem.bias,
                             (problem, impl, group, tuple(s[1] for s in sizes)))
    local = losses.reduce_terms(sig, loss="sigmoid", hardest_negative=False,
                                reduction="sum" if problem.reduction == "mean" else problem.reduction,
                                num_cols=problem.y.shape[1], has_heads=problem.has_heads)
    if problem.reduction == "none":
        return local
    return local * world if problem.reduction == "sum" else local * (world / n_all)


class _SigmoidRing(torch.autograd.Function):
    """sig [H, n] of local x against every rank's y block; the blocks (and, backward, their gradients) travel
    around the ring. Only the local x, y, τ, b and one block at a time are held."""

    @staticmethod
    def forward(ctx, x, y, tau, bias, meta):
        problem, impl, group, m_sizes = meta
        ctx.meta = meta
        ctx.save_for_backward(x, y, tau, bias)
        total = None
        for k, block, labels, targets in _ring_blocks(problem, y, group, m_sizes):
            sig = impl.compute_stats(x, block, tau, None, targets, problem.request, bias=bias,
                                     **_labels_arg(problem, labels)).sig
            total = sig if total is None else total + sig
        return total

    @staticmethod
    def backward(ctx, grad):
        problem, impl, group, m_sizes = ctx.meta
        x, y, tau, bias = ctx.saved_tensors
        leaves = [t.detach().requires_grad_() for t in (x, tau, bias)]
        sums = [torch.zeros_like(t) for t in leaves]
        carried = None  # the gradient of the block now here, summed over the ranks it has visited
        for k, block, labels, targets in _ring_blocks(problem, y, group, m_sizes):
            if k > 0:  # the block moved one rank on; its gradient so far moves with it
                carried = _ring_shift(carried, block.shape, group)
            block = block.detach().requires_grad_()
            with torch.enable_grad():
                sig = impl.compute_stats(leaves[0], block, leaves[1], None, targets, problem.request,
                                         bias=leaves[2], **_labels_arg(problem, labels)).sig
                grads = torch.autograd.grad(sig, leaves + [block], grad)
            for acc, g in zip(sums, grads[:3]):
                acc += g
            carried = grads[3] if carried is None else carried + grads[3]
        # the last block here is rank + 1's; one more shift brings every block's gradient home
        dy = _ring_shift(carried, y.shape, group) if len(m_sizes) > 1 else carried
        return sums[0], dy, sums[1], sums[2], None


def _ring_blocks(problem, y, group, m_sizes):
    """(step k, the y block of rank (rank − k) mod W, its labels, the targets) for k = 0 … W − 1: the local block
    with the local targets first, then each block received from rank − 1 with no positive (targets −1)."""
    world, rank = len(m_sizes), dist.get_rank(group)
    block, labels = y, (problem.labels[1] if problem.labels is not None else None)
    no_positive = torch.full_like(problem.targets, -1)
    for k in range(world):
        if k > 0:
            source = (rank - k) % world
            shape = (block.shape[0], m_sizes[source], block.shape[2])
            block = _ring_shift(block, shape, group)
            if labels is not None:
                labels = _ring_shift(labels, (m_sizes[source],), group)
        yield k, block, labels, (problem.targets if k == 0 else no_positive)


def _labels_arg(problem, column_labels) -> dict:
    if problem.request.same_label is None:
        return {}
    return {"labels": (problem.labels[0], column_labels)}


def _ring_shift(tensor: torch.Tensor, recv_shape, group) -> torch.Tensor:
    """Send ``tensor`` to rank + 1 and return what rank − 1 sends (of shape ``recv_shape``), in one batch of
    point-to-point operations (no ordering deadlock)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    out = tensor.new_empty(recv_shape)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), group=group, group_peer=(rank + 1) % world),
           dist.P2POp(dist.irecv, out, group=group, group_peer=(rank - 1) % world)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return out


def _gather_labels(labels: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Every rank's labels in rank order (no gradient)."""
    return gather_with_grad(labels.view(1, -1), sizes, dim=1, group=group).view(-1)


def _check_views_total(total: int) -> None:
    if total < 2:
        raise ValueError(f"z1 and z2 must hold at least 2 samples over the process group (B={total}): a view's "
                         "anchor needs a negative besides its own other view")


def _check_negatives(m_all: int) -> None:
    if m_all < 2:
        raise ValueError(f"y must hold at least 2 samples over the process group (M={m_all}): every row needs "
                         "a negative")


def _check_group(process_group):
    if not dist.is_available():
        raise ValueError("process_group: this torch build has no torch.distributed")
    if not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group first")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD), got {type(process_group).__name__}")
    if dist.get_rank(process_group) < 0:
        raise ValueError("process_group: this process is not a member of the group")
    return process_group


def _all_sizes(local: Sequence[int], device: torch.device, group) -> list[list[int]]:
    """Every rank's ``local`` sizes, in rank order (one small all-gather)."""
    world = dist.get_world_size(group)
    mine = torch.tensor(local, dtype=torch.int64, device=device)
    out = torch.empty(world * len(local), dtype=torch.int64, device=device)
    _all_gather_single(out, mine, group=group)
    return out.view(world, len(local)).tolist()


def gather_with_grad(local: torch.Tensor, sizes: Sequence[int], *, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's ``local`` along ``dim`` (rank r contributes ``sizes[r]`` entries there).

    Differentiable: the gradient of the result is summed over ranks and each rank receives its own slice.
    """
    return _GatherWithGrad.apply(local, tuple(int(s) for s in sizes), dim, group)


class _GatherWithGrad(torch.autograd.Function):
    """all-gather forward, reduce-scatter (sum) backward; blocks padded to the largest local size."""

    @staticmethod
    def forward(ctx, local, sizes, dim, group):
        ctx.sizes, ctx.dim, ctx.group = sizes, dim, group
        world, biggest = len(sizes), max(sizes)
        block = local.movedim(dim, 0)  # [n_r, ...]
        padded = block.new_zeros((biggest,) + tuple(block.shape[1:]))
        padded[: block.shape[0]] = block
        gathered = padded.new_empty((world * biggest,) + tuple(padded.shape[1:]))
        _all_gather_single(gathered, padded, group=group)
        pieces = [gathered[r * biggest: r * biggest + s] for r, s in enumerate(sizes)]
        return torch.cat(pieces, dim=0).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        sizes, dim, group = ctx.sizes, ctx.dim, ctx.group
        world, biggest, rank = len(sizes), max(sizes), dist.get_rank(group)
        flat = grad.movedim(dim, 0)
        padded = flat.new_zeros((world * biggest,) + tuple(flat.shape[1:]))
        start = 0
        for r, s in enumerate(sizes):
            padded[r * biggest: r * biggest + s] = flat[start: start + s]
            start += s
        mine = padded.new_empty((biggest,) + tuple(padded.shape[1:]))
        if dist.get_backend(group) == "gloo" and not hasattr(dist, "reduce_scatter_single"):
            dist.all_reduce(padded, group=group)  # older gloo has no reduce-scatter
            mine.copy_(padded[rank * biggest: (rank + 1) * biggest])
        else:
            _reduce_scatter_single(mine, padded, group=group)
        return mine[: sizes[rank]].movedim(0, dim), None, None, None
