"""Random backbones (tiny, or shaped like the real defaults) and a local tokenizer: demo, tests, benchmark.

They are saved as ordinary `transformers` directories, so the rest of tinyvlm loads them exactly
like the real hub models (config fields take local paths).
"""
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, SiglipVisionConfig, SiglipVisionModel
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

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


def build_backbones(out_dir, corpus, size="tiny", seed=0):
    """Write out_dir/vision (SigLIP + its image processor) and out_dir/lm (Llama + tokenizer), random weights."""
    out_dir = Path(out_dir)
    vision_kw, lm_kw = SIZES[size]
    torch.manual_seed(seed)
    vision_config = SiglipVisionConfig(**vision_kw)
    SiglipVisionModel(vision_config).save_pretrained(out_dir / "vision")
    side = vision_config.image_size
    SiglipImageProcessorPil(size={"height": side, "width": side}).save_pretrained(out_dir / "vision")
    tokenizer = build_tokenizer(corpus)
    lm = LlamaForCausalLM(LlamaConfig(**{"vocab_size": len(tokenizer), **lm_kw}, tie_word_embeddings=True,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    # No pad_token_id in the LM config: it would zero that embedding row, and since pad == eos and the head
    # is tied, the frozen LM could then never predict end-of-turn.
    lm.save_pretrained(out_dir / "lm")
    tokenizer.save_pretrained(out_dir / "lm")
    return str(out_dir / "vision"), str(out_dir / "lm")
