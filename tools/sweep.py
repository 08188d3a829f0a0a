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
import itertools
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


def settings(args):
    """Every combination of the grid's values, each as a dict of VLMConfig fields plus its name."""
    for values in itertools.product(*(getattr(args, axis) for axis in GRID)):
        s = dict(zip(GRID, values))
        yield {**s, "lora_alpha": 2 * s["lora_r"], "name": "_".join(f"{k}={v}" for k, v in s.items())}


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


def main(argv):
    """Runs the sweep argv asks for, prints its table and returns its rows. The flags are checked first, in a second:
    torch and the models load only after."""
    args = parse_args(argv)
    from training.loop import run_command
    from training.sweep import sweep  # the slow imports, after the flags
    key = {k: v for k, v in vars(args).items() if k not in GRID and k != "out_dir"}  # what every setting shares
    rows = run_command(lambda: sweep(args, list(settings(args)), key))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
