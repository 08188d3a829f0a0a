"""GPU correctness, on the tiny backbones: bf16 against fp32, compiled against eager, the on-device skip of a
non-finite step, exact resume, batched captions and a checkpoint loaded for captioning, all on CUDA. Skipped
where there is no CUDA device (CI)."""
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, AutoTokenizer

from training import checkpoint
from training import loop
from test_full_phase import full_cfg
from test_instruct_data import instruct  # noqa: F401 (a fixture)
from test_robustness import on_projector_forward, spy_optimizer_steps
from test_train import check_resume_is_exact
from models.lora import lora_layers
from models.prompt import DEFAULT_PROMPT, encode_prompt, label_positions
from models.vlm import VLM
from training import speed
from tools.bench_generate import transformers_generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def cuda_cfg(tiny_cfg):
    return dataclasses.replace(tiny_cfg, device="cuda", compile=False)


def loss_of(model, batch, dtype=None):
    """The mean loss per label token."""
    batch = {k: v.cuda() for k, v in batch.items()}
    with torch.autocast("cuda", dtype) if dtype else torch.autocast("cuda", enabled=False):
        return (model(**batch).loss_sum / len(label_positions(batch["labels"]))).float()


def assert_losses_close(got, expected):
    """Two runs' logged (step, loss) pairs: the same steps, each loss within 2% (bf16's noise: kernels fused
    differently round differently)."""
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        assert abs(a - b) / b < 2e-2, (got, expected)


def test_bf16_loss_is_close_to_fp32(cuda_cfg, tiny_batch):
    """Frozen weights in bf16 and bf16 autocast (what training does on a GPU) within 2% of full fp32."""
    model = VLM.from_config(cuda_cfg).cuda().eval()
    batch = tiny_batch(model)
    fp32 = loss_of(model, batch)
    bf16 = loss_of(model.cast_frozen(torch.bfloat16), batch, torch.bfloat16)
    assert abs(bf16 - fp32) / fp32 < 2e-2, (bf16, fp32)


def test_compiled_is_close_to_eager(cuda_cfg, tiny_batch):
    """The layers as training compiles them (static shapes, CUDA graphs, packed rows in bf16) give eager's loss."""
    model = VLM.from_config(cuda_cfg).cuda().eval()
    batch = tiny_batch(model, packed=True)
    eager = loss_of(model, batch, torch.bfloat16)
    speed.compile_blocks(model)
    compiled = [float(loss_of(model, batch, torch.bfloat16)) for _ in range(3)]  # recorded, then replayed
    eager = float(eager)
    for loss in compiled:
        assert abs(loss - eager) / eager < 1e-3, (compiled, eager)  # bf16: kernels fused differently round differently


def test_compiled_training_evaluates_between_steps_like_eager(cuda_cfg):
    """The default GPU run: compiled layers with CUDA graphs, validation every 2 steps in between (eager), and
    lengths that vary from batch to batch; with 2 micro-batches a step, as on a smaller GPU (each replay reuses
    the memory of the one before, gradients included). Losses as eager training's, within bf16's noise."""
    def run(compile, out):
        return loop.train(dataclasses.replace(cuda_cfg, compile=compile, max_steps=6, eval_every=2, batch_size=4,
                                              grad_accum=2, out_dir=str(out)))
    compiled, eager = run(True, cuda_cfg.out_dir + "_compiled"), run(False, cuda_cfg.out_dir + "_eager")
    assert_losses_close(compiled["losses"], eager["losses"])
    assert abs(compiled["val_loss"] - eager["val_loss"]) / eager["val_loss"] < 2e-2


@pytest.mark.parametrize("compile", [False, True])
def test_training_steps_never_make_the_host_wait_for_the_gpu(cuda_cfg, on_optimizer_step, compile):
    """Between log lines the host only queues work: a sync would leave the GPU idle while the host catches up.
    CUDA's sync check is set to raise from the end of step 3 (compiled layers have recorded their CUDA graphs
    by then, which syncs; packed batches have one shape, so there is no new one to record) to the end of step 6,
    before its log line reads the loss."""
    steps = []

    def watch(optimizer):
        steps.append(len(steps) + 1)
        torch.cuda.set_sync_debug_mode("error" if 3 <= len(steps) < 6 else "default")
    on_optimizer_step(watch, when="after")
    try:
        result = loop.train(dataclasses.replace(cuda_cfg, compile=compile, max_steps=6, log_every=10**9,
                                                batch_size=4))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert steps == [1, 2, 3, 4, 5, 6] and result["step"] == 6


