"""Choose the phase defaults on held-out data, with the real SmolLM2-135M-Instruct weights (offline: models/smollm2.py).

    uv run python -m tools.sweep                              # GPU: the default grid (12 settings), minutes each
    uv run python -m tools.sweep --lora_lr 1e-3,3e-3 --lora_vision false   # any grid axis as a comma-separated list
    uv run python -m tools.sweep --quick                      # CPU smoke test: one setting, a few steps

The task: shapes captions (data/shapes.py) with the shapes moved and resized at random, so the seeded held-out
split (`--val_size` records, never trained on) holds images the model has not seen. The vision tower is a tiny
random SigLIP (the real one needs the hub), frozen unless `lora_vision`. Phase 1 (projector) trains once, since
no axis of the grid changes it; then phase 2 (LoRA + projector) trains from it for
each setting. The phase-2 projector learns at VLMConfig's lora_projector_lr. lora_alpha is 2 * lora_r; warmup_frac applies to phase 2. Reported per setting: exact-caption
accuracy on the held-out split (greedy decoding vs the reference) and the held-out loss, as a markdown table
and as out_dir/results.json. Rerunning the same command skips the settings already in results.json, so a
sweep cut short (a job time limit) goes on where it stopped; any grid flags may differ between the runs.
"""
import sys

from models.config import FlagParser, parse_bool

GRID = {"lora_lr": [2e-4, 1e-3, 3e-3], "lora_r": [16], "lora_dropout": [0.0, 0.05], "warmup_frac": [0.03],
        "lora_vision": [False, True]}
TYPES = {"lora_lr": float, "lora_r": int, "lora_dropout": float, "warmup_frac": float, "lora_vision": parse_bool}


def parse_args(argv):
    parser = FlagParser(prog="python -m tools.sweep", description=__doc__.splitlines()[0])
    for axis, values in GRID.items():
        parser.add_argument(f"--{axis}", type=lambda text, t=TYPES[axis]: [t(v) for v in text.split(",")],
                            help=f"comma-separated values (default: {','.join(map(str, values))})")
    parser.add_argument("--out_dir", default="checkpoints/sweep")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per phase")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--records", type=int, default=6000, help="size of the data set, held-out split included")
    parser.add_argument("--val_size", type=int, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true",
                        help="CPU, 200 records, 4 steps a phase; axes not given take their first value only")
    parser.add_argument("--tiny_lm", action="store_true", help="a tiny random LM instead of SmolLM2 (tests)")
    args = parser.parse_args(argv)
    for axis, values in GRID.items():
        if getattr(args, axis) is None:
            setattr(args, axis, values[:1] if args.quick else values)
    if args.quick:
        vars(args).update(device="cpu", steps=4, batch_size=8, records=200, val_size=16)
    return args


if __name__ == "__main__":  # --help and typos answer now, before the slow imports below
    ARGS = parse_args(sys.argv[1:])

import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from training import loop  # noqa: E402
from data.loading import build_data  # noqa: E402
from data.shapes import make_shapes_dataset  # noqa: E402
from models.config import VLMConfig  # noqa: E402
from models.smollm2 import smollm2_dir  # noqa: E402
from models.tiny import build_backbones  # noqa: E402
from models.vision import n_image_tokens  # noqa: E402
from training.report import printable, sample_captions  # noqa: E402


def prepare(args):
    """The data set, a tiny random vision tower and the LM, under out_dir/assets (made once); the base config."""
    assets = Path(args.out_dir) / "assets"
    if not (assets / "vision" / "config.json").is_file():
        build_backbones(assets, make_shapes_dataset(assets / "data", n=args.records, jitter=0.08))
    lm = str(assets / "lm") if args.tiny_lm else smollm2_dir()
    cfg = VLMConfig(vision_model=str(assets / "vision"), lm_model=lm, data_dir=str(assets / "data"),
                    device=args.device, projector_hidden_dim=512, max_text_tokens=64, batch_size=args.batch_size,
                    grad_accum=1, max_steps=args.steps, val_size=args.val_size, num_workers=0 if args.quick else 4,
                    log_every=max(1, args.steps // 10), eval_every=10**9, eval_captions=0, save_every=10**9,
                    keep_last=1)
    # room for batch_size of the longest samples: every micro-batch holds batch_size samples
    return dataclasses.replace(cfg, batch_tokens=args.batch_size * (n_image_tokens(cfg) + cfg.max_text_tokens))


def settings(args):
    """Every combination of the grid's values, each as a dict of VLMConfig fields plus its name."""
    for values in itertools.product(*(getattr(args, axis) for axis in GRID)):
        s = dict(zip(GRID, values))
        yield {**s, "lora_alpha": 2 * s["lora_r"], "name": "_".join(f"{k}={v}" for k, v in s.items())}


def held_out(result, cfg):
    """Exact-caption accuracy (greedy) and loss on the held-out split, for the model loop.train returned."""
    model = result["model"]
    _, val_loader = build_data(cfg, model, 0, 1)
    rows, _ = sample_captions(model, val_loader.dataset, len(val_loader.dataset), next(model.parameters()).device)
    return {"accuracy": sum(r.prediction == r.reference for r in rows) / max(len(rows), 1),
            "val_loss": result["val_loss"], "examples": [[printable(r.prediction), r.reference] for r in rows[:3]]}


def sweep(args):
    """Trains phase 1 once and phase 2 per setting; returns the rows of out_dir/results.json."""
    out = Path(args.out_dir)
    path = out / "results.json"
    key = {k: v for k, v in vars(args).items() if k not in GRID and k != "out_dir"}
    saved = json.loads(path.read_text()) if path.exists() else {"args": key, "rows": []}
    if saved["args"] != key:  # its data, phase 1 and rows would not compare with this sweep's
        sys.exit(f"{path} holds a sweep with other arguments ({saved['args']}); use another --out_dir")
    base = prepare(args)
    done = {r["name"] for r in saved["rows"]}
    phase1 = dataclasses.replace(base, phase="projector", out_dir=str(out / "projector"))
    result = loop.train(phase1)  # resumes, or returns at once, where an earlier sweep trained it
    if "phase 1 only" not in done:
        saved["rows"].append({"name": "phase 1 only", "phases": "1", **held_out(result, phase1)})
    for s in settings(args):
        if s["name"] in done:
            continue
        cfg = dataclasses.replace(base, phase="lora", init_from=phase1.out_dir, out_dir=str(out / s["name"]),
                                  **{k: v for k, v in s.items() if k != "name"})  # one cut short resumes
        saved["rows"].append({**s, "phases": "1+2", **held_out(loop.train(cfg), cfg)})
        path.write_text(json.dumps(saved, indent=2) + "\n")  # after each setting: a sweep cut short keeps them
    path.write_text(json.dumps(saved, indent=2) + "\n")
    return saved["rows"]


def cell(row, col):
    value = row.get(col)
    if col == "accuracy":
        return f"{value:.1%}"
    if col == "val_loss" and value is not None:
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def table(rows):
    """A markdown table, best held-out accuracy first (then lowest held-out loss)."""
    cols = ["phases", *GRID, "accuracy", "val_loss"]
    best_first = sorted(rows, key=lambda r: (-r["accuracy"], r["val_loss"] or float("inf")))
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in best_first])


if __name__ == "__main__":
    print(table(loop.run_command(lambda: sweep(ARGS))))
