"""Tiny random backbones and a local tokenizer, for the offline demo and the tests.

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


def build_tiny_backbones(out_dir, corpus, image_size=32, patch_size=8, dim=64, layers=2, seed=0):
    """Write out_dir/vision (SigLIP + its image processor) and out_dir/lm (Llama + tokenizer)."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vision = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size))
    vision.save_pretrained(out_dir / "vision")
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(out_dir / "vision")
    tokenizer = build_tokenizer(corpus)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.2,  # large random embeddings, so the frozen tied LM head can give confident logits
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    # No pad_token_id in the LM config: it would zero that embedding row, and since pad == eos and the head
    # is tied, the frozen LM could then never predict end-of-turn.
    lm.save_pretrained(out_dir / "lm")
    tokenizer.save_pretrained(out_dir / "lm")
    return str(out_dir / "vision"), str(out_dir / "lm")
