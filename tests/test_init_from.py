"""--init_from starts a new run as the model a checkpoint describes, in any phase from any phase: the projector, a
full phase's LM, and LoRA adapters (kept where the new phase has the same ones, else merged into their weights).
The new model's logits are the source's, and its own checkpoints keep what it took."""
import dataclasses

import pytest
import torch

from training import loop
from conftest import tiny_config
from training import checkpoint

PHASES = ("projector", "lora", "full")
TAKEN = {"projector": "projector",  # what the line names, by source phase (the lora source has vision adapters too)
         "full": "projector, the LM's weights"}


@pytest.fixture(scope="module")
def sources(tiny_assets, tmp_path_factory):
    """A checkpoint of each phase, trained 2 steps at rates that move every weight: {phase: path}."""
    cfg = dataclasses.replace(tiny_config(tiny_assets, tmp_path_factory.mktemp("sources")), max_steps=2,
                              val_size=0, warmup_frac=0.0, lora_lr=1e-2, full_lr=1e-3)
    projector = loop.train(dataclasses.replace(cfg, out_dir=cfg.out_dir + "-projector"))["checkpoint"]
    later = {phase: dataclasses.replace(cfg, phase=phase, init_from=str(projector), lora_vision=phase == "lora",
                                        out_dir=f"{cfg.out_dir}-{phase}") for phase in ("lora", "full")}
    return {"projector": projector, **{phase: loop.train(c)["checkpoint"] for phase, c in later.items()}}


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits


def taken(source, target):
    if source != "lora":
        return TAKEN[source]
    lm = "LM adapters" if target == "lora" else "LM adapters merged into the LM"
    return f"projector, {lm}, vision adapters merged into the vision tower"  # the target has no vision adapters


@pytest.mark.parametrize("source", PHASES)
@pytest.mark.parametrize("target", PHASES)
def test_a_new_phase_starts_as_the_source_model(tiny_cfg, tiny_batch, sources, capsys, source, target):
    reference = checkpoint.load_model(sources[source])
    batch = tiny_batch(reference)
    cfg = dataclasses.replace(tiny_cfg, phase=target, init_from=str(sources[source]))
    model = loop.build_model(cfg, torch.device("cpu"), resuming=False)
    expected = logits(reference, batch)
    # merged adapters sum in another order: fp32's rounding, relative to the logits' scale
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert capsys.readouterr().out == f"init_from {sources[source]} (phase {source}): {taken(source, target)}\n"


def test_lora_adapters_stay_adapters_where_the_new_phase_has_the_same(tiny_cfg, sources, capsys):
    cfg = dataclasses.replace(tiny_cfg, phase="lora", lora_vision=True, init_from=str(sources["lora"]))
    model = loop.build_model(cfg, torch.device("cpu"), resuming=False)
    assert capsys.readouterr().out.endswith(": projector, LM adapters, vision adapters\n")
    saved = checkpoint.load_model(sources["lora"]).trainable_state_dict()
    assert all(torch.equal(model.trainable_state_dict()[n], t) for n, t in saved.items()) and not model.carried


@pytest.mark.parametrize("source, target", [("full", "lora"), ("lora", "projector")])
def test_a_run_keeps_what_it_took_in_its_checkpoints(tiny_cfg, tiny_batch, sources, source, target):
    """The frozen weights it took (a full LM under adapters, merged adapters) are saved with what it trains, so its
    checkpoint reloads (and resumes) as the model that trained."""
    cfg = dataclasses.replace(tiny_cfg, phase=target, init_from=str(sources[source]), max_steps=1, val_size=0)
    result = loop.train(cfg)
    batch = tiny_batch(result["model"])
    reloaded = checkpoint.load_model(result["checkpoint"])
    assert reloaded.carried == result["model"].carried != set()
    torch.testing.assert_close(logits(reloaded, batch), logits(result["model"], batch), rtol=0, atol=1e-6)
