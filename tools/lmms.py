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
import difflib
import functools
import importlib.util
import json
import sys
import time
from pathlib import Path

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


if __name__ == "__main__":  # bad arguments answer now, before the slow imports below (lmms-eval's take ~30 s)
    parse_args(sys.argv[1:])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lmms_eval.api.instance import GenerationResult  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402
from lmms_eval.utils import handle_non_serializable  # noqa: E402

from models.config import ConfigError  # noqa: E402
from models.hub import HubError  # noqa: E402
from models.prompt import IGNORE, IMAGE_TOKEN, encode  # noqa: E402
from models.vision import image_pixels  # noqa: E402
from training import checkpoint  # noqa: E402


def timed(method):
    """Add the time a request method takes to self.seconds: the model's share of a task (no download, no scoring)."""
    @functools.wraps(method)
    def run(self, requests):
        start = time.perf_counter()
        try:
            return method(self, requests)
        finally:
            self.seconds += time.perf_counter() - start
    return run


class TinyVLM(lmms):
    """lmms-eval's model API over a loaded VLM (placed on its device). Requests carry the question's text, the
    function that reads the item's images, and where the item is (task, split, index) in self.task_dict."""

    def __init__(self, model, batch_size=16):
        super().__init__()
        self.model, self.batch_size = model.eval(), batch_size
        self.device = next(model.projector.parameters()).device
        self.seconds = 0.0  # spent answering (timed)

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _encode(self, context, images, reply=None):
        """(input_ids, labels) of the question as a user turn (its image in place, if it has one), then the assistant
        header, or with `reply` the assistant's reply: the training format, so the model is asked as it learned."""
        if len(images) > 1:
            raise ValueError(f"tinyvlm answers about one image at a time; this task gives {len(images)} to a question, "
                             "so score tasks of one image per item")
        if images and IMAGE_TOKEN not in context:
            context = f"{IMAGE_TOKEN}\n{context}"
        messages = [{"role": "user", "content": context}]
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
        return encode(self.model.tokenizer, messages, self.model.n_image_tokens, generation_prompt=reply is None,
                      has_image=bool(images))

    def _pixels(self, images):
        images = [image.convert("RGB") for image in images]
        if not images:  # a batch of text-only questions
            return torch.zeros((0, *self.model.vision.pixel_shape), dtype=torch.uint8, device=self.device)
        return image_pixels(self.model.processor, images, self.model.cfg.image_fit).to(self.device)

    def _batches(self, requests, key=lambda args: None):
        """Chunks of batch_size requests that share `key` (generation settings), as (indices, args)."""
        groups = {}
        for i, r in enumerate(requests):
            groups.setdefault(key(r.args), []).append(i)
        for indices in groups.values():
            for at in range(0, len(indices), self.batch_size):
                chunk = indices[at:at + self.batch_size]
                yield chunk, [requests[i].args for i in chunk]

    @timed
    def generate_until(self, requests):
        """Each question's answer, decoded with its task's settings (greedy unless it sets a temperature) in batches
        that share them, cut at the task's first stop string."""
        def settings(args):
            kw = args[1]
            return kw.get("max_new_tokens", 32), kw.get("temperature", 0) or 0, kw.get("top_p", 1.0) or 1.0

        answers = [None] * len(requests)
        for chunk, batch in self._batches(requests, settings):
            ids, images = [], []
            for context, _, doc_to_visual, doc_id, task, split in batch:
                visuals = doc_to_visual(self._doc(task, split, doc_id))
                ids.append(self._encode(context, visuals)[0])
                images += visuals
            max_new_tokens, temperature, top_p = settings(batch[0])
            texts = self.model.generate_from_ids(ids, self._pixels(images), max_new_tokens, temperature, top_p)
            for i, args, text in zip(chunk, batch, texts):
                until = args[1].get("until") or []
                for stop in filter(None, [until] if isinstance(until, str) else until):
                    text = text.split(stop)[0]
                answers[i] = text
        return answers

    @timed
    @torch.no_grad()
    def loglikelihood(self, requests):
        """(log p(continuation | context), whether greedy decoding gives it) per request: the continuation is the
        assistant's reply (the harness's leading space, a word boundary for plain LMs, is no part of a chat reply), its
        end-of-turn token left out: an option's score is that of its words. One forward over each batch of prompt +
        reply rows, right-padded (causal: a row never sees its padding). Each pair is wrapped in a GenerationResult:
        lmms-eval 0.7.3's evaluator turns any other tuple into its str(), which multiple-choice scoring cannot read."""
        results = [None] * len(requests)
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda")
        for chunk, batch in self._batches(requests):
            rows, images = [], []
            for context, continuation, doc_to_visual, doc_id, task, split in batch:
                doc = self._doc(task, split, doc_id)
                reply = continuation if isinstance(continuation, str) else continuation(doc)
                visuals = doc_to_visual(doc)
                rows.append(self._encode(context, visuals, reply=str(reply).lstrip()))
                images += visuals
            T = max(len(ids) for ids, _ in rows)
            ids = torch.full((len(rows), T), self.model.tokenizer.pad_token_id, dtype=torch.long)
            for r, (row, _) in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
            with autocast:
                logprobs = self.model(ids.to(self.device), self._pixels(images)).logits.float().log_softmax(-1)
            for r, (i, (_, labels)) in enumerate(zip(chunk, rows)):
                at = torch.tensor([t for t, label in enumerate(labels) if label != IGNORE][:-1])  # the reply's tokens
                targets = ids[r, at].to(self.device)
                predicted = logprobs[r, at - 1]  # position t - 1 predicts token t
                results[i] = GenerationResult((predicted.gather(-1, targets[:, None]).sum().item(),
                                               bool((predicted.argmax(-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("tinyvlm answers single-round tasks only")


def result_path(path, task, limit):
    return path / "lmms_eval" / (f"{task}-first{limit}.json" if limit else f"{task}.json")


def check_tasks(tasks, manager):
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        close = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        raise ConfigError("unknown lmms-eval task(s): " + "; ".join(f"{t} (closest: {', '.join(c) or 'none'})"
                                                                     for t, c in close.items()))


def score_line(results):
    """'pope pope_accuracy 0.8523, ...': each (sub)task's numbers, without stderrs and lmms-eval's ',none' filter."""
    return ", ".join(f"{name} {metric.removesuffix(',none')} {value:.4f}" for name, scores in results.items()
                     for metric, value in scores.items()
                     if isinstance(value, (int, float)) and "stderr" not in metric)


def main(argv):
    args = parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    try:
        path = checkpoint.resolve(args.checkpoint)
        taken = [str(result_path(path, t, args.limit)) for t in args.tasks if result_path(path, t, args.limit).exists()]
        if taken:
            raise ConfigError(f"{', '.join(taken)} exist(s): results are never overwritten; move them away to score "
                              "those tasks again")
        manager = TaskManager("WARNING", include_path=args.include_path)
        check_tasks(args.tasks, manager)
        model = TinyVLM(checkpoint.load_model(path).place(torch.device("cuda" if cuda else "cpu")), args.batch_size)
    except (ConfigError, HubError) as e:
        sys.exit(f"error: {e}")
    scores = {}
    for task in args.tasks:  # one file each, written as soon as its task is done
        model.seconds = 0.0
        # bootstrap_iters=0: a bootstrapped stderr takes minutes on 1,500 items; the CLT stderr is still reported
        out = simple_evaluate(model=model, tasks=[task], limit=args.limit or None, task_manager=manager,
                              bootstrap_iters=0, log_samples=True)
        n = sum(c["effective"] for c in out["n-samples"].values())
        record = {"checkpoint": str(path), "task": task, "limit": args.limit, "device": str(model.device),
                  "model_seconds": round(model.seconds, 2), "seconds_per_item": round(model.seconds / max(n, 1), 4),
                  **out}
        target = result_path(path, task, args.limit)
        target.parent.mkdir(exist_ok=True)
        with open(target, "x") as f:  # "x": fails rather than overwrite one written meanwhile
            json.dump(record, f, indent=1, default=handle_non_serializable)
        scores[task] = out["results"]
        print(f"{task}: {score_line(out['results'])} ({n} items, {model.seconds:.1f} s answering; {target})",
              flush=True)
    return scores


if __name__ == "__main__":
    main(sys.argv[1:])
