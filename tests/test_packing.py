"""Packing: samples end to end in one row give each sample exactly what it gets alone (losses, gradients, logits),
on a Llama-type and a Phi-3-type LM (fused projections), for single-turn, multi-turn and text-only records; the
collator's row keeps every sample to itself; the lengths packing plans with are the encoded ones."""
import dataclasses
import gc
import multiprocessing

import pytest
import torch

from conftest import model_inputs, packer
from data.download import DataError
from data.llava import ImageStore, LlavaDataset, load_records, steps_of_micro_batches
from data.loading import build_data, with_images
from data.packing import image_slots, plan_micro_batches
from data.shapes import draw
from models.config import VLMConfig
from models.lora import lora_layers
from models.prompt import IGNORE, encode
from models.tiny import build_lm
from models.vision import image_pixels
from models.vlm import VLM
from training import speed
from test_instruct_data import instruct  # noqa: F401 (a fixture)

CONVERSATIONS = {
    "single_turn": [("<image>\nDescribe the image.", "a red circle at the center .")],
    "multi_turn": [("<image>\nWhat is in this picture?", "a blue square ."), ("Where is it?", "at the top left ."),
                   ("And its colour?", "blue .")],
    "text_only": [("What color is a ripe banana?", "yellow ."), ("And grass?", "green .")],
    "long_reply": [("<image>\nDescribe it in detail.", "a green circle . " * 6)],
}


@pytest.fixture(scope="module", params=["llama", "phi3"])
def model(request, tiny_assets, tmp_path_factory):
    """A LoRA-phase VLM on a tiny LM of the family, adapters made non-zero so the LM's gradients mean something."""
    torch.manual_seed(0)
    lm = build_lm(tmp_path_factory.mktemp(request.param), ["a red circle at the center ."] * 8, request.param)
    cfg = VLMConfig(vision_model=tiny_assets.vision, lm_model=str(lm), device="cpu", projector_hidden_dim=64,
                    max_text_tokens=160, phase="lora", init_from="x", lora_dropout=0.0)
    vlm = VLM.from_config(cfg).train()
    for layer in lora_layers(vlm):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return vlm


def sample(model, kind, image_color="red"):
    turns = CONVERSATIONS[kind]
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    has_image = kind != "text_only"
    ids, labels = encode(model.tokenizer, messages, model.n_image_tokens, has_image=has_image)
    s = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if has_image:
        s["pixel_values"] = image_pixels(model.processor, [draw(image_color, "circle", "center")])[0]
    return s


def per_sample_losses(model, batch, lengths):
    """Each sample's summed loss, from the logits of a packed row [1, N] (or of one unpacked sample)."""
    logits = model(**{k: v for k, v in model_inputs(batch).items() if k not in ("labels", "label_index")}).logits[0]
    labels, out, at = batch["labels"][0], [], 0
    for n in lengths:
        lg, lb = logits[at:at + n - 1], labels[at + 1:at + n]
        out.append(torch.nn.functional.cross_entropy(lg.float(), lb, ignore_index=IGNORE, reduction="sum"))
        at += n
    return torch.stack(out)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_packed_samples_train_exactly_as_each_alone(model):
    """Per-sample losses within 1e-5 and the summed gradient within 1e-5 (relative, fp32) of each sample alone."""
    batch_samples = [sample(model, kind) for kind in CONVERSATIONS]
    lengths = [len(s["input_ids"]) for s in batch_samples]
    collate = packer(model, batch_size=len(batch_samples))
    packed = collate(batch_samples)
    assert packed["input_ids"].shape == (1, len(batch_samples) * model.max_sample_len) and packed["n_images"] == 3

    model.zero_grad()
    together = per_sample_losses(model, packed, lengths)
    together.sum().backward()
    packed_grads = grads(model)
    model.zero_grad()
    alone = torch.stack([per_sample_losses(model, packer(model, batch_size=1)([s]), [n])[0]
                         for s, n in zip(batch_samples, lengths)])
    alone.sum().backward()
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == grads(model).keys() and any(n.startswith("lm.") for n in packed_grads)
    for name, g in grads(model).items():
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)
    # the training loss (label positions only through the head) is the same sum
    torch.testing.assert_close(model(**model_inputs(packed)).loss_sum, alone.sum(), rtol=1e-5, atol=1e-5)


