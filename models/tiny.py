"""Random backbones (tiny, or shaped like the real defaults) and a local tokenizer: demo, tests, benchmark.

They are saved as ordinary `transformers` directories, so the rest of tinyvlm loads them exactly
like the real hub models (config fields take local paths).
"""
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (CLIPVisionConfig, Dinov2Config, Dinov2WithRegistersConfig, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, SiglipVisionConfig)
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from models.vision import tower_class

# SmolLM2-Instruct's ChatML template, default system prompt included, so the demo formats like the real LM.
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(corpus, vocab_size=512):
    """A byte-level BPE trained on `corpus` (deterministic), with ChatML special tokens and template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) + [SYSTEM, "user assistant system"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# (SiglipVisionConfig, LlamaConfig) keyword arguments. "base" has the shapes of the real defaults,
# google/siglip-base-patch16-224 and HuggingFaceTB/SmolLM2-135M-Instruct, for benchmarks without the hub.
SIZES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8),
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2)),  # large random embeddings: the frozen tied head can be confident
    "base": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=16),
             dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0)),
}


# Vision tower shapes by size: the towers of SIZES, and CLIP ViT-L/14-336 (LLaVA-1.5's, 24x24 patches).
VISION_SIZES = {**{size: vision_kw for size, (vision_kw, _) in SIZES.items()},
                "clip-l-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, image_size=336, patch_size=14)}


def image_processor(family, side):
    """The processor each family ships (the PIL versions: no torchvision needed). SigLIP resizes to a square;
    CLIP and DINOv2 resize the short side a little larger, then crop the centre (DINOv2: 256, then 224)."""
    if family == "siglip":
        return SiglipImageProcessorPil(size={"height": side, "width": side})
    crop = dict(size={"shortest_edge": side * 8 // 7}, crop_size={"height": side, "width": side}, do_center_crop=True)
    return CLIPImageProcessorPil(**crop) if family == "clip" else BitImageProcessorPil(**crop)


VISION_FAMILIES = {"siglip": SiglipVisionConfig, "clip": CLIPVisionConfig, "dinov2": Dinov2Config,
                   "dinov2-with-registers": Dinov2WithRegistersConfig}


def build_vision(out_dir, family="siglip", size="tiny"):
    """Write a random vision tower of `family` (a VISION_FAMILIES key) and its image processor to out_dir."""
    config = VISION_FAMILIES[family](**VISION_SIZES[size])  # DINOv2 sizes its MLP by mlp_ratio, not intermediate_size
    tower_class(config)(config).save_pretrained(out_dir)
    image_processor(family, config.image_size).save_pretrained(out_dir)
    return str(out_dir)


def build_backbones(out_dir, corpus, size="tiny", seed=0, vision_family="siglip"):
    """Write out_dir/vision (a tower of vision_family + its image processor) and out_dir/lm (Llama + tokenizer),
    random weights."""
    out_dir = Path(out_dir)
    _, lm_kw = SIZES[size]
    torch.manual_seed(seed)
    build_vision(out_dir / "vision", vision_family, size)
    tokenizer = build_tokenizer(corpus)
    lm = LlamaForCausalLM(LlamaConfig(**{"vocab_size": len(tokenizer), **lm_kw}, tie_word_embeddings=True,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    # No pad_token_id in the LM config: it would zero that embedding row, and since pad == eos and the head
    # is tied, the frozen LM could then never predict end-of-turn.
    lm.save_pretrained(out_dir / "lm")
    tokenizer.save_pretrained(out_dir / "lm")
    return str(out_dir / "vision"), str(out_dir / "lm")
