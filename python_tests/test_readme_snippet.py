"""The MM-TS training loop of the README runs as written (the same code string is pasted there)."""
from __future__ import annotations

import torch

SNIPPET = '''
import torch
import torch.nn.functional as F
from mmts_kernels.clusters import clusters_from_labels
from mmts_kernels.modules import MMTSLoss

# A toy long-tailed dataset: (video, text) feature pairs, each with a noun class.
num_samples, feat_dim, emb_dim, batch_size, total_steps = 512, 32, 16, 64, 50
g = torch.Generator().manual_seed(0)
nouns = torch.multinomial(1.0 / torch.arange(1, 21), num_samples, replacement=True, generator=g)
video_feats = torch.randn(num_samples, feat_dim, generator=g)
text_feats = video_feats + 0.5 * torch.randn(num_samples, feat_dim, generator=g)

video_tower, text_tower = torch.nn.Linear(feat_dim, emb_dim), torch.nn.Linear(feat_dim, emb_dim)
clusters = clusters_from_labels(nouns)              # per-sample cluster size = size of its noun class
criterion = MMTSLoss(clusters.sizes, total_steps=total_steps, alpha=0.2, shift_min=0.17, shift_max=0.30)
opt = torch.optim.AdamW([*video_tower.parameters(), *text_tower.parameters()], lr=1e-2)

for step in range(total_steps):
    index = torch.randperm(num_samples, generator=g)[:batch_size]   # dataset indices of the batch
    v = F.normalize(video_tower(video_feats[index]), dim=-1)
    t = F.normalize(text_tower(text_feats[index]), dim=-1)
    loss = criterion(v, t, step=step, index=index)   # τ_i(step) from each sample's cluster size
    opt.zero_grad()
    loss.backward()
    opt.step()
'''


def test_readme_mmts_snippet_runs():
    namespace: dict = {}
    exec(compile(SNIPPET, "<README snippet>", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
    tau = namespace["criterion"].values(0)
    assert tau.shape == (512,) and (tau > 0).all()
    # the head noun class (the largest) gets the highest temperature
    sizes = namespace["clusters"].sizes
    assert float(tau[sizes.argmax()]) == float(tau.max())
