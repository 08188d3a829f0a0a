"""Decoding (models/decode.py) against transformers' own generate, the oracle: token for token in fp32, for every LM
family, prompts of different lengths, each row stopping on its own, a sliding window shorter than the prompt."""
import dataclasses

import pytest
import torch
from transformers import TextIteratorStreamer

from data.shapes import corpus, draw
from models.decode import decode, left_pad, pick
from models.prompt import encode_prompt
from models.tiny import build_lm
from models.vision import image_pixels
from models.vlm import VLM
from tools.bench_generate import transformers_generate

PROMPTS = ["Describe the image.", "What shape is in this picture, and where is it?", "Color?"]
IMAGES = [draw("red", "circle", "top left"), draw("blue", "square", "center"), draw("green", "triangle", "center")]


def ours(model, prompts, pixel_values, max_new_tokens, stop_ids, rows=None):
    ids, mask = left_pad(prompts, model.tokenizer.pad_token_id)
    decoder = model.decoder_for(*ids.shape, max_new_tokens, ids.device)
    return decode(decoder, model.embed(ids, pixel_values), mask, max_new_tokens, stop_ids, model.tokenizer.pad_token_id)


def assert_same_tokens(a, b, pad_id):
    """Equal where both decoded; the longer one (one stops only every few tokens) holds padding beyond."""
    n = min(a.shape[1], b.shape[1])
    assert a[:, :n].tolist() == b[:, :n].tolist()
    assert (a[:, n:] == pad_id).all() and (b[:, n:] == pad_id).all()


@pytest.fixture(scope="module")
def family_lm(tmp_path_factory):
    root, built = tmp_path_factory.mktemp("decode_lms"), {}

    def get(family, **config):
        key = (family, *sorted(config.items()))
        if key not in built:
            torch.manual_seed(0)
            built[key] = build_lm(root / "-".join(map(str, key)), corpus(), family)
            if config:  # e.g. a sliding window shorter than the prompt
                import json
                path = f"{built[key]}/config.json"
                saved = json.load(open(path))
                json.dump({**saved, **config}, open(path, "w"))
        return built[key]
    return get


def family_model(tiny_cfg, lm):
    torch.manual_seed(0)
    model = VLM.from_config(dataclasses.replace(tiny_cfg, lm_model=lm)).eval()
    torch.nn.init.normal_(model.projector.down.weight, std=0.5)  # captions that depend on the image
    return model


@pytest.mark.parametrize("family, config", [("llama", {}), ("llama3", {}), ("qwen2", {}), ("phi", {}), ("phi3", {}),
                                            ("phi3", {"sliding_window": 6})],
                         ids=["llama", "llama3", "qwen2", "phi", "phi3", "phi3-window6"])
def test_greedy_decoding_equals_transformers_generate(tiny_cfg, family_lm, family, config):
    model = family_model(tiny_cfg, family_lm(family, **config))
    prompts = [encode_prompt(model.tokenizer, p, model.n_image_tokens) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1  # rows are left-padded
    px = image_pixels(model.processor, IMAGES)
    with torch.no_grad():
        free = transformers_generate(model, prompts, px, 12, [model.end_of_turn_id])
        assert len({tuple(row) for row in free.tolist()}) == 3  # rows differ: the image and prompt matter
        # Stop on a token the first row writes at its 4th step: rows then end at different steps (or not at all)
        stop = [free[0, 3].item()]
        theirs = transformers_generate(model, prompts, px, 12, stop)
        mine = ours(model, prompts, px, 12, stop)
    assert_same_tokens(mine, theirs, model.tokenizer.pad_token_id)
    ends = [row.index(stop[0]) if stop[0] in row else None for row in mine.tolist()]
    assert ends[0] <= 3 and len(set(ends)) > 1  # each row stops on its own


def test_the_decoder_is_reused_for_a_batch_of_the_same_shape_and_gives_each_its_own_reply(tiny_cfg, family_lm):
    model = family_model(tiny_cfg, family_lm("llama"))
    px = image_pixels(model.processor, IMAGES)
    first = model.generate(px, prompt=PROMPTS, max_new_tokens=10)
    decoder = model.decoder
    assert model.generate(px.flip(0), prompt=PROMPTS[::-1], max_new_tokens=10) == first[::-1]
    assert model.decoder is decoder  # same rows, same slot count: the cache (and on the GPU the graph) is reused
    assert [model.generate(px[i:i + 1], prompt=PROMPTS[i], max_new_tokens=10)[0] for i in range(3)] == first


def test_sampling_keeps_to_the_nucleus_and_top_p_near_zero_is_greedy():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    picked = pick(logits, temperature=1.0, top_p=0.7)  # 0.5 + 0.3 reach 0.7: the first two only
    assert set(picked.tolist()) == {0, 1}
    assert abs((picked == 0).float().mean().item() - 0.5 / 0.8) < 0.05  # renormalized within the nucleus
    assert set(pick(logits, temperature=1.0, top_p=1.0).tolist()) == {0, 1, 2, 3}
    assert (pick(logits, temperature=0.7, top_p=1e-6) == 0).all()
    assert (pick(logits, temperature=0, top_p=0.5) == logits.argmax(-1)).all()


def test_a_streamer_gets_the_reply_as_it_is_decoded(tiny_cfg, family_lm):
    model = family_model(tiny_cfg, family_lm("llama"))
    px = image_pixels(model.processor, IMAGES[:1])
    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    reply = model.generate(px, max_new_tokens=10, streamer=streamer)[0]
    assert "".join(streamer).strip() == reply
