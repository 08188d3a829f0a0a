"""Make an lmms-eval task of your own LLaVA-format data (a chat.json and its images), so that tools/lmms.py scores a
checkpoint on it as on the standard tasks, offline:

    uv run python -m tools.lmms_task --data_dir data/my_set --out tasks/my_set --limit 500
    uv run python -m tools.lmms --checkpoint CKPT --include_path tasks/my_set --tasks my_set

Each record with an image becomes one item: its first user turn is the question (the <image> marker dropped:
lmms-eval hands the image over apart), its first reply the answer, scored by exact match after generate_until.
The folder holds the items as a `datasets` folder (images inside), utils.py and <name>.yaml; the task is named after
the folder. An existing folder is never overwritten.
"""
import json
import sys
import textwrap
from pathlib import Path

from models.config import FlagParser

UTILS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]
'''
TASK = """
    task: {name}
    dataset_path: {data}
    dataset_kwargs:
      load_from_disk: true
    test_split: test
    output_type: generate_until
    doc_to_visual: !function utils.doc_to_visual
    doc_to_text: "{{{{question}}}}"
    doc_to_target: answer
    generation_kwargs:
      max_new_tokens: {max_new_tokens}
    metric_list:
      - metric: exact_match
        aggregation: mean
        higher_is_better: true
"""


def items(data_dir, limit):
    """(question, answer, image name) of the first `limit` records (0: all) that name an image, with a user turn
    and a reply."""
    records = json.loads((Path(data_dir) / "chat.json").read_text())
    found = []
    for r in records:
        turns = r.get("conversations") or []
        if r.get("image") and len(turns) >= 2:
            question = " ".join(turns[0]["value"].replace("<image>", " ").split())
            found.append((question, turns[1]["value"].strip(), r["image"]))
        if limit and len(found) == limit:
            break
    return found


def write_task(data_dir, out, limit=0, max_new_tokens=32):
    """The task folder `out` (see the opening); returns the task's name and its number of items."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: a task folder is never overwritten; name another --out")
    import datasets  # (after the check: seconds to import)
    from data.llava import ImageStore, decode_image

    store, rows = ImageStore(data_dir), items(data_dir, limit)
    data = datasets.Dataset.from_dict({"question": [q for q, _, _ in rows], "answer": [a for _, a, _ in rows],
                                       "image": [decode_image(store.read(name)) for _, _, name in rows]})
    out.mkdir(parents=True)
    datasets.DatasetDict(test=data).save_to_disk(str(out / "data"))
    (out / "utils.py").write_text(UTILS)
    (out / f"{out.name}.yaml").write_text(textwrap.dedent(TASK).format(
        name=out.name, data=(out / "data").resolve(), max_new_tokens=max_new_tokens))
    return out.name, len(rows)


def main(argv):
    p = FlagParser(description="Write an lmms-eval task over a LLaVA-format data folder (chat.json + images).")
    p.add_argument("--data_dir", required=True, help="a folder with chat.json and images.zip (or images/)")
    p.add_argument("--out", required=True, help="the task folder to write; the task is named after it")
    p.add_argument("--limit", type=int, default=0, help="the first N records with an image; 0 = all")
    p.add_argument("--max_new_tokens", type=int, default=32)
    args = p.parse_args(argv)
    if not (Path(args.data_dir) / "chat.json").is_file():
        p.error(f"no chat.json in {args.data_dir}")
    try:
        name, n = write_task(args.data_dir, args.out, args.limit, args.max_new_tokens)
    except FileExistsError as e:
        p.error(str(e))
    print(f"task {name}: {n} items in {args.out}; score it with: python -m tools.lmms --checkpoint CKPT "
          f"--include_path {args.out} --tasks {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
