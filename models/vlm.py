"""The joined model: vision tower(s) (frozen) -> projector -> causal LM (frozen in phase 1; LoRA, or every weight in
the full phase, in phase 2)."""
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .attention import PACKED_ATTENTION
from .decode import DECODE_ATTENTION, SLOT_MULTIPLE, Decoder, decode, left_pad
from .config import ConfigError, VLMConfig
from .hub import from_hub
from .lora import apply_lora, linear_names
from .projector import build_projector
from .prompt import (DEFAULT_PROMPT, IMAGE_TOKEN, encode, encode_prompt, end_of_turn_id, label_positions,
                           prepare_tokenizer)
from .vision import load_vision, n_image_tokens, tower_class, tower_names, vision_config


def _check_targets(field, targets, model):
    """Explicit LoRA target names must each name a linear layer of `model`; none (all linear layers) always fits."""
    missing = sorted(set(targets) - set(linear_names(model)))
    if missing:
        raise ConfigError(f"config field '{field}': {missing} match no linear layer of "
                          f"{type(model).__name__}; valid names: {linear_names(model)}")


def check_shapes(cfg: VLMConfig):
    """The config checks that need the backbones' shapes but not their weights, so they fail before anything
    loads: the unshuffle factor against the patch grid, the feature layer against each tower's depth, and
    the LoRA targets against weightless (meta) models (the LM's decoder: its head never gets adapters), and that the
    longest sample fits a micro-batch's token budget."""
    longest = n_image_tokens(cfg) + cfg.max_text_tokens
    if cfg.batch_tokens < longest:
        raise ConfigError(f"config field 'batch_tokens' = {cfg.batch_tokens}: a sample may hold {longest} tokens "
                          f"(image tokens + max_text_tokens), more than a micro-batch; raise batch_tokens to at least "
                          f"{longest}, or lower max_text_tokens")
    vision_configs = [vision_config(name) for name in tower_names(cfg)]
    for name, c in zip(tower_names(cfg), vision_configs):
        depth = c.num_hidden_layers
        if not -depth <= cfg.vision_feature_layer <= depth or cfg.vision_feature_layer == 0:
            raise ConfigError(f"config field 'vision_feature_layer' = {cfg.vision_feature_layer}: {name} has {depth} "
                              f"layers; use -1 (final output), -2 (penultimate), ... down to {-depth}, or 1 to "
                              f"{depth} counted from the input")
    with torch.device("meta"):
        if cfg.phase == "lora":
            _check_targets("lora_targets", cfg.lora_targets,
                           AutoModelForCausalLM.from_config(from_hub(AutoConfig, cfg.lm_model)).base_model)
        if cfg.phase != "projector" and cfg.lora_vision:
            _check_targets("lora_vision_targets", cfg.lora_vision_targets,
                           nn.ModuleList(tower_class(c)(c) for c in vision_configs))


def load_tokenizer(cfg: VLMConfig):
    """The LM's tokenizer, made ready by models.prompt.prepare_tokenizer: in seconds, before any weights load."""
    tokenizer = from_hub(AutoTokenizer, cfg.lm_model)
    try:
        prepare_tokenizer(tokenizer)
    except ValueError as e:
        raise ConfigError(f"config field 'lm_model' = {cfg.lm_model!r}: {e}") from None
    return tokenizer


WEIGHTS = "trainable.safetensors"  # a checkpoint's trained weights, beside its config.json
SHARDED_WEIGHTS = "weights.dcp"  # a sharded run's instead (training/sharding.py): a torch.distributed.checkpoint folder


def read_weights(path):
    """A checkpoint's weights, {name: tensor on the CPU}: its trainable.safetensors, or a sharded run's shards
    joined into whole tensors (read in this one process, whatever number of processes wrote them)."""
    sharded = Path(path) / SHARDED_WEIGHTS
    if not sharded.is_dir():
        return load_file(str(Path(path) / WEIGHTS))
    saved = FileSystemReader(sharded).read_metadata().state_dict_metadata
    state = {name: torch.empty(m.size, dtype=m.properties.dtype) for name, m in saved.items()}
    with warnings.catch_warnings():  # DCP warns that it loads in one process even when told to (no_dist)
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=sharded, no_dist=True)  # this process reads every shard itself
    return state


