"""tools/sweep.py's runs, once its flags are checked (its opening says what the sweep scores): the data and backbones
made once, phase 1 trained once, phase 2 per setting, each scored on the held-out split."""
import dataclasses
import json
import sys
from pathlib import Path

from data.loading import build_data
from data.shapes import make_shapes_dataset
from models.config import VLMConfig
from models.smollm2 import smollm2_dir
from models.tiny import build_backbones
from models.vision import n_image_tokens
from training.loop import train
from training.report import printable, sample_captions


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


def held_out(result, cfg):
    """Exact-caption accuracy (greedy) and loss on the held-out split, for the model train returned."""
    model = result["model"]
    _, val_loader = build_data(cfg, model, 0, 1)
    rows, _ = sample_captions(model, val_loader.dataset, len(val_loader.dataset), next(model.parameters()).device)
    return {"accuracy": sum(r.prediction == r.reference for r in rows) / max(len(rows), 1),
            "val_loss": result["val_loss"], "examples": [[printable(r.prediction), r.reference] for r in rows[:3]]}


def sweep(args, grid, key):
    """Trains phase 1 once and phase 2 per setting of `grid` (dicts of VLMConfig fields, and a name); returns the rows
    of out_dir/results.json. args: tools/sweep.py's flags; key: those every setting shares, which results.json keeps."""
    out = Path(args.out_dir)
    path = out / "results.json"
    saved = json.loads(path.read_text()) if path.exists() else {"args": key, "rows": []}
    if saved["args"] != key:  # its data, phase 1 and rows would not compare with this sweep's
        sys.exit(f"{path} holds a sweep with other arguments ({saved['args']}); use another --out_dir")
    base = prepare(args)
    done = {r["name"] for r in saved["rows"]}
    phase1 = dataclasses.replace(base, phase="projector", out_dir=str(out / "projector"))
    result = train(phase1)  # resumes, or returns at once, where an earlier sweep trained it
    if "phase 1 only" not in done:
        saved["rows"].append({"name": "phase 1 only", "phases": "1", **held_out(result, phase1)})
    for s in grid:
        if s["name"] in done:
            continue
        cfg = dataclasses.replace(base, phase="lora", init_from=phase1.out_dir, out_dir=str(out / s["name"]),
                                  **{k: v for k, v in s.items() if k != "name"})  # one cut short resumes
        saved["rows"].append({**s, "phases": "1+2", **held_out(train(cfg), cfg)})
        path.write_text(json.dumps(saved, indent=2) + "\n")  # after each setting: a sweep cut short keeps them
    path.write_text(json.dumps(saved, indent=2) + "\n")
    return saved["rows"]
