"""Beyond SmolLM2: tiny random LMs of the Llama 3, Qwen2.5, Phi-2 and Phi-3 families, with and without a chat
template and a pad token, through the prompt format, both phases, reload, captioning and export."""
import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training import loop
from training.checkpoint import load_model
from data.shapes import corpus, draw
from generate import main as generate_main
from models.config import ConfigError, VLMConfig
from models.lora import LoRALinear, lora_layers
from models.prompt import IGNORE, IMAGE_TOKEN, encode, encode_prompt, prepare_tokenizer
from models.tiny import FAMILIES, build_lm
from models.vision import image_pixels
from models.vlm import VLM

# Each family's end of turn, as its real template writes it; without a template, the plain format ends a reply
# with end-of-text. Phi-2 has no template of its own.
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "phi": None, "phi3": "<|end|>"}
VARIANTS = [(family, template, pad) for family in END_OF_TURN for template in (True, False) for pad in (True, False)
            if (FAMILIES[family].template or not template) and (FAMILIES[family].pad or not pad)]
IDS = [f"{f}-{'template' if t else 'no_template'}-{'pad' if p else 'no_pad'}" for f, t, p in VARIANTS]
REPLIES = ["a red circle at the center .", "it is at the center ."]
TURNS = [{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is in this picture?"},
         {"role": "assistant", "content": REPLIES[0]},
         {"role": "user", "content": "Where is it?"},
         {"role": "assistant", "content": REPLIES[1]}]


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    """lms(family, template, pad) -> the dir of a tiny random LM of that kind, built once per module."""
    root, built = tmp_path_factory.mktemp("lms"), {}

    def get(family, template, pad):
        if (family, template, pad) not in built:
            torch.manual_seed(0)
            built[family, template, pad] = build_lm(root / f"{family}-{template}-{pad}", corpus(), family,
                                                    template, pad)
        return built[family, template, pad]
    return get


def end_of_turn(tokenizer, family, template):
    return END_OF_TURN[family] if template else tokenizer.eos_token


# ============================================================================ the prompt format
@pytest.mark.parametrize("family, template, pad", VARIANTS, ids=IDS)
def test_each_reply_trains_with_its_end_of_turn_and_generation_sees_the_training_prefix(lms, family, template, pad):
    tok = AutoTokenizer.from_pretrained(lms(family, template, pad))
    assert (tok.chat_template is not None) == template and (tok.pad_token is not None) == pad
    prepare_tokenizer(tok)
    assert tok.pad_token is not None
    ids, labels = encode(tok, TURNS, n_image_tokens=3)
    eot = end_of_turn(tok, family, template)
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    assert all(labels[i] == ids[i] for i in trained)
    assert tok.decode([labels[i] for i in trained]) == "".join(r + eot for r in REPLIES)
    first = trained[0]
    assert encode_prompt(tok, "What is in this picture?", 3) == ids[:first]  # one source of truth
    if family == "llama3" and template:  # a fixed date, not today's: the same tokens on any day
        assert "Today Date: 26 Jul 2024" in tok.decode(ids)


def test_a_template_that_cannot_place_labels_fails_before_the_weights_load(tiny_assets, tmp_path):
    lm = tmp_path / "lm"
    tok = AutoTokenizer.from_pretrained(tiny_assets.lm)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"  # no eot
    tok.save_pretrained(lm)
    (lm / "config.json").write_bytes((Path(tiny_assets.lm) / "config.json").read_bytes())
    (lm / "model.safetensors").write_bytes(b"not weights: loading them would fail otherwise")
    cfg = VLMConfig(vision_model=tiny_assets.vision, lm_model=str(lm), device="cpu")
    with pytest.raises(ConfigError, match="lm_model.*no special token"):
        VLM.from_config(cfg)


# ============================================================================ LoRA on every linear layer
@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations that peft triggers
@pytest.mark.parametrize("family", END_OF_TURN)
def test_default_targets_are_peft_all_linear_including_fused_projections(lms, tiny_assets, family):
    from peft import LoraConfig, get_peft_model

    cfg = VLMConfig(vision_model=tiny_assets.vision, lm_model=lms(family, True, True), device="cpu", phase="lora",
                    lora_vision=True, projector_hidden_dim=64)
    model = VLM.from_config(cfg)
    ours = {n.removeprefix("lm.") for n, m in model.named_modules()
            if isinstance(m, LoRALinear) and n.startswith("lm.")}
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(cfg.lm_model),
                            LoraConfig(r=4, target_modules="all-linear"))
    peft_names = {n.removeprefix("base_model.model.").removesuffix(".base_layer") for n, _ in theirs.named_modules()
                  if n.endswith(".base_layer")}
    assert ours == peft_names and ours  # every linear layer but the head, found by type
    if family == "phi3":
        assert {n.split(".")[-1] for n in ours} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    vision = {n.split(".")[-1] for n, m in model.vision.named_modules() if isinstance(m, LoRALinear)}
    assert vision == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


