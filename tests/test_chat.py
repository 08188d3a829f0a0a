"""Generation of different prompts in one batch (left padding and a mask), as each alone, on a Llama-type, a
Qwen2-type and a Phi-3-type LM; a multi-turn chat call; evaluation asks each record its own question."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from training import loop
from data.shapes import draw
from models.config import VLMConfig
from models.tiny import build_lm
from models.vision import image_pixels
from models.prompt import encode, to_messages
from models.vlm import VLM
from test_instruct_data import instruct  # noqa: F401 (a fixture)

PROMPTS = ["<image>\nWhat is it?", "<image>\nDescribe the image in a few words, please, as briefly as you can.",
           "Where is the shape?\n<image>"]


@pytest.fixture(scope="module", params=["llama", "qwen2", "phi3"])
def model(request, tiny_assets, tmp_path_factory):
    torch.manual_seed(0)
    lm = build_lm(tmp_path_factory.mktemp(request.param), ["a red circle at the center ."] * 8, request.param)
    vlm = VLM.from_config(VLMConfig(vision_model=tiny_assets.vision, lm_model=str(lm), device="cpu",
                                    projector_hidden_dim=64)).eval()
    torch.nn.init.normal_(vlm.projector.down.weight, std=0.5)  # images that matter to the answer
    return vlm


def pixels(model):
    images = [draw("red", "circle", "center"), draw("blue", "square", "top left"), draw("green", "circle", "bottom right")]
    return image_pixels(model.processor, images)


def test_a_batch_of_different_prompts_is_generated_as_each_alone(model):
    px = pixels(model)
    alone = [model.generate(px[i:i + 1], PROMPTS[i], max_new_tokens=12)[0] for i in range(3)]
    assert model.generate(px, PROMPTS, max_new_tokens=12) == alone
    assert len(set(alone)) > 1  # the rows differ: a batch that mixed them up would show


def test_chat_answers_with_the_history_and_training_attention_comes_back(model):
    px = pixels(model)[:1]
    history = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "a red circle ."},
               {"role": "user", "content": "Where is it?"}]
    reply = model.chat(px, history, max_new_tokens=8)
    assert isinstance(reply, str)
    assert model.chat(px, history, max_new_tokens=8) == reply  # greedy: the same answer
    assert model.lm.config._attn_implementation == "tinyvlm_packed"  # training's attention is back


def test_evaluation_asks_each_record_its_own_question(tiny_cfg, tmp_path, monkeypatch):
    """Records about the same picture whose answers depend on the question (one of them multi-turn): each is
    prompted with its own conversation up to its last reply, which is its reference; one batch holds them all."""
    from data.llava import ImageStore, LlavaDataset, load_records
    from training.report import sample_captions
    draw("red", "circle", "center").save(tmp_path / "img.png")
    qa = [("What colour is the shape?", "red ."), ("What shape is it?", "a circle ."), ("Where is it?", "at the center .")]
    records = [{"id": f"q{i}", "image": "img.png", "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]} for i, (q, a) in enumerate(qa)]
    records.append({"id": "multi", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red ."},
        {"from": "human", "value": "And its shape?"}, {"from": "gpt", "value": "a circle ."}]})
    (tmp_path / "chat.json").write_text(json.dumps(records))
    model = VLM.from_config(tiny_cfg).eval()
    data = LlavaDataset(load_records(tmp_path / "chat.json"), list(range(4)), ImageStore(tmp_path), model.tokenizer,
                        model.processor, model.n_image_tokens, 128)
    batches = []

    def answer_with_the_question(prompts, pixel_values, *args):  # a model that repeats what it was asked
        batches.append(len(prompts))
        return [model.tokenizer.decode(p, skip_special_tokens=True).strip().splitlines()[-2] for p in prompts]
    monkeypatch.setattr(model, "generate_from_ids", answer_with_the_question)
    rows, skipped = sample_captions(model, data, 4, torch.device("cpu"))
    assert batches == [4] and not skipped
    assert [(r.prediction, r.reference) for r in rows] == [(q, a) for q, a in qa] + [("And its shape?", "a circle .")]
    assert "What colour is the shape?" in rows[3].prompt and "red ." in rows[3].prompt  # the history comes along


def test_each_question_is_asked_with_its_own_image_when_a_worker_batches_them(tiny_cfg, tmp_path, monkeypatch):
    """The data worker hands over a batch's images as one tensor (training/report.questions): the rows of that tensor
    stay with their questions when records without an image, skipped ones and ones whose prompt is too long sit
    between them."""
    from data.llava import ImageStore, LlavaDataset, load_records
    from training.report import sample_captions
    colors = {"red": "red", "green": "green", "too_long": "blue"}
    for name, color in colors.items():
        draw(color, "circle", "center").save(tmp_path / f"{name}.png")
    question = {"too_long": " ".join(["Describe the picture."] * 40), "red": "What is it?", "green": "What is it?"}
    records = [{"id": name, "image": f"{name}.png", "conversations": [
        {"from": "human", "value": f"<image>\n{question[name]}"}, {"from": "gpt", "value": "a circle ."}]}
        for name in ("too_long", "red")]
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]})
    records.append({**records[1], "id": "missing", "image": "missing.png"})
    records.append({**records[1], "id": "green", "image": "green.png"})
    (tmp_path / "chat.json").write_text(json.dumps(records))
    model = VLM.from_config(tiny_cfg).eval()
    data = LlavaDataset(load_records(tmp_path / "chat.json"), list(range(5)), ImageStore(tmp_path), model.tokenizer,
                        model.processor, model.n_image_tokens, None)

    def answer_with_the_image(prompts, pixel_values, *args):  # a model that tells which image it was shown
        images = iter(pixel_values)
        return [f"{next(images).float().mean():.4f}" if model.image_token_id in p else "none" for p in prompts]
    monkeypatch.setattr(model, "generate_from_ids", answer_with_the_image)
    rows, skipped = sample_captions(model, data, 5, torch.device("cpu"), batch_size=8, num_workers=1)

    def mean(name):
        return f"{image_pixels(model.processor, [draw(colors[name], 'circle', 'center')])[0].float().mean():.4f}"
    assert [(r.id, r.prediction) for r in rows] == [("red", mean("red")), ("text", "none"), ("green", mean("green"))]
    assert skipped == {"missing_image": 1, "prompt_longer_than_max_text_tokens": 1}
    assert len({mean(name) for name in colors}) == 3


def test_a_conversation_over_budget_keeps_whole_turns_and_the_run_counts_it(tiny_cfg, instruct, capsys):
    """Phase 2 on the instruction file with a text budget that holds each record's first exchange but not its
    second: every record trains its first reply, none is skipped, and the log counts the truncated samples."""
    records = json.loads(Path(instruct["chat_json"]).read_text())
    tok = VLM.from_config(tiny_cfg).tokenizer
    full = [len(encode(tok, to_messages(r["conversations"]), 4, has_image="image" in r)[0]) - ("image" in r) * 4
            for r in records]
    first = [len(encode(tok, to_messages(r["conversations"][:2]), 4, has_image="image" in r)[0]) - ("image" in r) * 4
             for r in records]
    budget = max(first)
    assert budget < min(full)  # every record is cut after its first exchange
    cfg = dataclasses.replace(tiny_cfg, chat_json=instruct["chat_json"], data_dir=instruct["data_dir"], val_size=4,
                              max_steps=2, batch_size=4, max_text_tokens=budget, batch_tokens=4 * (budget + 4))
    result = loop.train(cfg)
    assert result["truncated"] == 8 and not result["skipped"]
    out = capsys.readouterr().out
    assert "| truncated 4" in out and "truncated 8 of 8 samples" in out
