"""Scoring a checkpoint on lmms-eval tasks, as tools/lmms.py does once its flags are checked (its opening says how
the model is asked): tinyvlm as an lmms-eval model (TinyVLM), and each task's scores and answers written once."""
import difflib
import functools
import json
import sys
import time

import torch
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager
from lmms_eval.utils import handle_non_serializable

from models.config import ConfigError
from models.hub import HubError
from models.prompt import IGNORE, IMAGE_TOKEN, encode
from models.vision import image_pixels
from models.vlm import autocast
from training import checkpoint
from training.distributed import pick_device


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
            with autocast(self.device):
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


def results_line(results):
    """'pope pope_accuracy 0.8523, ...': each (sub)task's numbers, without stderrs and lmms-eval's ',none' filter."""
    return ", ".join(f"{name} {metric.removesuffix(',none')} {value:.4f}" for name, scores in results.items()
                     for metric, value in scores.items()
                     if isinstance(value, (int, float)) and "stderr" not in metric)


def score_tasks(args):
    """tools/lmms.py's work, its flags (args) checked: each task scored, its file written; returns {task: results}."""
    try:
        path = checkpoint.resolve(args.checkpoint)
        taken = [str(result_path(path, t, args.limit)) for t in args.tasks if result_path(path, t, args.limit).exists()]
        if taken:
            raise ConfigError(f"{', '.join(taken)} exist(s): results are never overwritten; move them away to score "
                              "those tasks again")
        manager = TaskManager("WARNING", include_path=args.include_path)
        check_tasks(args.tasks, manager)
        model = TinyVLM(checkpoint.load_model(path).place(pick_device(args.device)), args.batch_size)
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
        print(f"{task}: {results_line(out['results'])} ({n} items, {model.seconds:.1f} s answering; {target})",
              flush=True)
    return scores
