"""tools/lmms.py: a checkpoint scored on lmms-eval tasks, offline: two local tasks over a few images (yes/no
answers by exact match through generate_until, two options through loglikelihood), results next to the checkpoint,
never overwritten. Skipped without the bench extra (uv sync --extra bench)."""
import json
import textwrap
from types import SimpleNamespace

import datasets
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from models.prompt import IGNORE
from models.vision import image_pixels
from models.vlm import VLM
from tools import lmms, lmms_task
from data.llava import ImageStore, decode_image
from training import checkpoint

pytest.importorskip("lmms_eval")
from training.lmms import TinyVLM  # noqa: E402 (it imports lmms-eval)

TASKS = {
    "tiny_yesno": """
        output_type: generate_until
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 4
          until: ["\\n"]
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """,
    "tiny_choice": """
        output_type: multiple_choice
        doc_to_choice: ["yes", "no"]
        doc_to_target: "{{label}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """,
}


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    """A folder of lmms-eval task YAMLs over 6 images saved as a local datasets folder."""
    root = tmp_path_factory.mktemp("lmms_tasks")
    images = [root / f"{i}.png" for i in range(6)]
    for i, file in enumerate(images):
        Image.new("RGB", (48, 40), (40 * i, 200 - 30 * i, 90)).save(file)
    rows = {"image": [str(p) for p in images], "question": ["Is there a circle in the image?"] * len(images),
            "answer": ["yes", "no"] * (len(images) // 2), "label": [0, 1] * (len(images) // 2)}
    data = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict(test=data).save_to_disk(str(root / "data"))
    (root / "utils.py").write_text(lmms_task.UTILS)
    for task, body in TASKS.items():
        head = f"""
            dataset_path: {root / "data"}
            dataset_kwargs:
              load_from_disk: true
            task: {task}
            test_split: test
            doc_to_visual: !function utils.doc_to_visual
            doc_to_text: "{{{{question}}}}"
            """
        (root / f"{task}.yaml").write_text(textwrap.dedent(head) + textwrap.dedent(body))
    return root


@pytest.fixture(scope="module")
def tiny_model(tiny_assets, tmp_path_factory):
    return VLM.from_config(tiny_config(tiny_assets, tmp_path_factory.mktemp("run"))).eval()


def requests(*args):
    return [SimpleNamespace(args=a) for a in args]


def test_loglikelihood_is_the_training_loss_of_the_reply(tiny_model):
    """An option's log-likelihood is minus training's summed loss over the reply (its end-of-turn token left out),
    whatever the other rows of its batch."""
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    docs = {"t": {"test": [{"image": image}]}}
    model = TinyVLM(tiny_model, batch_size=3)
    model.task_dict = docs
    see = lambda doc: [doc["image"]]  # noqa: E731
    asked = [("Is it red?", " yes"), ("What colour is the shape in this picture?", " a dark red"), ("Red?", " no")]
    got = model.loglikelihood(requests(*[(q, a, see, 0, "t", "test") for q, a in asked]))
    for (question, answer), (logprob, greedy) in zip(asked, (r.text for r in got)):
        ids, labels = model._encode(question, [image], reply=answer.strip())
        labels[max(i for i, label in enumerate(labels) if label != IGNORE)] = IGNORE  # the end-of-turn token
        pixels = image_pixels(tiny_model.processor, [image])
        with torch.no_grad():
            loss = tiny_model(torch.tensor([ids]), pixels, labels=torch.tensor([labels])).loss_sum
        assert logprob == pytest.approx(-loss.item(), abs=1e-4)
        assert isinstance(greedy, bool)


def test_generate_until_answers_as_generate_does(tiny_model):
    image = Image.new("RGB", (32, 32), (30, 30, 200))
    model = TinyVLM(tiny_model, batch_size=2)
    model.task_dict = {"t": {"test": [{"image": image}]}}
    see = lambda doc: [doc["image"]]  # noqa: E731
    kw = {"max_new_tokens": 6}
    got = model.generate_until(requests(("Is it blue?", kw, see, 0, "t", "test"), ("Colour?", kw, see, 0, "t", "test"),
                                        ("Shape?", kw, see, 0, "t", "test")))
    pixels = image_pixels(tiny_model.processor, [image])
    assert got == [tiny_model.generate(pixels, q, max_new_tokens=6)[0] for q in ("Is it blue?", "Colour?", "Shape?")]


@pytest.mark.slow
def test_tasks_score_into_the_checkpoint_and_never_overwrite(tiny_model, tiny_tasks, tmp_path):
    path = tmp_path / "ckpt"
    checkpoint.save_model(tiny_model, path)
    run = ["--checkpoint", str(path), "--include_path", str(tiny_tasks), "--device", "cpu", "--batch_size", "4"]
    read = lambda name: json.loads((path / "lmms_eval" / name).read_text())  # noqa: E731
    scores = lmms.main(run + ["--tasks", "tiny_yesno"])
    written = read("tiny_yesno.json")
    score = written["results"]["tiny_yesno"]["exact_match,none"]
    assert 0 <= score <= 1 and scores["tiny_yesno"]["tiny_yesno"]["exact_match,none"] == score
    assert written["n-samples"]["tiny_yesno"]["effective"] == 6 and len(written["samples"]["tiny_yesno"]) == 6
    assert written["model_seconds"] > 0
    print(f"per item on {written['device']}: {written['seconds_per_item']} s")

    lmms.main(run + ["--tasks", "tiny_choice"])  # another task: its own file, the first one untouched
    assert 0 <= read("tiny_choice.json")["results"]["tiny_choice"]["acc,none"] <= 1
    assert read("tiny_yesno.json") == written

    with pytest.raises(SystemExit, match="never overwritten"):  # the same task again: refused before the model loads
        lmms.main(run + ["--tasks", "tiny_choice,tiny_yesno"])
    assert read("tiny_yesno.json") == written
    lmms.main(run + ["--tasks", "tiny_yesno", "--limit", "2"])  # a quick look goes elsewhere
    assert read("tiny_yesno-first2.json")["n-samples"]["tiny_yesno"]["effective"] == 2


def test_unknown_task_names_the_closest(tiny_model, tiny_tasks, tmp_path):
    path = tmp_path / "ckpt"
    checkpoint.save_model(tiny_model, path)
    with pytest.raises(SystemExit, match="tiny_yesno"):
        lmms.main(["--checkpoint", str(path), "--include_path", str(tiny_tasks), "--tasks", "tiny_yesn"])


def test_a_task_of_your_own_data_scores_each_record_as_its_caption(tiny_assets, tiny_model, tmp_path):
    """tools/lmms_task.py: 5 records of a LLaVA-format folder become an lmms-eval task; tools/lmms.py answers each
    with the record's own question and image, and scores against its reply. The folder is never overwritten."""
    name, n = lmms_task.write_task(tiny_assets.data_dir, tmp_path / "shapes", limit=5, max_new_tokens=8)
    assert (name, n) == ("shapes", 5)
    with pytest.raises(FileExistsError):
        lmms_task.write_task(tiny_assets.data_dir, tmp_path / "shapes")
    path = tmp_path / "ckpt"
    checkpoint.save_model(tiny_model, path)
    lmms.main(["--checkpoint", str(path), "--include_path", str(tmp_path / "shapes"), "--tasks", "shapes",
               "--device", "cpu", "--batch_size", "2"])
    samples = json.loads((path / "lmms_eval" / "shapes.json").read_text())["samples"]["shapes"]
    question, answer, image = lmms_task.items(tiny_assets.data_dir, 5)[0]
    first = samples[0]
    assert len(samples) == 5 and first["target"] == answer and "<image>" not in question
    pixels = image_pixels(tiny_model.processor, [decode_image(ImageStore(tiny_assets.data_dir).read(image))])
    assert first["filtered_resps"][0] == tiny_model.generate(pixels, question, max_new_tokens=8)[0]
