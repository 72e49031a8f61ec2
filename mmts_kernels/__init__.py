"""mmts_kernels: fused contrastive losses with per-sample temperatures and margins.

Where things are:
    api.py          the public functions (contrastive_loss, info_nce, max_margin, nt_xent,
                    sigmoid_loss)
    validation.py   every bad-input check, before any backend runs
    stats.py        the statistics contract every backend implements
    losses.py       the losses as O(N) functions of those statistics
    reference.py    the ``torch`` backend: the spec in code, materializes S
    backends.py     registry, availability and backend="auto"
    temperature.py  DySTreSS per-pair temperature
    schedules.py    TS and MM-TS temperature / margin schedules
    clusters.py     per-sample cluster sizes from labels or k-means
    modules.py      nn.Module losses (ContrastiveLoss, MMTSLoss, SigmoidLoss)
    amcl.py         multi-head AMCL with its temperature network (top-k negatives: topk.py)
    topk.py         the top-k statistic (the k largest negatives per row): dispatch and torch reference
    queue.py        FeatureQueue, a FIFO of past keys for MoCo-style negatives
    distributed.py  local loss with negatives gathered over torch.distributed (sigmoid: a ring exchange)
    integrations/   drop-in classes for other libraries' users (open_clip's ClipLoss and SigLipLoss)
    metrics.py      retrieval metrics: R@K, ranks, EK-100 mAP / nDCG (chunked)
    triton_backend/ the fused Triton kernels (GPU)
    cpp_backend/    the fused C++ CPU kernels (sources in csrc/)
"""
from . import backends, clusters, metrics, schedules
from .amcl import AMCLLoss, AMCLTemperatureNet, amcl_loss
from .api import contrastive_loss, info_nce, max_margin, nt_xent, sigmoid_loss
from .backends import available_backends
from .clusters import Clusters, clusters_from_labels, embed_captions, kmeans
from .modules import ContrastiveLoss, MMTSLoss, SigmoidLoss
from .queue import FeatureQueue
from .temperature import DySTreSS

__all__ = [
    "contrastive_loss",
    "info_nce",
    "max_margin",
    "nt_xent",
    "sigmoid_loss",
    "DySTreSS",
    "available_backends",
    "schedules",
    "clusters",
    "metrics",
    "backends",
    "amcl_loss",
    "AMCLLoss",
    "AMCLTemperatureNet",
    "FeatureQueue",
    "Clusters",
    "clusters_from_labels",
    "embed_captions",
    "kmeans",
    "ContrastiveLoss",
    "MMTSLoss",
    "SigmoidLoss",
]
__version__ = "0.1.0"