def test_no_sample_sees_another_in_its_row(model):
    """Changing the other samples of a pack (their text and their image) leaves a sample's logits as they were."""
    kept = sample(model, "multi_turn")
    collate = packer(model, batch_size=3)
    model.eval()
    with torch.no_grad():
        a = model(**{k: v for k, v in model_inputs(collate([sample(model, "single_turn", "red"), kept,
                                                             sample(model, "text_only")])).items()
                     if k not in ("labels", "label_index")}).logits[0]
        b = model(**{k: v for k, v in model_inputs(collate([sample(model, "long_reply", "blue"), kept,
                                                             sample(model, "single_turn", "green")])).items()
                     if k not in ("labels", "label_index")}).logits[0]
    model.train()
    n = len(kept["input_ids"])
    start_a = len(sample(model, "single_turn")["input_ids"])
    start_b = len(sample(model, "long_reply")["input_ids"])
    torch.testing.assert_close(a[start_a:start_a + n], b[start_b:start_b + n], rtol=1e-5, atol=1e-5)


def test_the_row_keeps_samples_apart(model):
    """Positions restart at 0 for every sample; no label is the next sample's first token; cu_seqlens has a fixed
    size whatever the samples; the images come in sample order, then blank slots."""
    kinds = ["single_turn", "text_only", "multi_turn"]
    batch_samples = [sample(model, k) for k in kinds]
    collate = packer(model, batch_size=4)
    packed = collate(batch_samples)
    cu = packed["cu_seqlens"].tolist()
    starts = [0]
    for s in batch_samples:
        starts.append(starts[-1] + len(s["input_ids"]))
    assert cu[:4] == starts and cu[-1] == packed["input_ids"].shape[1] and len(cu) == collate.cap
    assert len(collate(batch_samples[:1])["cu_seqlens"]) == collate.cap  # the same size for one sample
    positions = packed["position_ids"][0]
    for a, b in zip(starts, starts[1:]):
        assert positions[a:b].tolist() == list(range(b - a))
        assert packed["labels"][0, a] == IGNORE  # the previous sample's last token is never trained to predict it
    for i, s in enumerate(batch_samples):
        assert torch.equal(packed["input_ids"][0, starts[i]:starts[i + 1]], s["input_ids"])
    assert packed["n_images"] == 2 and len(packed["pixel_values"]) == image_slots(2, 4)
    assert torch.equal(packed["pixel_values"][1], batch_samples[2]["pixel_values"])
    assert (packed["pixel_values"][2:] == 0).all()


def test_a_micro_batch_that_does_not_fit_is_refused(model):
    s = sample(model, "long_reply")
    with pytest.raises(ValueError, match="exceed a micro-batch"):
        packer(model, batch_size=4, batch_tokens=len(s["input_ids"]) + 5)([s, s])


def test_image_slots_are_few_shapes():
    assert [image_slots(n, 256) for n in (0, 1, 16, 17, 150, 256)] == [16, 16, 16, 32, 160, 256]
    assert [image_slots(n, 4) for n in (0, 3, 4)] == [4, 4, 4]


def test_the_frozen_tower_meets_every_image_count_before_training(tiny_cfg):
    """training.speed.warm_image_counts runs the tower once on each count image_slots can give (compiled runs call
    it before the first step), without gradients; a tower that trains is left alone."""
    def counts_seen(cfg):
        model, seen = VLM.from_config(cfg), []
        model.vision.register_forward_hook(lambda m, args, out: seen.append((len(args[0]), torch.is_grad_enabled())))
        speed.warm_image_counts(model, 40, torch.device("cpu"))
        return seen
    assert counts_seen(tiny_cfg) == [(16, False), (32, False), (40, False)]
    assert counts_seen(dataclasses.replace(tiny_cfg, lora_vision=True)) == []


