"""Data-parallel MM-TS training: each rank scores its own pairs against the x and y gathered from every rank.

    torchrun --nproc_per_node 2 examples/distributed_infonce.py

Runs on the CPU with gloo as it is; with one CUDA GPU per process it uses NCCL. Rank 0 prints the loss.
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import mmts_kernels as mk


class Towers(torch.nn.Module):
    """One linear tower per modality, L2-normalized outputs."""

    def __init__(self, feat_dim: int, emb_dim: int):
        super().__init__()
        self.video, self.text = torch.nn.Linear(feat_dim, emb_dim), torch.nn.Linear(feat_dim, emb_dim)

    def forward(self, video_feats, text_feats):
        return F.normalize(self.video(video_feats), dim=-1), F.normalize(self.text(text_feats), dim=-1)


def main():
    world_size, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    on_gpu = torch.cuda.device_count() >= world_size
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")

    # A toy long-tailed dataset, the same on every rank: (video, text) feature pairs, each with a noun class.
    num_samples, feat_dim, emb_dim, local_batch, total_steps = 512, 32, 16, 32, 30
    g = torch.Generator().manual_seed(0)  # same seed everywhere: every rank draws the same global batches
    nouns = torch.multinomial(1.0 / torch.arange(1, 21), num_samples, replacement=True, generator=g)
    video_feats = torch.randn(num_samples, feat_dim, generator=g)
    text_feats = video_feats + 0.5 * torch.randn(num_samples, feat_dim, generator=g)
    cluster_sizes = mk.clusters_from_labels(nouns).sizes  # training-set cluster size of every sample
    n_min, n_max = cluster_sizes.min(), cluster_sizes.max()

    torch.manual_seed(0)
    model = DistributedDataParallel(Towers(feat_dim, emb_dim).to(device), device_ids=[local_rank] if on_gpu else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    for step in range(total_steps):
        batch = torch.randperm(num_samples, generator=g)[:world_size * local_batch]  # one global batch
        index = batch[rank * local_batch:(rank + 1) * local_batch]  # this rank's share: its dataset indices
        video, text = model(video_feats[index].to(device), text_feats[index].to(device))
        tau = mk.schedules.mmts_temperature(step, total_steps / 5, cluster_sizes[index], alpha=0.2, shift_min=0.17,
                                            shift_max=0.30, n_min=n_min, n_max=n_max).to(device)  # this rank's τ_i
        loss = mk.info_nce(video, text, temperature=tau, process_group=dist.group.WORLD)
        opt.zero_grad()
        loss.backward()  # DDP averages: gradients equal those of one process on the whole batch
        opt.step()
        if step % 10 == 0 or step == total_steps - 1:
            mean_loss = loss.detach().clone()  # the mean of the rank losses is the single-process loss
            dist.all_reduce(mean_loss)
            if rank == 0:
                print(f"step {step:2d}  MM-TS InfoNCE loss over {world_size} ranks {mean_loss.item() / world_size:.4f}")
    dist.barrier()  # no rank tears gloo down while another is still in a collective (it aborts at exit otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