def test_fused_adamw_skips_a_non_finite_step_on_cuda(cuda_cfg, monkeypatch, on_optimizer_step):
    on_projector_forward(monkeypatch, lambda call, out: out * float("nan") if call == 2 else out)
    steps = spy_optimizer_steps(on_optimizer_step)
    result = loop.train(dataclasses.replace(cuda_cfg, max_steps=3))
    assert steps == [(True, True), (False, False), (True, True)] and result["step"] == 3


def test_resume_is_exact_on_cuda(cuda_cfg, on_optimizer_step):
    check_resume_is_exact(cuda_cfg, on_optimizer_step)


def test_a_batch_is_captioned_like_each_image_alone_on_cuda(cuda_cfg):
    model = VLM.from_config(cuda_cfg).cuda().cast_frozen(torch.bfloat16)
    torch.nn.init.normal_(model.projector.down.weight, std=0.5)
    size = model.processor.size["height"]
    pixels = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).cuda()
    alone = [model.generate(pixels[i:i + 1])[0] for i in range(4)]
    assert model.generate(pixels) == alone


@pytest.mark.parametrize("phase", ["projector", "lora", "full"])
def test_the_decode_step_replayed_as_a_cuda_graph_decodes_as_it_does_eagerly(cuda_cfg, phase):
    """The one-token step recorded once and replayed (models/decode.py) gives the captions of the same step run
    eagerly, token for token, also after the trained LM weights (fp32, cast by autocast inside the step) change in
    place as an optimizer step changes them; and mostly those of transformers' generate (bf16: rounding may tip a
    near tie)."""
    model = VLM.from_config(dataclasses.replace(cuda_cfg, phase=phase)).place("cuda")
    torch.nn.init.normal_(model.projector.down.weight, std=0.5)
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    pixels = torch.randint(0, 256, (16, *model.vision.pixel_shape), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).cuda()
    prompts = [encode_prompt(model.tokenizer, DEFAULT_PROMPT, model.n_image_tokens)] * 16

    def graphed_and_eager():
        graphed = model.generate_tokens(prompts, pixels, max_new_tokens=24)
        graph, model.decoder.graph = model.decoder.graph, None  # the same decoder and buffers, its step run eagerly
        eager = model.generate_tokens(prompts, pixels, max_new_tokens=24)
        model.decoder.graph = graph
        return graphed.tolist(), eager.tolist()
    graphed, eager = graphed_and_eager()
    assert model.decoder.graph is not None and graphed == eager
    with torch.no_grad():
        for p in model.lm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p), alpha=0.1)
    if phase != "projector":
        again, eager = graphed_and_eager()
        assert again == eager and again != graphed
    theirs = transformers_generate(model, prompts, pixels, 24, [model.end_of_turn_id, model.tokenizer.eos_token_id])
    mine = torch.tensor(eager)
    n = min(theirs.shape[1], mine.shape[1])
    same = (theirs[:, :n].cpu() == mine[:, :n]).all(1).float().mean().item()
    print(f"{phase}: identical to transformers' generate: {same:.0%} of 16 rows")
    assert same >= 0.5


def test_a_checkpoint_loads_on_cuda_as_it_trained(cuda_cfg):
    """generate.py's path: a checkpoint placed on the GPU stores its frozen weights in bf16 as training did (not
    fp32 for autocast to cast at every decoded token), keeps its trained weights in fp32, and captions as the
    model that trained."""
    result = loop.train(dataclasses.replace(cuda_cfg, max_steps=2))
    loaded = checkpoint.load_model(result["checkpoint"]).place("cuda")
    assert {(p.requires_grad, p.dtype) for p in loaded.parameters()} == {(False, torch.bfloat16), (True, torch.float32)}
    size = loaded.processor.size["height"]
    pixels = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).cuda()
    assert loaded.generate(pixels) == result["model"].generate(pixels)


