"""Random backbones (tiny, or shaped like real ones) and local tokenizers: demo, tests, benchmark.

They are saved as ordinary `transformers` directories, so the rest of tinyvlm loads them exactly
like the real hub models (config fields take local paths). The LM comes in the families tinyvlm
supports (build_lm), each with a tokenizer whose special tokens and chat template mimic the real one.
"""
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, CLIPVisionConfig, Dinov2Config, Dinov2WithRegistersConfig, LlamaConfig,
                          Phi3Config, PhiConfig, PreTrainedTokenizerFast, Qwen2Config, SiglipVisionConfig)
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from .vision import tower_class

# SmolLM2-Instruct's ChatML template, default system prompt included, so the demo formats like the real LM.
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Llama 3.2's template, cut down: a system header with a knowledge cutoff and today's date (unless the caller
# passes date_string), turns ending in <|eot_id|> (not the tokenizer's eos), contents trimmed.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- endif %}{{- '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n'"
    " + 'Today Date: ' + date_string + '\n\n<|eot_id|>' }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
# Llama 3's pre-tokenizer pattern: runs of newlines stay one piece, so "\n\n" before a reply tokenizes alike
# whether or not the reply follows.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Phi-3-mini's template: <|role|> tags, turns ending in <|end|>, and eos appended when no generation prompt follows.
PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


class Family(NamedTuple):
    config: type             # the transformers config class of its architecture
    template: str | None     # the real family's chat template (None: a base LM, like Phi-2)
    specials: list           # its special tokens; the fields below name some of them (None: it has no such token)
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None = None
    system: str = ""         # text its template adds, trained into the tiny BPE so it tokenizes compactly
    split: str = ""          # a pre-tokenizer pattern ("": byte-level BPE's own, as GPT-2, SmolLM2, Phi-2 use)


FAMILIES = {
    "llama": Family(LlamaConfig, CHAT_TEMPLATE, SPECIALS, bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>",
                    unk="<|endoftext|>", system=SYSTEM),  # SmolLM2
    "llama3": Family(LlamaConfig, LLAMA3_TEMPLATE, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                     "<|end_header_id|>", "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None,
                     system="Cutting Knowledge Date: December 2023 Today Date", split=LLAMA3_SPLIT),
    # Qwen2.5 base: eos is end-of-text, turns end in <|im_end|>
    "qwen2": Family(Qwen2Config, CHAT_TEMPLATE.replace(SYSTEM, QWEN_SYSTEM), SPECIALS, bos=None, eos="<|endoftext|>",
                    pad="<|endoftext|>", system=QWEN_SYSTEM),
    "phi": Family(PhiConfig, None, ["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>", pad=None,
                  unk="<|endoftext|>"),  # Phi-2
    "phi3": Family(Phi3Config, PHI3_TEMPLATE, ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                   "<|end|>"], bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>"),
}


def build_tokenizer(corpus, family="llama", vocab_size=512):
    """A byte-level BPE trained on `corpus` (deterministic), with the family's special tokens and template."""
    fam = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not fam.split)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(fam.split), "isolated"), byte_level]) \
        if fam.split else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=fam.specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) + [fam.system, "user assistant system"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos,
                                        pad_token=fam.pad, unk_token=fam.unk)
    tokenizer.chat_template = fam.template
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


# Real LMs' shapes, for GPU measurements without the hub (random weights; vision as "base").
SIZES["phi-2"] = (SIZES["base"][0], dict(
    vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=2048, partial_rotary_factor=0.4, tie_word_embeddings=False))
SIZES["phi-3-mini"] = (SIZES["base"][0], dict(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False))


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


def build_lm(out_dir, corpus, family="llama", chat_template=True, pad_token=True, size="tiny"):
    """Write out_dir: a random causal LM of `family` (FAMILIES) shaped as SIZES[size], with its tokenizer.
    chat_template=False / pad_token=False take them away, as a base LM or a GGUF conversion lacks them.
    The weights come from torch's global RNG: seed it first for the same LM twice."""
    # A vocabulary as large as the LM's lets BPE merge every word of the corpus into one token, as the real
    # tokenizers do: the benchmark's sequences are then as long as real ones (a 512-token BPE made them 26% longer)
    tokenizer = build_tokenizer(corpus, family, vocab_size=SIZES[size][1].get("vocab_size", 512))
    if not chat_template:
        tokenizer.chat_template = None
    if not pad_token:
        tokenizer.pad_token = None
    # No pad_token_id in the LM config (Phi3Config has one by default): it would zero that embedding row, and
    # where pad == eos and the head is tied, the frozen LM could then never predict end-of-turn.
    config = FAMILIES[family].config(**{"vocab_size": len(tokenizer), "tie_word_embeddings": True, **SIZES[size][1]},
                                     pad_token_id=None, bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def build_backbones(out_dir, corpus, size="tiny", seed=0, vision_family="siglip", lm_family="llama"):
    """Write out_dir/vision (build_vision) and out_dir/lm (build_lm), random weights."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    return (build_vision(out_dir / "vision", vision_family, size),
            build_lm(out_dir / "lm", corpus, lm_family, size=size))
