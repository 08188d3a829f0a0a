"""A trained tinyvlm as transformers' own classes, so it loads without remote code (and vLLM can serve it).

Two projectors map exactly onto a transformers architecture (docs/export.md):
    --projector mlp     -> LlavaForConditionalGeneration     (LLaVA-1.5's linear-GELU-linear over every patch)
    --projector linear  -> Idefics3ForConditionalGeneration  (SmolVLM's pixel shuffle + one linear layer)
The default swiglu projector has no such class. Either way the vision tower must be one SigLIP tower (no fused
second tower), and where its features are taken decides which class can express it: LLaVA reads a hidden state
before the tower's final norm (vision_feature_layer -2, -3, ...), Idefics3 always applies it (-1).

The LM's vocabulary grows by the image token (tinyvlm adds <image> to the tokenizer but never embeds it): its row
in the embedding and the head is zero. Both native classes want pixels already normalised (their image processor
does it; tinyvlm's tower does it itself).
"""
import copy

import torch
from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

from .lora import strip_lora
from .prompt import IMAGE_TOKEN
from .vision import encoder_layers


def native_export(model, out_dir):
    """Write out_dir: `model` (a trained VLM, adapters merged) as a transformers folder that
    LlavaForConditionalGeneration / Idefics3ForConditionalGeneration.from_pretrained loads, with its tokenizer
    and image processor (for Llava, a LlavaProcessor with the chat template)."""
    native = to_native(model)
    native.save_pretrained(out_dir)
    if isinstance(native, LlavaForConditionalGeneration):
        llava_processor(model).save_pretrained(out_dir)
    else:  # Idefics3Processor would frame the image with tokens this model never saw in training
        model.tokenizer.save_pretrained(out_dir)
        model.processor.save_pretrained(out_dir)
    return native


def to_native(model):
    """`model` as a LlavaForConditionalGeneration (projector mlp) or Idefics3ForConditionalGeneration (linear),
    in fp32, with the same outputs (tests/test_native.py); the model itself is left as it is."""
    builders = {"mlp": to_llava, "linear": to_idefics3}
    if model.cfg.projector not in builders:
        raise ValueError(f"a model with the {model.cfg.projector} projector has no transformers class of its own; "
                         "train with --projector mlp (exports as Llava) or --projector linear (as Idefics3) to "
                         "export a native one, or use generate.py --export for a tinyvlm checkpoint")
    tower = merged_tower(model)
    native = builders[model.cfg.projector](model, tower)
    lm, rows = strip_lora(copy.deepcopy(model.lm)).float(), native.config.text_config.vocab_size
    native.get_decoder().load_state_dict(grown_vocabulary(lm.base_model.state_dict(), rows))
    native.lm_head.weight.data.copy_(grown_rows(lm.get_output_embeddings().weight, rows))
    # generate() stops where tinyvlm's does: at the end of the reply (not always the eos: Llama 3, Phi-3), or the text
    native.generation_config.eos_token_id = [model.end_of_turn_id, model.tokenizer.eos_token_id]
    native.generation_config.pad_token_id = model.tokenizer.pad_token_id
    return native.eval()


def merged_tower(model):
    """The one SigLIP tower, adapters merged into a copy, fp32."""
    cfg = model.cfg
    if cfg.fused_vision_model:
        raise ValueError("fused vision towers (fused_vision_model) have no transformers class to export to")
    [tower] = model.vision.towers
    if tower.config.model_type != "siglip_vision_model":
        raise ValueError(f"only SigLIP towers export to a native class; {cfg.vision_model} is "
                         f"{tower.config.model_type}")
    return strip_lora(copy.deepcopy(tower)).float()


def text_config(model):
    """The LM's config, its vocabulary grown to hold the image token."""
    config = copy.deepcopy(model.lm.config)
    config.vocab_size = max(config.vocab_size, len(model.tokenizer))
    return config


def grown_rows(weight, rows):
    """weight [V, D] with zero rows appended up to `rows`: the image token's, whose embedding is never read."""
    return torch.cat([weight.detach().float(), weight.new_zeros(rows - len(weight), weight.shape[1]).float()])


def grown_vocabulary(lm_state, rows):
    return {k: grown_rows(v, rows) if k == "embed_tokens.weight" else v for k, v in lm_state.items()}


def vision_kwargs(tower):
    """The SigLIP tower's shape, as it was cut (models/vision.py truncate keeps only the layers it uses)."""
    c = tower.config
    return dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_attention_heads=c.num_attention_heads, num_hidden_layers=len(encoder_layers(tower)),
                num_channels=c.num_channels, image_size=c.image_size, patch_size=c.patch_size, hidden_act=c.hidden_act,
                layer_norm_eps=c.layer_norm_eps)


def to_llava(model, tower):
    if model.cfg.vision_feature_layer == -1:
        raise ValueError("vision_feature_layer -1 takes the tower's output after its final norm, which LLaVA never "
                         "reads (it takes a hidden state before it): train the mlp projector with "
                         "--vision_feature_layer -2 (LLaVA's choice) to export as Llava")
    vision = copy.deepcopy(tower.config)
    vision.num_hidden_layers, vision.vision_use_head = len(encoder_layers(tower)), False
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text_config(model).to_dict(),
                         image_token_index=model.image_token_id, image_seq_length=model.n_image_tokens,
                         projector_hidden_act="gelu", multimodal_projector_bias=True,
                         vision_feature_layer=-1,  # the last layer kept: the cut tower's own output, before its norm
                         vision_feature_select_strategy="full",  # SigLIP has no class token: every patch is a token
                         tie_word_embeddings=model.lm.config.tie_word_embeddings)
    native = LlavaForConditionalGeneration(config)
    # the cut tower's final norm is an Identity (never read by LLaVA either): the native one keeps its init
    missing, unexpected = native.model.vision_tower.load_state_dict(tower.state_dict(), strict=False)
    assert not unexpected and all("post_layernorm" in k for k in missing), (missing, unexpected)
    native.model.multi_modal_projector.load_state_dict(model.projector.state_dict())
    return native


def to_idefics3(model, tower):
    if model.cfg.vision_feature_layer != -1:
        raise ValueError(f"vision_feature_layer {model.cfg.vision_feature_layer} takes a hidden state before the "
                         "tower's final norm, which Idefics3 always applies: train the linear projector with "
                         "--vision_feature_layer -1 to export as Idefics3")
    config = Idefics3Config(vision_config=Idefics3VisionConfig(**vision_kwargs(tower)).to_dict(),
                            text_config=text_config(model).to_dict(), image_token_id=model.image_token_id,
                            scale_factor=model.cfg.pixel_unshuffle, pad_token_id=model.tokenizer.pad_token_id,
                            tie_word_embeddings=model.lm.config.tie_word_embeddings)
    native = Idefics3ForConditionalGeneration(config)
    native.model.vision_model.load_state_dict(tower.state_dict())  # SigLIP's layout, the same names
    native.model.connector.modality_projection.load_state_dict(model.projector.state_dict())
    return native


def llava_processor(model):
    """Text and images as training made them: the LM's chat template, <image> expanded to one token per patch, the
    tower's own resize and normalisation (a letterboxed run's images must be padded to a square first)."""
    return LlavaProcessor(image_processor=model.processor, tokenizer=model.tokenizer,
                          chat_template=model.tokenizer.chat_template,
                          patch_size=model.vision.towers[0].config.patch_size, vision_feature_select_strategy="full",
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=0)
