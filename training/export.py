"""--export: a checkpoint without adapters, for transformers (generate.py's opening says what it holds and how it
loads without this repo)."""
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoImageProcessor, GenerationConfig
from transformers.dynamic_module_utils import get_relative_import_files

from models import modeling_tinyvlm
from models.hub import from_hub
from models.lora import strip_lora
from models.vision import tower_class, vision_config
from training import checkpoint


TOWER_FOLDERS = (("vision_model", "vision"), ("fused_vision_model", "fused_vision"))


def export(model, out, source=None):
    """Write `out` as a checkpoint without adapters: lm/, vision/ (and fused_vision/) are plain transformers
    folders (named relative to `out` in its config.json, so it can be moved), trainable.safetensors holds the
    projector, and run.json is the one of `source` (the checkpoint the model came from: the data it trained on,
    which eval.py compares), if it has one. `out` is a new or empty folder, or a previous export, which it replaces
    (generate.py refuses any other before the model loads). Written beside `out`, then renamed: a failed export
    leaves a previous one in place, and a replaced one leaves no stale files behind.
    The model itself becomes that checkpoint's model: its adapters are merged in place, in fp32."""
    out = Path(out).expanduser().resolve()
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    # fp32: transformers loads an LM in its saved dtype (the hub's SmolLM2 is bf16), and W + BA rounded to bf16's
    # 8 significant bits loses any part of the update under ~1/256 of W: a small adapter update vanishes
    model.float()
    strip_lora(model.lm)  # merge the adapters into the weights and put the plain nn.Linear back
    strip_lora(model.vision)
    model.carried = set()  # the weights init_from set are in lm/ and vision/ now
    model.lm.save_pretrained(tmp / "lm")  # in fp32 too: its config.json says so, and it reloads as fp32
    model.tokenizer.save_pretrained(tmp / "lm")
    folders = {}  # config field -> the folder its tower is saved in
    for tower, (field, folder) in zip(model.vision.towers, TOWER_FOLDERS):
        export_tower(getattr(model.cfg, field), tower, tmp / folder)
        folders[field] = folder
    # Phase "projector": the projector is the only trainable part left (a full-phase LM is now in lm/), which is
    # what model.save writes.
    model.cfg = dataclasses.replace(model.cfg, phase="projector", init_from="", lora_vision=False, lm_model="lm",
                                    **folders)
    model.lm.requires_grad_(False)
    checkpoint.save_model(model, tmp)
    ship_code(model, tmp)
    if source and (Path(source) / checkpoint.RUN_INFO).is_file():
        shutil.copyfile(Path(source) / checkpoint.RUN_INFO, tmp / checkpoint.RUN_INFO)
    if out.exists():
        shutil.rmtree(out)  # an empty folder or a previous export (export_refusal)
    os.replace(tmp, out)


def ship_code(model, out):
    """Make `out` loadable by transformers alone (models/modeling_tinyvlm.py): the models/ files that file imports,
    auto_map in config.json and processor_config.json, and the generation settings of VLM.generate."""
    code = Path(modeling_tinyvlm.__file__)
    for f in [code, *map(Path, get_relative_import_files(code))]:
        shutil.copyfile(f, out / f.name)
    module = code.stem
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="tinyvlm", architectures=["TinyVLMForConditionalGeneration"],
                  auto_map={"AutoConfig": f"{module}.TinyVLMConfig",
                            "AutoModelForImageTextToText": f"{module}.TinyVLMForConditionalGeneration",
                            "AutoProcessor": f"{module}.TinyVLMProcessor"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    processor = dict(processor_class="TinyVLMProcessor", auto_map={"AutoProcessor": f"{module}.TinyVLMProcessor"},
                     n_image_tokens=model.n_image_tokens, image_fit=model.cfg.image_fit)
    (out / modeling_tinyvlm.PROCESSOR_CONFIG).write_text(json.dumps(processor, indent=2) + "\n")
    GenerationConfig(eos_token_id=[model.end_of_turn_id, model.tokenizer.eos_token_id], do_sample=False,
                     pad_token_id=model.tokenizer.pad_token_id, max_new_tokens=32).save_pretrained(out)


def export_tower(name, tower, out):
    """The model holds a cut-down tower (no pooling head; with vision_feature_layer != -1 also fewer layers and
    no final norm), whose saved config would not describe it. Save the original tower with the (merged)
    weights laid over it instead: reloading cuts it the same way, vision_feature_layer unchanged."""
    original = from_hub(tower_class(vision_config(name)), name, dtype=torch.float32)  # the merged weights' dtype
    unexpected = original.load_state_dict(tower.state_dict(), strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"vision weights that the original tower {name} does not have: {unexpected[:5]}")
    original.save_pretrained(out)
    from_hub(AutoImageProcessor, name).save_pretrained(out)
