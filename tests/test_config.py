"""VLMConfig: command-line overrides, JSON round-trip, validation errors that name the field."""
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from training.checkpoint import check_init_from
from conftest import REPO
from models.config import ConfigError, VLMConfig, parse_overrides


def parse(*argv):
    return parse_overrides(list(argv))


def expect_error(field, fn, *args):
    """`fn(*args)` raises a ConfigError whose message names `field`."""
    with pytest.raises(ConfigError, match=field):
        fn(*args)


# --- command line ---
def test_overrides_of_each_type_and_form():
    cfg = parse("--projector_lr", "1e-3", "--phase", "lora", "--lora_r=8", "--lora_targets", "q_proj,v_proj",
                "--vision_feature_layer", "-2", "--out-dir", "runs/x")
    assert cfg.projector_lr == 1e-3 and isinstance(cfg.projector_lr, float)
    assert cfg.phase == "lora"
    assert cfg.lora_r == 8 and isinstance(cfg.lora_r, int)
    assert cfg.lora_targets == ("q_proj", "v_proj")
    assert cfg.vision_feature_layer == -2  # a negative number is a value, not a flag
    assert cfg.out_dir == "runs/x"  # --out-dir spells --out_dir
    untouched = dataclasses.replace(cfg, projector_lr=1e-3, phase="lora", lora_r=8, lora_targets=("q_proj", "v_proj"),
                                    vision_feature_layer=-2, out_dir="runs/x")
    assert cfg == untouched and cfg.lora_alpha == VLMConfig().lora_alpha


def test_overrides_apply_to_a_given_config():
    base = VLMConfig(lora_r=4, seed=7)
    cfg = parse_overrides(["--seed", "3"], base)
    assert (cfg.lora_r, cfg.seed) == (4, 3)


@pytest.mark.parametrize("text", ["false", "False", "0", "no", "off"])
def test_false_booleans(text):
    assert parse("--resume", text).resume is False
    assert parse(f"--resume={text}").resume is False


@pytest.mark.parametrize("text", ["true", "TRUE", "1", "yes", "on"])
def test_true_booleans(text):
    assert parse("--compile", text).compile is True


def test_bare_boolean_flag_means_true():
    assert parse("--compile").compile is True  # last flag
    cfg = parse("--compile", "--phase", "lora")  # followed by another flag
    assert cfg.compile is True and cfg.phase == "lora"


@pytest.mark.parametrize("argv, field", [
    (["--compile", "maybe"], "compile"),
    (["--lora_r", "abc"], "lora_r"),
    (["--lora_r", "1.5"], "lora_r"),
    (["--projector_lr", "fast"], "projector_lr"),
    (["--no_such_knob", "1"], "no_such_knob"),
    (["--seed"], "seed"),  # a non-boolean flag without a value
])
def test_bad_overrides_name_the_field(argv, field):
    expect_error(field, parse_overrides, argv)


def test_unknown_field_suggests_close_names():
    with pytest.raises(ConfigError, match="lora_r"):
        parse("--lora", "3")


def test_positional_argument_is_rejected():
    expect_error("stray", parse, "stray")


# --- JSON ---
def test_json_round_trip(tmp_path):
    cfg = parse("--phase", "lora", "--lora_targets", "q_proj,v_proj", "--lora_dropout", "0.1", "--compile")
    cfg.save(tmp_path / "config.json")
    loaded = VLMConfig.load(tmp_path / "config.json")
    assert loaded == cfg
    assert isinstance(loaded.lora_targets, tuple) and isinstance(loaded.lora_vision_targets, tuple)


def test_unknown_json_key_warns_and_still_loads(tmp_path):
    d = VLMConfig(lora_r=8).to_dict()
    d["knob_from_the_future"] = 1
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="knob_from_the_future"):
        loaded = VLMConfig.load(tmp_path / "config.json")
    assert loaded == VLMConfig(lora_r=8)


