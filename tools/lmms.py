"""Score a checkpoint on standard benchmarks through lmms-eval (MMStar, POPE, MME, ScienceQA-img, TextVQA, ...):

    uv sync --extra bench
    uv run python -m tools.lmms --checkpoint checkpoints/instruct --tasks mmstar,pope,mme,scienceqa_img,textvqa_val

Each task's scores, config and every answer go to CHECKPOINT/lmms_eval/<task>.json (<task>-first<N>.json with
--limit N, so a quick look never stands in for the full score). A result is never overwritten: a task whose file
exists is refused before the model loads. lmms-eval downloads each task's data from the Hugging Face Hub on first use.

The model answers as it was trained: each question is the user turn of models/prompt.py's format, its image in
place. Free-form tasks decode greedily in batches (VLM.generate_from_ids); multiple-choice ones score each option's
log-likelihood as the assistant's reply (TinyVLM.loglikelihood).
"""
import importlib.util
import sys

from models.config import FlagParser


def parse_args(argv):
    p = FlagParser(description="Score a tinyvlm checkpoint on lmms-eval tasks; results into CHECKPOINT/lmms_eval/.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run's out_dir (its newest step)")
    p.add_argument("--tasks", required=True, help="lmms-eval task names, comma-separated (mmstar,pope,mme,...)")
    p.add_argument("--include_path", default=None, help="a folder of your own lmms-eval task YAMLs")
    p.add_argument("--limit", type=int, default=0, help="score the first N items of each task only; 0 = all")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    if importlib.util.find_spec("lmms_eval") is None:
        p.error("lmms-eval is not installed; install the bench extra: uv sync --extra bench")
    if args.batch_size < 1 or args.limit < 0:
        p.error("need --batch_size >= 1 and --limit >= 0")
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    return args


def main(argv):
    """Scores the checkpoint argv names on its tasks; returns {task: results}. The flags are checked first, in a
    second: lmms-eval (about 30 s to import), torch and the model load only after."""
    args = parse_args(argv)
    from training.lmms import score_tasks  # the slow imports, after the flags
    return score_tasks(args)


if __name__ == "__main__":
    main(sys.argv[1:])
