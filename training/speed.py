"""What makes the loop fast, in one place. Reading the loop, you can skip this file: each piece changes the
speed, never the numbers (the GPU tests compare compiled training with eager). The figures, their history and the
levers tried and dropped are in docs/speed.md.

- **Compile per block** (compile_blocks; off: `--compile false`). The vision tower, the projector and each LM layer
  are compiled apart: the LM's layers share one graph, so a cold start compiles a few small graphs (the LM as one
  graph started far slower and ran hardly faster). Eager is bound by the host: it queues kernels one by one.
- **CUDA graphs for the LM's layers** (mode "reduce-overhead"; off: `--cuda_graphs false`, and always off under
  DDP). Each compiled layer replays as one launch instead of dozens of kernels, which is what bounds a model this
  small. Not for the tower and projector: their image count varies, and CUDA graphs are recorded per shape in one
  tree, so a new count re-recorded the graphs of every layer after them (63 graphs, a 1.7 s step at step 66 of the
  bench; 4.6 s in the LoRA phase). Their kernels are few and large: launched one by one, they cost no speed.
- **Fixed gradient buffers** (prepare). A CUDA-graphed backward writes its outputs to memory the next replay
  reuses: each trainable weight keeps one gradient buffer for the run, zeroed after each step, never freed.
- **One compiled graph per block whatever the records.** Packing (data/packing.py) gives the LM one static shape;
  the tower and projector meet a few image counts, so their batch dimension is compiled dynamic
  (VLM.encode_images marks it), where a static compile stopped the run for seconds at a new count. The LM layers
  stay static: torch's recompile limit is never met.
- **Every image count met before the first step** (warm_image_counts). The first run of a shape also picks its
  kernels (cuDNN's attention plans, cuBLAS's heuristics); the counts a run can meet are few (data/packing.py), so
  the frozen tower runs each once at start-up instead of stalling the step that first holds it.
- **Attention without a mask** (models/attention.py): FlashAttention's variable-length kernel keeps each packed
  sample to itself with no [N, N] mask in memory, and its registered name keeps transformers from reading the GPU
  to look for packed sequences (a host wait every forward).
- **A frozen heap** (FrozenHeap). Python's full garbage collections scan every live object: the data's lengths and
  plans from the start, compile's millions after the first step, alive for good; each scan stalled the start or a
  step.
- **Evaluation and generation run eager** (`torch.compiler.set_stance("force_eager")` on training.loop.val_loss and
  VLM.generate_from_ids): compiled blocks would compile and record a second set of CUDA graphs for every length.
"""
import gc

import torch

from data.packing import image_slots
from models.vlm import autocast


def compile_blocks(model, cuda_graphs=True):
    """torch.compile the vision tower(s), the projector and each LM layer of `model` (a VLM), in place, and tell
    the model whether they replay as CUDA graphs."""
    if model.cfg.gradient_checkpointing and model.cfg.phase == "projector":
        # the frozen LM's layers recompute in the backward: CUDA graph trees fail to record that ("an input tensor
        # deallocate during graph recording", torch 2.11); plain compile gives eager's gradients (docs/backbones.md)
        cuda_graphs = False
    for block in [model.vision, model.projector]:
        block.compile(dynamic=None)  # None: the dims marked dynamic are, the rest static; no CUDA graphs (above)
    mode = "reduce-overhead" if cuda_graphs else "default"
    for layer in model.lm.base_model.layers:
        layer.compile(dynamic=False, mode=mode)
    model.cuda_graphs = cuda_graphs  # each forward then starts a new CUDA-graph step (VLM.forward)


def prepare(model, cfg, device, world):
    """The loop's one call: compile the blocks (CUDA and --compile; CUDA graphs with one process only), and give
    every trainable weight its fixed gradient buffer. Returns the trainable parameters."""
    if cfg.compile and device.type == "cuda":
        compile_blocks(model, cuda_graphs=cfg.cuda_graphs and world == 1)
        warm_image_counts(model, cfg.batch_size, device)
    params = [p for p in model.parameters() if p.requires_grad]
    # zeroed after each step (zero_grad(set_to_none=False)), never freed; a sharded weight's is a sharded DTensor too,
    # which FSDP2 adds each step's reduced gradient into
    for p in params:
        p.grad = torch.zeros_like(p)
    return params


@torch.no_grad()
def warm_image_counts(model, batch_size, device):
    """Run the frozen tower once on each image count a micro-batch can hand it (data.packing.image_slots), as
    training runs it (no gradients, autocast, the count dynamic). A tower that trains (--lora_vision) is left to
    meet them in training."""
    if model.cfg.lora_vision:
        return
    with autocast(device):
        for n in sorted({image_slots(k, batch_size) for k in range(batch_size + 1)}):
            pixels = torch.zeros(n, *model.vision.pixel_shape, dtype=torch.uint8, device=device)
            torch._dynamo.maybe_mark_dynamic(pixels, 0)
            model.vision(pixels)


class FrozenHeap:
    """freeze() hides what is alive now from later collections (what is made after it is still collected). The loop
    calls it when what is alive will live as long as the run: once the data is open (at CC3M's size, millions of
    lengths and plans) and after the first step (compile's objects). On exit it is all collectable again, for a next
    run in this process (the sweep, the notebook)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        gc.unfreeze()

    def freeze(self):
        gc.freeze()