def one_step(cfg, tiny_batch, compiled, prepare=lambda model: None):
    """(loss, {name: gradient}) of one forward and backward of a fresh model (seed 0), compiled per block or eager;
    prepare(model) runs first."""
    torch.manual_seed(0)
    model = VLM.from_config(cfg).cuda().train()
    prepare(model)
    if compiled:
        speed.compile_blocks(model)
    loss = loss_of(model, tiny_batch(model))  # fp32 rows: the blocks' numbers, without bf16's rounding
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=0)
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-3, atol=1e-3 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_lora_blocks_match_eager(cuda_cfg, tiny_batch, checkpointing):
    """LoRA on the LM and the tower inside the per-layer torch.compile with CUDA graphs, with and without
    gradient checkpointing (a big LM's LoRA run): eager's loss and gradients."""
    def nonzero_adapters(model):
        for layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B, std=0.1)
    lora = dataclasses.replace(cuda_cfg, phase="lora", init_from="x", lora_vision=True)
    eager = one_step(lora, tiny_batch, compiled=False, prepare=nonzero_adapters)
    compiled = one_step(dataclasses.replace(lora, gradient_checkpointing=checkpointing), tiny_batch, compiled=True,
                        prepare=nonzero_adapters)
    assert_same_step(compiled, eager)


def test_compiled_projector_phase_with_checkpointing_matches_it_without(cuda_cfg, tiny_batch):
    """Phase 1 of a big LM checkpoints the frozen LM's layers (their activations carry the projector's gradient),
    inside the compiled layers too (compile_blocks leaves CUDA graphs out there): the same loss and gradients."""
    plain = one_step(cuda_cfg, tiny_batch, compiled=True)
    checkpointed = one_step(dataclasses.replace(cuda_cfg, gradient_checkpointing=True), tiny_batch, compiled=True)
    assert_same_step(checkpointed, plain)


def test_unusable_and_text_only_records_add_no_compiled_graph(cuda_cfg, instruct, tmp_path):
    """Compiled training over the instruction file (every other record text-only) with 3 of its images missing
    compiles no more graphs than over clean captions: packing gives the LM one shape, and the images come in
    one slot count (batch_size 8). Before packing, every skipped record made a new batch size to compile."""
    records = json.loads(Path(instruct["chat_json"]).read_text())
    for r in [r for r in records if "image" in r][:3]:
        r["image"] = "missing/" + r["image"]
    (tmp_path / "dirty.json").write_text(json.dumps(records))

    def graphs(**changes):
        torch._dynamo.reset()
        counters.clear()
        loop.train(dataclasses.replace(cuda_cfg, compile=True, max_steps=6, max_bad_fraction=0.5, **changes))
        return counters["stats"]["unique_graphs"]
    clean = graphs(out_dir=str(tmp_path / "clean"))
    dirty = graphs(out_dir=str(tmp_path / "dirty"), chat_json=str(tmp_path / "dirty.json"),
                   data_dir=instruct["data_dir"], val_size=4)
    assert 0 < dirty <= clean, (dirty, clean)