# ============================================================================ train, reload, caption, export
def family_cfg(tiny_assets, lm, out_dir, **changes):
    return VLMConfig(vision_model=tiny_assets.vision, lm_model=lm, data_dir=tiny_assets.data_dir, device="cpu",
                     out_dir=str(out_dir), projector_hidden_dim=64, max_text_tokens=96, batch_size=8, batch_tokens=8 * 100,
                     grad_accum=1,
                     val_size=8, max_steps=2, warmup_frac=0.0, lora_dropout=0.0, log_every=1,
                     eval_every=10_000, save_every=10_000, eval_captions=0, resume=False, seed=0, **changes)


@pytest.mark.parametrize("family, template, pad", VARIANTS, ids=IDS)
def test_both_phases_train_reload_caption_and_export(lms, tiny_assets, tmp_path, family, template, pad):
    projector = family_cfg(tiny_assets, lms(family, template, pad), tmp_path / "projector", projector_lr=3e-3,
                           num_workers=0 if pad else 1)  # a worker tokenizes: a pad-less tokenizer must not crash it
    lora = dataclasses.replace(projector, phase="lora", init_from=projector.out_dir, out_dir=str(tmp_path / "lora"),
                               lora_lr=3e-3)
    for cfg in (projector, lora):
        out = loop.train(cfg)
        assert len(out["losses"]) == 2 and all(torch.isfinite(torch.tensor([l for _, l in out["losses"]])))
    images = [draw("red", "circle", "center"), draw("blue", "square", "top left")]
    trained = out["model"].eval()
    captions = trained.generate(image_pixels(trained.processor, images), max_new_tokens=8)
    assert load_model(out["checkpoint"]).generate(image_pixels(trained.processor, images), max_new_tokens=8) == captions
    generate_main(["--checkpoint", str(out["checkpoint"]), "--export", str(tmp_path / "exported")])
    exported = load_model(tmp_path / "exported")
    assert not lora_layers(exported)
    assert exported.generate(image_pixels(exported.processor, images), max_new_tokens=8) == captions


@pytest.mark.parametrize("family, template", [("llama3", True), ("phi3", True), ("phi", False)])
def test_generation_stops_at_the_end_of_turn_token(lms, tiny_assets, family, template):
    model = VLM.from_config(VLMConfig(vision_model=tiny_assets.vision, lm_model=lms(family, template, False),
                                      device="cpu", projector_hidden_dim=64)).eval()
    eot = model.tokenizer.convert_tokens_to_ids(end_of_turn(model.tokenizer, family, template))
    # the LM head prefers the end of turn for the first token, a word after it: a reply that did not stop there
    # would hold that word
    word = model.tokenizer.convert_tokens_to_ids(model.tokenizer.tokenize(" circle")[0])
    calls = []

    def steer(module, args, logits):
        calls.append(1)
        return logits.index_fill(-1, torch.tensor([eot if len(calls) == 1 else word]), 1e4)
    model.lm.get_output_embeddings().register_forward_hook(steer)
    assert model.generate(image_pixels(model.processor, [draw("red", "circle", "center")]), max_new_tokens=6) == [""]
    assert len(calls) > 1  # the word was offered