def load_weights(model, path):
    """Load a checkpoint's weights into `model`: every trainable one, and the frozen ones it carries from its own
    init_from (training.checkpoint.init_weights), which the model then carries on into its next checkpoints."""
    state = read_weights(path)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = trainable - set(state), set(state) - set(params)
    misshaped = [n for n in set(params) & set(state) if state[n].shape != params[n].shape]
    if missing or unexpected or misshaped:  # checked before anything is copied
        raise ValueError(f"checkpoint {path} does not fit this model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}, other shape {sorted(misshaped)[:5]}")
    for name, tensor in state.items():
        params[name].data.copy_(tensor.to(params[name].dtype))
    model.carried = set(state) - trainable
    return model


def autocast(device, cache_enabled=True):
    """The model's autocast: bf16 on a GPU (where VLM.place stores the frozen weights in bf16), none on the CPU.
    cache_enabled=False: no cache of cast weights (generation's recorded decode step must cast them itself)."""
    return torch.autocast("cuda", torch.bfloat16, enabled=torch.device(device).type == "cuda",
                          cache_enabled=cache_enabled)


@dataclass
class VLMOutput:
    loss_sum: torch.Tensor = None  # summed over the label tokens; the loop divides by the whole step's count
    logits: torch.Tensor = None


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig, vision, processor, lm, tokenizer):
        """tokenizer: made ready by models.prompt.prepare_tokenizer (as from_config does)."""
        super().__init__()
        self.cfg = cfg
        self.vision = vision  # models.vision.VisionTowers: uint8 pixels -> patch features, cut at the feature layer
        self.lm = lm
        lm.set_attn_implementation(PACKED_ATTENTION)  # training's rows are packed: see models/attention.py
        self.processor, self.tokenizer = processor, tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)  # never embedded: image features go there
        self.end_of_turn_id = end_of_turn_id(tokenizer)  # where generation stops, as training's labels do
        self.n_image_tokens = n_image_tokens(cfg)
        self.max_sample_len = self.n_image_tokens + cfg.max_text_tokens  # the longest sample a packed row holds
        self.carried = set()  # names of frozen weights a checkpoint set (training.checkpoint.init_weights): saved too
        self.cuda_graphs = False  # training/speed.compile_blocks sets it when its blocks replay as CUDA graphs
        self.decoder, self.decoder_shape = None, None  # generation's state, kept between batches (decoder_for)
        self.projector = build_projector(cfg, vision.hidden_size, lm.config.hidden_size)
        self.vision.requires_grad_(False)
        self.lm.requires_grad_(cfg.phase == "full")  # the full phase trains every LM weight
        if cfg.gradient_checkpointing:
            self.enable_gradient_checkpointing()
        if cfg.phase == "lora":
            apply_lora(self.lm.base_model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        if cfg.phase in ("lora", "full") and cfg.lora_vision:
            apply_lora(self.vision, cfg.lora_vision_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        # Trainable weights are fp32 whatever dtype a backbone was saved in (transformers keeps it; the hub's SmolLM2
        # is bf16): in bf16, AdamW's update of 2e-5 would round away for ~97% of the weights. Frozen ones keep theirs.
        for p in self.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.train()

    @classmethod
    def from_config(cls, cfg: VLMConfig, tokenizer=None):
        """Loads the backbones named by the config (hub ids or local dirs) and builds a fresh projector. The
        tokenizer (load_tokenizer's, if given) comes first: a chat template that cannot place labels fails before
        the slow weights load."""
        tokenizer = tokenizer or load_tokenizer(cfg)
        vision, processor = load_vision(cfg)
        return cls(cfg, vision, processor, from_hub(AutoModelForCausalLM, cfg.lm_model), tokenizer)

    @classmethod
    def from_checkpoint(cls, path):
        """The model a checkpoint directory describes: its config's backbones plus its weights. An export names the
        backbones it holds relative to itself (so it can be moved): those names become paths into it."""
        path = Path(path)
        cfg = VLMConfig.load(path / "config.json")
        for name in ("vision_model", "fused_vision_model", "lm_model"):
            if getattr(cfg, name) and (path / getattr(cfg, name)).is_dir():
                setattr(cfg, name, str(path / getattr(cfg, name)))
        return load_weights(cls.from_config(cfg), path)

    def train(self, mode=True):
        super().train(mode)
        if not self.cfg.lora_vision:  # frozen backbones always run in eval mode (no dropout)
            self.vision.eval()
        if self.cfg.phase == "projector":
            self.lm.eval()
            if self.cfg.gradient_checkpointing:  # the backward still runs through the frozen LM's activations:
                for layer in self.lm.base_model.layers:  # transformers checkpoints a layer only while its own flag
                    layer.training = mode  # says training; set alone, it leaves every dropout inside it off
        return self

    def place(self, device):
        """Move to `device`. On a GPU the frozen backbone weights are stored in bf16 (the trainable ones stay
        fp32), for training and inference alike: a checkpoint then captions with the numbers it trained with,
        and autocast does not cast every frozen weight again at each decoded token."""
        self.to(device)
        if torch.device(device).type == "cuda":
            self.cast_frozen(torch.bfloat16)
        return self

    def cast_frozen(self, dtype):
        """Store the frozen backbone weights in `dtype` (bf16 on GPU); trainable weights stay fp32."""
        for p in self.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
        return self

    def enable_gradient_checkpointing(self):
        """Keep only each layer's input and recompute the rest in the backward pass. Non-reentrant checkpoints
        give gradients to LoRA adapters and to the image features under a frozen LM, also inside the compiled
        layers (tests/test_gpu.py)."""
        # The name transformers 5.17 knows too (5.23 renames it activation_checkpointing_enable and warns)
        kw = dict(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lm.gradient_checkpointing_enable(**kw)
        if self.cfg.lora_vision:  # a frozen tower runs under no_grad: there is nothing to recompute
            for tower in self.vision.towers:
                tower.gradient_checkpointing_enable(**kw)

    # --- forward ---
    def encode_images(self, pixel_values):                      # [B, 3, H, W] uint8, B may be 0
        """[B, n_image_tokens, D]; for B = 0, the features of one blank image that embed places nowhere. The
        tower and projector still run on it, so every trainable weight gets a (zero) gradient, as DDP needs."""
        if len(pixel_values) == 0:  # the tower's reshapes need a batch
            pixel_values = pixel_values.new_zeros(1, *pixel_values.shape[1:])
        torch._dynamo.maybe_mark_dynamic(pixel_values, 0)  # one compiled graph for every image count (training/speed.py)
        with torch.set_grad_enabled(self.cfg.lora_vision and torch.is_grad_enabled()):
            feats = self.vision(pixel_values)                   # [B, N, Dv]
        torch._dynamo.maybe_mark_dynamic(feats, 0)
        if not torch.is_autocast_enabled(feats.device.type):  # a bf16 tower meets the fp32 projector (autocast,
            feats = feats.float()                               # on the GPU, runs both in bf16: nothing to cast)
        return self.projector(feats)

    def embed(self, input_ids, pixel_values):
        """input_ids [B, T]; pixel_values [B_img, 3, H, W]: the k-th block of image positions (in row order) takes the
        k-th image. Images past the last block (the blank slots a packed batch is padded with) are placed nowhere."""
        is_image = input_ids == self.image_token_id             # [B, T]
        if not torch.compiler.is_compiling():  # the data path guarantees it; a hand-built batch may not
            self.check_image_positions(is_image, len(pixel_values))
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # [B, T, D]
        image = self.encode_images(pixel_values).to(embeds.dtype).flatten(0, 1)  # [B_img * n_image_tokens, D]
        # The k-th image position takes the k-th image feature row: gathered by a running count, not by
        # masked_scatter, whose backward (masked_select) makes the host wait for the GPU every step.
        is_image = is_image.flatten()                             # [B*T]
        row = (is_image.cumsum(0) - 1).clamp(min=0)               # a text position's row is dropped by where
        return torch.where(is_image.unsqueeze(-1), image[row], embeds.flatten(0, 1)).view_as(embeds)

    def check_image_positions(self, is_image, n_images):
        counts = is_image.sum(1)
        n = self.n_image_tokens
        fits = (counts % n == 0).all() & (counts.sum() <= n_images * n)
        if is_image.is_cuda:  # checked on the device: reading the counts would make the host wait for the GPU
            torch._assert_async(fits, "image positions do not match the images")
        elif not bool(fits):
            raise ValueError(f"each sample must hold exactly {self.n_image_tokens} image positions (what the "
                             f"projector emits) or none, one image each; got {counts.tolist()} positions for "
                             f"{n_images} images. Build inputs with models.prompt.encode")

    def forward(self, input_ids, pixel_values, labels=None, label_index=None, position_ids=None, cu_seqlens=None):
        """Training's batches are packed (data/packing.py): input_ids [1, N] hold whole samples end to end,
        position_ids [1, N] restart at 0 for each, and cu_seqlens (int32) marks where each starts, so attention stays
        inside a sample (models/attention.py). Without cu_seqlens, input_ids [B, T] are rows of causal attention
        (generation, or hand-built batches: right padding is never looked at). label_index: the flat positions whose
        next token is trained (models.prompt.label_positions), from the collator.
        Under CUDA graphs (training/speed.py), each forward starts a new step: the graphs may reuse the memory of the
        previous forward's activations, so its backward must have run (or its outputs been read) by then. (Only
        then: the call imports torch's compiler, 4 s in a process that never compiles.)"""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        embeds = self.embed(input_ids, pixel_values)
        packed = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens, max_seqlen=self.max_sample_len)
        hidden = self.lm.base_model(inputs_embeds=embeds, position_ids=position_ids, use_cache=False,
                                    **packed).last_hidden_state  # [B, T, D]
        head = self.lm.get_output_embeddings()
        if labels is None:
            return VLMOutput(logits=head(hidden))
        # Only positions that predict a label go through the LM head (the vocab is the costly part), picked by
        # indices made on the CPU: a boolean mask would make the host wait for the GPU to count them.
        if label_index is None:
            label_index = label_positions(labels)
        logits = head(hidden.flatten(0, 1)[label_index])        # [n, V]
        targets = labels.flatten()[label_index + 1]              # [n]: the next token of each picked position
        return VLMOutput(loss_sum=F.cross_entropy(logits.float(), targets, reduction="sum"))

    @torch.no_grad()
    def generate(self, pixel_values, prompt=DEFAULT_PROMPT, max_new_tokens=32, temperature=0.0, top_p=1.0,
                 streamer=None):
        """Caption (or answer about) a batch of uint8 images [B, 3, H, W] (image_pixels). prompt: one for every
        image, or a list of one per image (rows of different lengths are left-padded and masked)."""
        prompts = [prompt] * len(pixel_values) if isinstance(prompt, str) else list(prompt)
        encoded = {p: encode_prompt(self.tokenizer, p, self.n_image_tokens) for p in set(prompts)}  # the template
        ids = [encoded[p] for p in prompts]  # takes ~0.4 ms a prompt: once per distinct one, not per image
        return self.generate_from_ids(ids, pixel_values, max_new_tokens, temperature, top_p, streamer)

    @torch.no_grad()
    def chat(self, pixel_values, messages, max_new_tokens=128, temperature=0.0, top_p=1.0, streamer=None):
        """One new assistant reply to a conversation about one image ([1, 3, H, W]): messages are the chat so far
        ({"role": "user"|"assistant", "content"}), the image's <image> in the first user turn (added if missing),
        ending with the user's new question."""
        messages = [dict(m) for m in messages]
        if not any(IMAGE_TOKEN in m["content"] for m in messages):
            messages[0]["content"] = f"{IMAGE_TOKEN}\n{messages[0]['content']}"
        ids, _ = encode(self.tokenizer, messages, self.n_image_tokens, generation_prompt=True)
        return self.generate_from_ids([ids], pixel_values, max_new_tokens, temperature, top_p, streamer)[0]

    @torch.no_grad()
    def generate_from_ids(self, prompts, pixel_values, max_new_tokens=32, temperature=0.0, top_p=1.0, streamer=None):
        """prompts: token ids per row, each ending with the assistant header (models.prompt.encode with
        generation_prompt=True), its image positions expanded; pixel_values: the images of the rows that have them,
        in row order. Returns the replies as text (generate_tokens: as token ids)."""
        out = self.generate_tokens(prompts, pixel_values, max_new_tokens, temperature, top_p, streamer)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def generate_tokens(self, prompts, pixel_values, max_new_tokens=32, temperature=0.0, top_p=1.0, streamer=None):
        """The new tokens of each row [B, n] (padded after its end), for generate_from_ids' arguments. Rows are
        left-padded and masked, so each is decoded as if alone: the vision tower runs once per image, then the LM
        decodes (models/decode.py); each row stops at its own end-of-turn token. A transformers streamer (one row
        only) receives the tokens as they come, e.g. TextIteratorStreamer for app.py."""
        ids, mask = (t.to(pixel_values.device) for t in left_pad(prompts, self.tokenizer.pad_token_id))
        was_training = self.training
        self.eval()
        # the decoding attention reads the static cache and its mask (models/decode.py; packed attention, training's,
        # reads neither); eager: compiled layers (training's) would compile again for every new length
        self.lm.set_attn_implementation(DECODE_ATTENTION)
        try:
            # No cache of cast weights: it would hand the recorded decode step (models/decode.py) the bf16 copies made
            # while recording (of trained weights: the adapters', a full phase's LM), freed when the context ends
            with autocast(ids.device, cache_enabled=False), torch.compiler.set_stance("force_eager"):
                return decode(self.decoder_for(*ids.shape, max_new_tokens, ids.device), self.embed(ids, pixel_values),
                              mask, max_new_tokens, [self.end_of_turn_id, self.tokenizer.eos_token_id],  # the reply's
                              self.tokenizer.pad_token_id, temperature, top_p, streamer)  # end, or the text's
        finally:
            self.lm.set_attn_implementation(PACKED_ATTENTION)
            self.train(was_training)

    def decoder_for(self, rows, prompt_len, max_new_tokens, device):
        """The decoding state (models.decode.Decoder) for `rows` rows of prompt_len + max_new_tokens tokens, kept for the next
        batch of that shape: on the GPU its step is a recorded CUDA graph, which reads the LM's weights where they
        were when it was recorded, so weights moved or cast since (place) make a new one."""
        slots = -(-(prompt_len + max_new_tokens) // SLOT_MULTIPLE) * SLOT_MULTIPLE
        shape = (rows, slots, device, [p.data_ptr() for p in self.lm.parameters()])
        if self.decoder is None or self.decoder_shape != shape:
            self.decoder = None  # the old cache and graph go first
            self.decoder = Decoder(self.lm, rows, slots, device, record_graph=device.type == "cuda")
            self.decoder_shape = shape
        return self.decoder

    def saved_names(self):
        """The weights a checkpoint holds: the trained ones (the projector, the adapters; in the full phase the LM
        too) and the frozen ones carried from init_from."""
        return {n for n, p in self.named_parameters() if p.requires_grad} | self.carried

    def trainable_state_dict(self):
        """What a checkpoint holds (saved_names), fp32 on the CPU."""
        names = self.saved_names()
        return {n: t.detach().float().cpu().contiguous() for n, t in self.state_dict().items() if n in names}