def test_a_new_image_count_compiles_nothing(cuda_cfg):
    """The tower and projector are compiled once for every image count (their batch dimension is dynamic) and run
    without CUDA graphs: a micro-batch that first holds 32 or 48 images neither stops for seconds to compile (it
    did, mid-run, before) nor records graphs (a new count re-recorded every LM layer's: a 1.7 s step), and the
    features match eager."""
    model = VLM.from_config(cuda_cfg).cuda().eval()
    eager = VLM.from_config(cuda_cfg).cuda().eval()
    eager.load_state_dict(model.state_dict())
    speed.compile_blocks(model)
    torch._dynamo.reset()
    counters.clear()
    recorded = []
    record = torch._dynamo.callback_handler.register_start_callback(
        lambda args: recorded.append(args.callback_trigger.name) if "CUDAGRAPH" in args.callback_trigger.name else 0)
    graphs = []
    for n in (16, 32, 48, 16):
        pixels = torch.randint(0, 256, (n, *model.vision.pixel_shape), dtype=torch.uint8, device="cuda")
        torch.compiler.cudagraph_mark_step_begin()  # as forward does
        with torch.no_grad():
            torch.testing.assert_close(model.encode_images(pixels).clone(), eager.encode_images(pixels),
                                       rtol=1e-4, atol=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.callback_handler.remove_start_callback(record)
    assert graphs[0] > 0 and graphs == graphs[:1] * 4, graphs
    assert recorded == []


def test_the_compiled_full_phase_trains_like_eager_and_compiles_once(cuda_cfg, on_optimizer_step):
    """--phase full keeps the LM's weights in fp32 under bf16 autocast, so its queries reach attention in fp32:
    they take FlashAttention's packed kernel like the other phases' (the per-sample fallback read the sample
    boundaries on the host and compiled again at each new count: 100 s a step on an H200). Compiled losses as
    eager's; no graph compiled after the first step, though the rows' samples differ from step to step."""
    def run(compile, graphs=None):
        cfg = full_cfg(dataclasses.replace(cuda_cfg, out_dir=f"{cuda_cfg.out_dir}_{compile}"), max_steps=6,
                       batch_size=4, compile=compile)
        torch._dynamo.reset()
        counters.clear()
        if graphs is not None:  # graphs compiled by the end of each step
            on_optimizer_step(lambda optimizer: graphs.append(counters["stats"]["unique_graphs"]), when="after")
        return loop.train(cfg)["losses"]
    graphs = []
    eager, compiled = run(False), run(True, graphs)
    assert graphs[0] > 0 and graphs == graphs[:1] * 6, graphs
    assert_losses_close(compiled, eager)


@pytest.fixture(scope="module")
def lm_in_fp32_and_bf16(tiny_assets, tmp_path_factory):
    """The same weights saved in fp32 and in bf16 (as the Hub ships SmolLM2): (fp32 dir, bf16 dir). The LM is
    $TINYVLM_GPU_LM, e.g. the real SmolLM2 (`TINYVLM_GPU_LM=$(python -m models.smollm2)`), else the tiny one; its
    weights are rounded to bf16 first, so both dirs hold the same numbers."""
    lm = os.environ.get("TINYVLM_GPU_LM", tiny_assets.lm)
    bf16 = AutoModelForCausalLM.from_pretrained(lm).to(torch.bfloat16)
    dirs = tmp_path_factory.mktemp("fp32_lm"), tmp_path_factory.mktemp("bf16_lm")
    for model, folder in zip((bf16.float(), bf16.to(torch.bfloat16)), dirs):
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(lm).save_pretrained(folder)
    return tuple(map(str, dirs))


@pytest.mark.parametrize("phase", ["lora", "full"])
def test_an_lm_saved_in_bf16_trains_as_the_same_lm_in_fp32(cuda_cfg, lm_in_fp32_and_bf16, phase):
    """Trainable weights train in fp32 whatever the LM's saved dtype (kept in bf16, AdamW's updates at full_lr 2e-5
    rounded away for 97% of the full phase's LM weights: VQA 0.34 instead of 0.62): the same weights saved in bf16 and
    in fp32 train alike (losses within bf16's noise), and a full-phase LM matrix keeps its updates in most entries.
    (bf16 autocast sees an update only once it passes half a bf16 step of the weight: weights that start on bf16's
    grid, as these do, change the forward later than arbitrary fp32 ones would.)"""
    def run(lm, name):
        cfg = dataclasses.replace(cuda_cfg, lm_model=lm, batch_size=4, out_dir=f"{cuda_cfg.out_dir}_{name}")
        projector = loop.train(dataclasses.replace(cfg, max_steps=2, out_dir=cfg.out_dir + "_projector"))
        return loop.train(dataclasses.replace(cfg, phase=phase, init_from=str(projector["checkpoint"]), max_steps=4,
                                              full_lr=2e-5, warmup_frac=0.0))
    fp32_lm, bf16_lm = lm_in_fp32_and_bf16
    fp32, bf16 = run(fp32_lm, "fp32"), run(bf16_lm, "bf16")
    assert_losses_close(bf16["losses"], fp32["losses"])
    model = bf16["model"]
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    if phase == "full":
        name, trained = next((n, p) for n, p in model.lm.named_parameters() if n.endswith("down_proj.weight"))
        saved = AutoModelForCausalLM.from_pretrained(bf16_lm).get_parameter(name)
        assert saved.dtype == torch.bfloat16
        assert (trained.detach().cpu() != saved.float()).float().mean() > 0.5
