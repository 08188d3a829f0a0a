"""VLMConfig: every knob of tinyvlm in one dataclass.

Edit the defaults here, or override any field on the command line:
    python main.py --phase lora --lora_r 32 --compile false
The flags are generated from the dataclass, so a new field is a new flag for free.
"""
import argparse
import dataclasses
import difflib
import json
import re
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and what would be valid."""


@dataclass
class VLMConfig:
    # --- preset ---
    preset: str = "tinyvlm"  # a reference recipe (PRESETS, models/config.py) setting several fields; flags override it

    # --- backbones (hub ids or local directories) ---
    vision_model: str = "google/siglip-base-patch16-224"  # any transformers vision tower: SigLIP, CLIP, DINOv2
    fused_vision_model: str = ""  # a second tower, its features joined channel-wise (Prismatic); "" = none
    lm_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    vision_feature_layer: int = -1  # -1: final (post-layernorm) output; -2: penultimate layer, as in LLaVA
    pixel_unshuffle: int = 2  # merge s x s neighbouring patches: 196 -> 49 image tokens at s=2; 1 = off
    image_fit: str = "resize"  # resize (as the tower's processor does) | letterbox (pad to a square first)
    projector: str = "swiglu"  # swiglu | mlp (LLaVA's: exports as Llava) | linear (SmolVLM's: Idefics3); docs/export.md
    projector_hidden_dim: int = 2048  # the swiglu projector's (mlp's hidden size is the LM's, as in LLaVA)
    max_text_tokens: int = 128  # text tokens per sample; image tokens come on top and are never truncated

    # --- phase: "projector" (align, only the projector trains), "lora" (adapters + projector), "full" (LM + projector) ---
    phase: str = "projector"
    init_from: str = ""  # a checkpoint or run dir to start from, any phase (lora, full: needed); docs/checkpoints.md
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # peft's default (LLaVA: 0.05); trained as well in tools/sweep.py, and 1.2x faster (README)
    lora_targets: tuple = ()  # the LM's linear layers to adapt, by name (e.g. q_proj,v_proj); empty: all but the head
    lora_vision: bool = False  # also put adapters on the vision encoder's linear layers
    lora_vision_targets: tuple = ()  # the vision encoder's linear layers to adapt, by name; empty: all of them

    # --- data ---
    dataset: str = "liuhaotian/LLaVA-CC3M-Pretrain-595K"  # hub data set, downloaded when data_dir is empty
    data_dir: str = ""  # folder with chat.json and images.zip (or an images/ folder); "" = cache_dir/<dataset>
    chat_json: str = ""  # a LLaVA json (e.g. llava_v1_5_mix665k.json) to use instead of data_dir/chat.json
    cache_dir: str = "~/.cache/tinyvlm"
    val_size: int = 1000  # held-out records (chosen by seed, not by position)
    num_workers: int = 8
    max_bad_fraction: float = 0.05  # stop if more than this fraction of samples turn out unusable

    # --- optimisation ---
    batch_tokens: int = 16384  # a micro-batch (per device): whole samples packed into this many tokens, one shape
    batch_size: int = 256  # the most samples a micro-batch holds (CC3M: about 160 fill batch_tokens)
    grad_accum: int = 1  # a step: batch_tokens * grad_accum * world size tokens; a smaller GPU: 8192 x 2 (same result)
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = run `epochs` epochs
    projector_lr: float = 1e-3  # phase 1: the projector's learning rate (LLaVA: 1e-3)
    lora_lr: float = 1e-3  # phase 2: the adapters' learning rate (chosen by tools/sweep.py; see the README)
    lora_projector_lr: float = 2e-5  # phase 2: the aligned projector's learning rate (LLaVA: 2e-5)
    full_lr: float = 2e-5  # phase full: every LM weight and the projector (LLaVA-1.5's fine-tuning: 2e-5)
    weight_decay: float = 0.0  # applied to matrices only, never to biases or norms
    warmup_frac: float = 0.03
    grad_clip: float = 1.0
    max_bad_steps: int = 5  # non-finite losses/gradients in a row before the run stops
    seed: int = 0

    # --- system ---
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = True  # torch.compile on CUDA (not on the CPU); its cache: TORCHINDUCTOR_CACHE_DIR
    cuda_graphs: bool = True  # compiled layers replay as CUDA graphs (one GPU; not under DDP); false: plain compile
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward: less memory, any phase
    # --- logging, evaluation, checkpoints ---
    log_every: int = 10
    eval_every: int = 500
    eval_captions: int = 4  # fixed validation images captioned at every evaluation
    metric_records: int = 64  # validation records captioned at the end of a phase for CIDEr, BLEU-4, ROUGE-L; 0 = off
    save_every: int = 1000
    keep_last: int = 2
    out_dir: str = "checkpoints/run"
    resume: bool = True  # continue from the newest checkpoint in out_dir, if there is one
    wandb_project: str = ""  # "" = off

    # ------------------------------------------------------------------
    def validate(self):
        """Each field on its own, before anything loads. (Checks against the backbones' shapes are in
        models.vlm.check_shapes, against checkpoints in training/checkpoint.py.)"""
        def bad(name, why):
            raise ConfigError(f"config field '{name}' = {getattr(self, name)!r}: {why}")
        if self.phase not in ("projector", "lora", "full"):
            bad("phase", "must be 'projector', 'lora' or 'full'")
        if self.phase in ("lora", "full") and not self.init_from:
            bad("init_from", f"the {self.phase} phase starts from a projector checkpoint: pass --init_from DIR "
                "(the out_dir of a --phase projector run)")
        for name in ("lora_r", "lora_alpha", "batch_tokens", "batch_size", "grad_accum", "epochs", "pixel_unshuffle",
                     "projector_hidden_dim", "max_text_tokens", "log_every", "eval_every", "save_every",
                     "keep_last", "max_bad_steps"):
            if getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        for name in ("projector_lr", "lora_lr", "lora_projector_lr", "full_lr"):
            if not getattr(self, name) > 0:
                bad(name, "must be a positive learning rate, e.g. 1e-3")
        for name, lo, hi in (("lora_dropout", 0, 1), ("warmup_frac", 0, 1), ("max_bad_fraction", 0, 1)):
            if not lo <= getattr(self, name) < hi:
                bad(name, f"must be in [{lo}, {hi})")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.max_steps < 0 or self.val_size < 0:
            raise ConfigError("config fields weight_decay, grad_clip, max_steps and val_size must be >= 0")
        for name in ("num_workers", "metric_records"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.preset not in PRESETS:
            bad("preset", f"must be one of {', '.join(PRESETS)}")
        if self.projector not in PROJECTORS:
            bad("projector", f"must be one of {', '.join(PROJECTORS)}")
        if self.projector == "mlp" and self.pixel_unshuffle != 1:
            bad("projector", f"LLaVA's mlp projector takes every patch, unmerged: pass --pixel_unshuffle 1 with it "
                f"(it is {self.pixel_unshuffle}), or use --projector linear, which merges patches as SmolVLM does")
        if self.image_fit not in ("resize", "letterbox"):
            bad("image_fit", "must be 'resize' or 'letterbox'")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", "must be 'auto', 'cpu' or 'cuda'")
        if self.chat_json and not (self.data_dir and Path(self.chat_json).expanduser().is_file()):
            bad("chat_json", "must name an existing json file, and needs --data_dir: the folder its image paths "
                "are relative to (e.g. --chat_json llava_v1_5_mix665k.json --data_dir playground/data)")
        if self.data_dir and not Path(self.data_dir).expanduser().is_dir():
            bad("data_dir", "does not exist; point it at a folder holding chat.json and images.zip, "
                "or leave it empty to download the data set")
        return self

    def sharded(self, world):
        """Whether a run of `world` processes shards the LM (training/sharding.py): the full phase's does; the
        other phases' train only small weights and run data parallel."""
        return world > 1 and self.phase == "full"

    # --- JSON: a checkpoint carries the config that trained it (the fields a preset set included) ---
    def to_dict(self):
        return dataclasses.asdict(self)

    def save(self, path):
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d):
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known) - RETIRED - TRANSFORMERS_KEYS)
        if unknown:
            warnings.warn(f"ignoring config keys this version of tinyvlm does not know: {unknown} "
                          "(the checkpoint was written by another version)")
        return cls(**{k: tuple(v) if known[k].type is tuple else v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, path):
        return cls.from_dict(json.loads(Path(path).read_text()))


PROJECTORS = ("swiglu", "mlp", "linear")  # models/projector.py builds each
# Each phase's learning rates, as the fields that hold them: (the projector's, every other trained weight's: the
# adapters in the lora phase, the LM in the full phase). The second is the one to lower when a phase diverges.
PHASE_LRS = {"projector": ("projector_lr", "projector_lr"), "lora": ("lora_projector_lr", "lora_lr"),
             "full": ("full_lr", "full_lr")}
RETIRED = {"pad_multiple"}  # fields of older versions, read without a warning (packing made pad_multiple moot)
# What an export's config.json adds for transformers (models/modeling_tinyvlm.py), read without a warning
TRANSFORMERS_KEYS = {"model_type", "architectures", "auto_map"}


# The reference recipes (README, "Beyond SigLIP + SmolLM2"), each a starting point that sets a few fields. Phase 1
# trains the projector at projector_lr, phase 2 LoRA at lora_lr; gradient checkpointing and a small per-device
# micro-batch (4,096 tokens: about 16-20 samples of 144 image tokens) let the 3-4B LMs train on one 80 GB GPU, 8 of
# them a step (about 128-160 samples, as LLaVA fine-tunes).
# LoRA goes on every linear layer of the LM (lora_targets empty), Phi-3's fused qkv_proj and gate_up_proj included.
PHI3_MINI = dict(lm_model="microsoft/Phi-3-mini-4k-instruct")
BIG_LM = dict(lora_lr=2e-4, gradient_checkpointing=True, batch_tokens=4096, grad_accum=8)
PRESETS = {
    "tinyvlm": {},  # the defaults above: SigLIP-B/16-224 + SmolLM2-135M
    # PhiClipMLLM / LLaVA-1.5: CLIP ViT-L/14-336 (24x24 patches, penultimate layer) + Phi-3-mini, LoRA on both
    "phiclip": dict(vision_model="openai/clip-vit-large-patch14-336", vision_feature_layer=-2, pixel_unshuffle=2,
                    lora_vision=True, **PHI3_MINI, **BIG_LM),
    # Prismatic SigLIP-Phi2: SigLIP-so400m/14-384 (27x27 patches) + Phi-2, letterboxed images
    "prismatic-siglip-phi2": dict(vision_model="google/siglip-so400m-patch14-384", vision_feature_layer=-2,
                                  pixel_unshuffle=3, image_fit="letterbox", lm_model="microsoft/phi-2", **BIG_LM),
    # Prismatic's fused DINOv2 + SigLIP at 224 px (16x16 patches each) + Phi-3-mini. SigLIP comes first because its
    # processor makes the pixels: a plain resize to 224, where DINOv2's would resize to 256 and crop.
    "prismatic-dinosiglip-phi3": dict(vision_model="google/siglip-so400m-patch14-224",
                                      fused_vision_model="facebook/dinov2-with-registers-large",
                                      vision_feature_layer=-2, pixel_unshuffle=2, image_fit="letterbox",
                                      **PHI3_MINI, **BIG_LM),
}


# --- command line: one flag per field, generated from the dataclass (no torch import: --help is instant) ---
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a ConfigError, like every other config mistake, instead of exit(2)
        raise ConfigError(message)


def parse_bool(text):
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expects a boolean (true/false/1/0/yes/no), got {text!r}")


def _field_comments():
    """{field: its one-line comment} and {field: its section}, read from this file's source: the comments
    next to the defaults above are the documentation, so --help shows exactly them."""
    comments, sections, section = {}, {}, "options"
    for line in Path(__file__).read_text().splitlines():
        if m := re.match(r"    # --- (.+?) ---", line):
            section = m.group(1)
        elif m := re.match(r"    (\w+): \w+ = .*?(?:  # (.*))?$", line):
            comments[m.group(1)], sections[m.group(1)] = m.group(2) or "", section
    return comments, sections


def build_parser(base, prog=None, description=None):
    """An argparse parser with one --flag per field; defaults (and --help) come from `base`."""
    parser = _Parser(prog=prog, description=description, allow_abbrev=False)
    comments, sections = _field_comments()
    groups = {}
    for f in fields(VLMConfig):
        section = sections[f.name]
        if section not in groups:
            groups[section] = parser.add_argument_group(section)
        default = getattr(base, f.name)
        kw = dict(default=argparse.SUPPRESS, help=f"{comments.get(f.name, '')} (default: "
                  f"{','.join(default) if f.type is tuple else default!r})".lstrip())
        if f.type is bool:  # `--compile` alone means true
            kw.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        elif f.name == "preset":
            kw.update(choices=list(PRESETS))
        elif f.type is tuple:
            kw.update(type=lambda text: tuple(s for s in text.split(",") if s), metavar="A,B,...")
        else:
            kw.update(type=f.type, metavar=f.type.__name__.upper())
        groups[section].add_argument(f"--{f.name}", **kw)
    return parser


def parse_overrides(argv, cfg=None, prog=None, description=None):
    """Apply `--field value` / `--field=value` flags to a config (VLMConfig() by default). `--out-dir` spells
    `--out_dir`; an unknown flag names the closest fields; `-h`/`--help` lists them all and exits."""
    cfg = with_preset(argv, cfg or VLMConfig())
    parser = build_parser(cfg, prog, description)
    given, unknown = parser.parse_known_args([_underscored(a) for a in argv])
    if unknown:
        raise ConfigError(_unknown_message(unknown[0]))
    return dataclasses.replace(cfg, **vars(given))


def with_preset(argv, cfg):
    """`cfg` with the fields of the preset that argv names (if any) laid over it. Read before the other flags, so
    they override it wherever they stand, and --help shows the preset's values as the defaults."""
    first = _Parser(add_help=False, allow_abbrev=False)
    first.add_argument("--preset", choices=list(PRESETS))
    name = first.parse_known_args([_underscored(a) for a in argv])[0].preset
    return dataclasses.replace(cfg, preset=name, **PRESETS[name]) if name else cfg


def parse_or_exit(argv, base=None, prog=None, description=None):
    """parse_overrides for a script's command line: a mistake exits with its message, not a traceback."""
    try:
        return parse_overrides(argv, base, prog, description)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def _underscored(arg):
    """--out-dir=a-b -> --out_dir=a-b: the flag's name takes either spelling, its value is left alone."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def _unknown_message(arg):
    if not arg.startswith("--"):
        return f"unexpected argument {arg!r}; flags look like --lora_lr 1e-3"
    name = arg[2:].split("=", 1)[0]
    close = closest_flags(name, [f.name for f in fields(VLMConfig)])
    hint = f"; did you mean {', '.join(close)}?" if close else "; see --help for every field"
    return f"unknown config field --{name}{hint}"


def closest_flags(name, names):
    """The flags (--name) among `names` (without dashes) that a mistyped `name` most likely meant."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    close += [n for n in names if n not in close and name in n.split("_")]  # --lr: projector_lr, lora_lr
    return ["--" + n for n in close]


class FlagParser(argparse.ArgumentParser):
    """The parser of a script's own flags (generate.py, eval.py, app.py, ...): an unknown flag names the closest
    ones, as main.py's do, and is said before any other mistake (a mistyped required flag, --chekpoint, would
    otherwise read as a missing --checkpoint)."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        flags = [option[2:] for action in self._actions for option in action.option_strings if option[:2] == "--"]
        for arg in args[:args.index("--")] if "--" in args else args:
            name = arg[2:].split("=", 1)[0]
            abbreviates = self.allow_abbrev and any(f.startswith(name) for f in flags)  # --check: --checkpoint
            if arg[:2] == "--" and name not in flags and not abbreviates:
                close = closest_flags(name, flags)
                self.error(f"unknown flag --{name}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        return super().parse_known_args(args, namespace)
