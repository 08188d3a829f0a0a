"""A synthetic captioning data set in LLaVA format: coloured shapes, captions naming colour, shape, place.

Written exactly like LLaVA-CC3M (chat.json + images.zip of JPEGs), so the demo and the tests run
the real data path.
"""
import io
import json
import random
import re
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
          "yellow": (235, 215, 40), "purple": (140, 50, 170), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
          "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}
INSTRUCTIONS = ("Provide a brief description of the given image.", "Describe the image concisely.",
                "What is in this picture?", "Give a short caption for the image.")


def draw(color, shape, place, size=64, shift=(0.0, 0.0), scale=1.0):
    """shift (a fraction of the image) and scale move and resize the shape from its place's spot."""
    img = Image.new("RGB", (size, size), (30, 30, 30))
    cx, cy = ((c + s) * size for c, s in zip(PLACES[place], shift))
    r = size * 0.18 * scale
    box = (cx - r, cy - r, cx + r, cy + r)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[color])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return img


def caption(color, shape, place):
    return f"a {color} {shape} at the {place} ."


def record(i, color, shape, place, rng):
    instruction = rng.choice(INSTRUCTIONS)
    user = f"<image>\n{instruction}" if rng.random() < 0.5 else f"{instruction}\n<image>"
    return {"id": f"shape_{i:06d}", "image": f"shape_{i:06d}.jpg",
            "conversations": [{"from": "human", "value": user},
                              {"from": "gpt", "value": caption(color, shape, place)}]}


def make_shapes_dataset(out_dir, n=2000, seed=0, size=64, jitter=0.0):
    """Write out_dir/chat.json and out_dir/images.zip; returns the texts (for training a tokenizer).

    jitter > 0 moves each shape by up to that fraction of the image and scales it by up to 1 +- 2 * jitter: with
    it no two images are alike, so a held-out split tests recognition, not recall. Up to ~0.1, each place keeps
    a region of its own."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    with zipfile.ZipFile(out_dir / "images.zip", "w") as zf:
        for i in range(n):
            color, shape, place = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(PLACES))
            moved = {"shift": (rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)),
                     "scale": rng.uniform(1 - 2 * jitter, 1 + 2 * jitter)} if jitter else {}
            buf = io.BytesIO()
            draw(color, shape, place, size, **moved).save(buf, format="JPEG", quality=90)
            zf.writestr(f"shape_{i:06d}.jpg", buf.getvalue())
            records.append(record(i, color, shape, place, rng))
    (out_dir / "chat.json").write_text(json.dumps(records))
    return corpus()


def corpus():
    """Every word the data set (and its instruction set) can say, for the demo tokenizer."""
    captions = [caption(c, s, p) for c in COLORS for s in SHAPES for p in PLACES]
    questions = [q for q, _ in QUESTIONS.values()] + [f"Is the shape {c}?" for c in COLORS] + ["yes", "no", "1"]
    return captions + list(INSTRUCTIONS) + questions + [q + " " + a for q, a in TEXT_ONLY] + ["<image>"]


# --- an instruction set over the same images: short answers, as VQA data has them (demo.py --instruct) ---
QUESTIONS = {"colour": ("What colour is the shape?", lambda c, s, p: c),
             "shape": ("What shape is it?", lambda c, s, p: s),
             "place": ("Where is the shape?", lambda c, s, p: p),
             "count": ("How many shapes are there?", lambda c, s, p: "1")}
TEXT_ONLY = [("What colour is a ripe banana?", "yellow"), ("What colour is grass?", "green"),
             ("What colour is the clear sky?", "blue"), ("What colour is snow?", "white"),
             ("What colour is a ripe tomato?", "red"), ("What colour is a plum?", "purple")]
CAPTION = re.compile(r"a (\w+) (\w+) at the (.+) \.")


def question_turns(color, shape, place, rng):
    """One or two question/answer pairs about a picture: colour, shape, place, count, or a yes/no question."""
    def one():
        kind = rng.choice([*QUESTIONS, "yes_no"])
        if kind == "yes_no":
            asked = color if rng.random() < 0.5 else rng.choice([c for c in COLORS if c != color])
            return f"Is the shape {asked}?", "yes" if asked == color else "no"
        question, answer = QUESTIONS[kind]
        return question, answer(color, shape, place)
    return [one() for _ in range(2 if rng.random() < 0.3 else 1)]


def make_shapes_instruct(data_dir, seed=1):
    """data_dir/instruct.json: an instruction record per image of data_dir/chat.json (its caption says what the
    picture holds), 30% of them multi-turn, and 5% text-only records; returns its path."""
    rng = random.Random(seed)
    records = []
    for r in json.loads((Path(data_dir) / "chat.json").read_text()):
        color, shape, place = CAPTION.fullmatch(r["conversations"][1]["value"]).groups()
        turns = question_turns(color, shape, place, rng)
        if rng.random() < 0.05:
            turns, image = [rng.choice(TEXT_ONLY)], None
        else:
            turns[0], image = (f"<image>\n{turns[0][0]}", turns[0][1]), r["image"]
        convo = [t for q, a in turns for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        records.append({"id": r["id"], **({"image": image} if image else {}), "conversations": convo})
    path = Path(data_dir) / "instruct.json"
    path.write_text(json.dumps(records))
    return path