def test_planned_micro_batches_keep_both_budgets_and_the_order():
    lengths = [50, 60, 0, 70, 10, 100, 30, 30, 30]
    plan = plan_micro_batches(range(9), lengths, batch_size=3, batch_tokens=120)
    assert plan == [[0, 1, 2], [3, 4], [5], [6, 7, 8]]
    assert sum(plan, []) == list(range(9))


def test_planned_lengths_are_the_encoded_lengths(tiny_cfg, instruct):  # noqa: F811
    """The length pass (LlavaDataset.text_lengths: one rendering of each record's text, no image read) gives the
    encoded sample's length, for captions, multi-turn and text-only records, cut by max_text_tokens or not; a record
    without its image is 0, and says why (with_images)."""
    model = VLM.from_config(tiny_cfg)
    for chat_json, root in ((f"{tiny_cfg.data_dir}/chat.json", tiny_cfg.data_dir),
                            (instruct["chat_json"], instruct["data_dir"])):
        records = load_records(chat_json)
        for max_text in (64, 12):
            data = LlavaDataset(records, list(range(len(records))), ImageStore(root), model.tokenizer,
                                model.processor, model.n_image_tokens, max_text)
            planned = data.text_lengths(range(len(data)))
            for i in range(len(data)):
                item = data[i]
                if "skip" not in item:
                    assert planned[i] == (len(item["input_ids"]), None), (chat_json, max_text, i)
    records = load_records(instruct["chat_json"])
    data = LlavaDataset(records, [0], ImageStore(tiny_cfg.data_dir), model.tokenizer, model.processor,
                        model.n_image_tokens, 64)  # the instruction images are not in this folder
    assert with_images(data.text_lengths([0]), records["image"][:1], data.images) == [(0, "missing_image")]
    assert data[0]["skip"] == "missing_image"


def test_a_run_over_unusable_and_text_only_records_packs_every_batch_to_one_shape(tiny_cfg, instruct, monkeypatch):
    """Training on the instruction file (every other record text-only), tokens binding: every micro-batch is
    [1, batch_tokens] and cu_seqlens one size; the image batches come in multiples of the slot size."""
    from training import loop
    shapes = []
    forward = VLM.forward

    def spy(self, input_ids, pixel_values, **kw):
        shapes.append((tuple(input_ids.shape), tuple(kw["cu_seqlens"].shape), len(pixel_values)))
        return forward(self, input_ids, pixel_values, **kw)
    monkeypatch.setattr(VLM, "forward", spy)
    cfg = dataclasses.replace(tiny_cfg, chat_json=instruct["chat_json"], data_dir=instruct["data_dir"],
                              val_size=4, max_steps=4, batch_tokens=200, batch_size=8)
    loop.train(cfg)
    assert {s[:2] for s in shapes} == {((1, 200), (8 + -(-200 // 68) + 1,))}
    assert all(s[2] in (8,) for s in shapes)  # image_slots(n, 8): always one multiple of 8


def test_the_data_workers_start_before_the_first_step_and_end_with_it(tiny_cfg):
    """steps_of_micro_batches starts the loader's workers at once: they open the images (a zip index of 595K members
    each at CC3M's size) and make the first batches while the model compiles, not after. Closing the steps ends them."""
    cfg = dataclasses.replace(tiny_cfg, num_workers=2)
    train_loader, _ = build_data(cfg, VLM.from_config(cfg), 0, 1)
    before = set(multiprocessing.active_children())
    steps = steps_of_micro_batches(train_loader, 0, 1)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    (batch,), _ = next(steps)
    assert batch["input_ids"].shape[1] <= cfg.batch_tokens
    steps.close()
    for worker in workers:
        worker.join(timeout=60)
    assert not any(worker.is_alive() for worker in workers)


def test_parsing_chat_json_leaves_the_garbage_collector_on(tiny_assets, tmp_path):
    """load_records pauses collections while it parses (millions of objects at CC3M's size), and turns them back on
    whether the file parses or not."""
    assert len(load_records(f"{tiny_assets.data_dir}/chat.json")) > 0 and gc.isenabled()
    (tmp_path / "chat.json").write_text('[{"id": "0", "image": "a.jpg", "conv')
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(tmp_path / "chat.json")
    assert gc.isenabled()