# --- validate ---
def test_defaults_are_valid():
    VLMConfig().validate()


@pytest.mark.parametrize("changes, field", [
    ({"phase": "finetune"}, "phase"),
    ({"phase": "lora"}, "init_from"),  # the lora phase starts from a projector checkpoint
    ({"lora_r": 0}, "lora_r"),
    ({"lora_alpha": -1}, "lora_alpha"),
    ({"projector_lr": 0.0}, "projector_lr"),
    ({"lora_lr": -1e-4}, "lora_lr"),
    ({"lora_lr": float("nan")}, "lora_lr"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"device": "tpu"}, "device"),
    ({"projector": "qformer"}, "projector"),
    ({"projector": "mlp"}, "projector"),  # it needs pixel_unshuffle 1
    ({"data_dir": "/no/such/dir/for/tinyvlm"}, "data_dir"),
])
def test_validate_names_the_field(changes, field):
    expect_error(field, dataclasses.replace(VLMConfig(), **changes).validate)


def test_lora_phase_checks_the_projector_checkpoint(tmp_path):
    VLMConfig().save(tmp_path / "config.json")
    check_init_from(VLMConfig(phase="lora", init_from=str(tmp_path)))
    expect_error("pixel_unshuffle", check_init_from, VLMConfig(phase="lora", init_from=str(tmp_path), pixel_unshuffle=1))
    expect_error("init_from", check_init_from, VLMConfig(phase="lora", init_from=str(tmp_path / "missing")))


@pytest.mark.parametrize("script, argv, expected", [
    ("main.py", ["--lr", "1e-3"], "did you mean --projector_lr, --lora_lr"),
    ("main.py", ["--batchsize", "8"], "did you mean --batch_size"),
    ("main.py", ["--help"], "--lora_projector_lr FLOAT"),
    ("demo.py", ["--epochs", "two"], "--epochs: invalid int value"),
    ("demo.py", ["--help"], "--epochs INT"),
    ("generate.py", ["--help"], "--export DIR"),
    ("generate.py", ["--checkpoint", ".", "--top_p", "2", "photo.jpg"], "0 < --top_p <= 1"),
    ("eval.py", ["--help"], "--split {auto,val,all}"),
    ("eval.py", ["--checkpoint", "/no/such/checkpoint", "--data_dir", "."], "no such directory"),
    ("app.py", ["--help"], "--examples"),
    ("tools/sweep.py", ["--help"], "--lora_dropout"),
    ("tools/lmms.py", ["--help"], "--include_path"),
])
def test_scripts_answer_flags_before_importing_torch(script, argv, expected):
    """--help and mistakes in the flags are answered by the flags alone, in a fraction of a second: torch,
    transformers, gradio and lmms-eval are never imported (each script imports its body after parsing)."""
    heavy = ("torch", "transformers", "gradio", "lmms_eval")
    code = ("import runpy, sys\nsys.argv = [sys.argv[1], *sys.argv[2:]]\ntry:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n"
            f"    print('EXIT', e.code, *(m in sys.modules for m in {heavy!r}))")
    out = subprocess.run([sys.executable, "-c", code, script, *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert expected in out.stdout + out.stderr
    assert "True" not in out.stdout.split("EXIT")[1]


def test_the_readme_gives_each_phases_learning_rate_as_the_config_does():
    """The README's sentence on the phases' learning rates names each rate with the default it has (it said
    lora_lr 2e-5 when the default was 1e-3)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    sentence = readme[readme.index("own learning rates"):].split("so the recipe")[0]
    rates = dict(re.findall(r"`(\w+_lr)` ([0-9.e+-]+)", sentence))
    assert set(rates) == {"projector_lr", "lora_lr", "lora_projector_lr", "full_lr"}, sentence
    assert {name: float(v) for name, v in rates.items()} == {name: getattr(VLMConfig(), name) for name in rates}
