"""How a run spreads over its processes (torchrun): DDP, or in the full phase FSDP2's shards.

The full phase trains every LM weight in fp32 with AdamW's two moments: 16 bytes a weight before any activation,
a whole copy on every GPU under DDP, which is what outgrows a GPU first. There each process keeps 1/world of every
LM weight, of its gradient and of its AdamW state (torch.distributed.fsdp.fully_shard):
- each decoder layer is a unit of its own: its weights are gathered just before it runs and freed after it;
- the model's root takes the rest that trains (embeddings, final norm, head, projector, any vision adapters);
- the frozen vision weights are left out (ignored_params): every process keeps its whole copy, never gathered.
The other phases train a few million weights: DDP, which replicates them.

No MixedPrecisionPolicy: the weights stay fp32 and the forward runs under the autocast every other run uses
(models.vlm.autocast), so a sharded run computes what a DDP run computes. A bf16 param_dtype would also cast what
autocast keeps in fp32 (the norms' weights, the loss's inputs): other numbers. The cost: the gathers move fp32.
"""
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from training.distributed import all_reduce


def distribute(model, cfg, world, device):
    """The module train_step runs: `model` itself with one process; in a full phase the same model, sharded in
    place (shard); else `model` wrapped in DDP."""
    if world == 1:
        return model
    if cfg.sharded(world):
        return shard(model, init_device_mesh(device.type, (world,)))
    return DistributedDataParallel(model, broadcast_buffers=False)


def shard(model, mesh):
    """Shards `model` (a VLM) in place over `mesh` (FSDP2's default mesh is the GPUs whenever torch sees one, also
    for a --device cpu run), every process starting from rank 0's weights (as DDP does: a fresh projector is drawn
    from each rank's seed)."""
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=0)
    for layer in model.lm.base_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params={p for p in model.vision.parameters() if not p.requires_grad})
    return model


def is_sharded(model):
    return isinstance(model, FSDPModule)


@contextmanager
def no_sync(forward):
    """Inside, backward passes accumulate each process's own gradients, not yet reduced across processes (every
    micro-batch of a step but the last): DDP's no_sync, FSDP2's set_requires_gradient_sync(False)."""
    if not is_sharded(forward):
        with forward.no_sync():
            yield
        return
    forward.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        forward.set_requires_gradient_sync(True)


def whole(t):
    """A plain tensor: a DTensor's full value (clip_grad_norm_ over sharded gradients returns a replicated one)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def as_many_as_the_longest(batches, n, device):
    """(batch, counts) for each of this rank's n batches, then repeats of its last with counts False until it has run
    as many as the rank with the most: a sharded model's every forward gathers weights from all ranks, so none may
    stop early. (Every rank has one at least, or none has: data/loading.py checks it before the model loads.)"""
    longest = all_reduce(torch.tensor(n, device=device), dist.ReduceOp.MAX)
    batch = None
    for batch in batches:
        yield batch, True
    for _ in range(int(longest) - n):
        yield batch, False
