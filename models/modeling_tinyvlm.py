"""tinyvlm as transformers' custom code: what lets an export (generate.py --export) load without this repo.

    model = AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
    pipeline("image-text-to-text", model=DIR, trust_remote_code=True)

The export ships this file and the models/ files it imports (relatively: transformers copies what a relative
import names); its config.json's auto_map points here. The classes wrap the repo's own VLM, prompt format and
pixel path, so the export captions exactly as generate.py does.
"""
from pathlib import Path

import torch
from transformers import (AutoImageProcessor, AutoTokenizer, BatchFeature, GenerationConfig, GenerationMixin,
                          PretrainedConfig, PreTrainedModel, ProcessorMixin)
from transformers.image_utils import load_image
from transformers.modeling_outputs import CausalLMOutput

from .prompt import IMAGE_TOKEN, TEMPLATE_VARIABLES, encode, prepare_tokenizer
from .vision import image_pixels
from .vlm import VLM

PROCESSOR_CONFIG = "processor_config.json"


class TinyVLMConfig(PretrainedConfig):
    """The export's config.json as transformers reads it: tinyvlm's own fields (VLMConfig) plus auto_map."""
    model_type = "tinyvlm"


class TinyVLMForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """The VLM of an export: tower(s), projector and LM, built from the export's folders by VLM.from_checkpoint
    (its weights are spread over lm/, vision/ and trainable.safetensors, which transformers' loader cannot map)."""
    config_class = TinyVLMConfig
    main_input_name = "input_ids"

    def __init__(self, config, vlm=None):
        super().__init__(config)
        self.vlm = vlm

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):
        """A local export folder. The loader's other options (dtype, device_map, ...) are not read: it loads as
        saved (fp32) on the CPU; move it with .to()."""
        model = cls(config or TinyVLMConfig.from_pretrained(path), VLM.from_checkpoint(Path(path)))
        model.generation_config = GenerationConfig.from_pretrained(path)
        return model.eval()

    def forward(self, input_ids, pixel_values, attention_mask=None, **kwargs):
        """input_ids [B, T] from TinyVLMProcessor (image positions expanded), pixel_values [B, 3, H, W] uint8 ->
        logits [B, T, V]. Rows are causal: right padding is never looked at."""
        return CausalLMOutput(logits=self.vlm(input_ids, pixel_values).logits)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values, attention_mask=None, generation_config=None, **kwargs):
        """The prompt ids followed by the reply's, as transformers' generate returns them: decoded by VLM.generate_tokens
        (each row alone, to its end-of-turn token). Reads max_new_tokens, do_sample, temperature and top_p."""
        config = GenerationConfig.from_dict({**(generation_config or self.generation_config).to_dict(), **kwargs})
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        prompts = [row[keep.bool()].tolist() for row, keep in zip(input_ids, mask)]
        new = self.vlm.generate_tokens(prompts, pixel_values, config.max_new_tokens,
                                       config.temperature if config.do_sample else 0.0, config.top_p or 1.0)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


class TinyVLMProcessor(ProcessorMixin):
    """Text with one <image> per image -> input_ids (each <image> expanded to the projector's n_image_tokens),
    attention_mask and uint8 pixel_values, as tinyvlm's generation makes them. The chat template is the LM's own
    (models.prompt): a message's content may be a string with <image>, or a list of {"type": "image"|"text"} parts."""
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor, tokenizer, n_image_tokens=1, image_fit="resize", **kwargs):
        super().__init__(image_processor, tokenizer)
        self.n_image_tokens, self.image_fit = n_image_tokens, image_fit
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """A local export folder: the tokenizer of lm/, the image processor of vision/ (the first tower's makes
        the pixels), the image token count and image fit of processor_config.json."""
        path = Path(path)
        settings = TinyVLMConfig.from_json_file(path / PROCESSOR_CONFIG).to_dict()
        tokenizer = AutoTokenizer.from_pretrained(path / "lm")
        prepare_tokenizer(tokenizer)  # the export saved it prepared; this checks it still is
        return cls(AutoImageProcessor.from_pretrained(path / "vision"), tokenizer,
                   settings["n_image_tokens"], settings["image_fit"])

    def __call__(self, images=None, text=None, return_tensors="pt", **kwargs):
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.expand(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        images = [images] if images is not None and not isinstance(images, (list, tuple)) else images or []
        return self.batch(ids, [load_image(i) for i in images])

    def expand(self, ids):
        """Each <image> becomes the n_image_tokens positions the projector's features fill."""
        return [t for i in ids for t in ([i] * self.n_image_tokens if i == self.image_token_id else [i])]

    def batch(self, ids, images):
        """Rows left-padded (generation continues each row at its end) and masked; the images as uint8 pixels."""
        T = max(map(len, ids))
        input_ids = torch.full((len(ids), T), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, p in enumerate(ids):
            input_ids[row, T - len(p):], mask[row, T - len(p):] = torch.tensor(p, dtype=torch.long), 1
        data = dict(input_ids=input_ids, attention_mask=mask)
        if images:
            data["pixel_values"] = image_pixels(self.image_processor, images, self.image_fit)
        return BatchFeature(data, tensor_type=None)

    def apply_chat_template(self, conversation, add_generation_prompt=True, tokenize=False, return_dict=False,
                            continue_final_message=False, **kwargs):
        """One conversation about one image, rendered by models.prompt.encode (the template and tokens training
        used). tokenize=False: its text, with one <image>; else a BatchFeature (return_dict) or the ids."""
        messages, images = [], []
        for m in getattr(conversation, "messages", conversation):
            parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
            images += [p.get("image") or p.get("url") or p.get("path") for p in parts if p["type"] == "image"]
            # an image part reads as training's prompts put it: "<image>\n" before the text (models.prompt)
            text = "".join(f"{IMAGE_TOKEN}\n" if p["type"] == "image" else p["text"] for p in parts)
            messages.append({"role": m["role"], "content": text})
        if not tokenize:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      **TEMPLATE_VARIABLES)
        ids, _ = encode(self.tokenizer, messages, self.n_image_tokens, generation_prompt=add_generation_prompt,
                        has_image=bool(images) or any(IMAGE_TOKEN in m["content"] for m in messages))
        if not return_dict:
            return ids
        return self.batch([ids], [load_image(i) for i in images])
