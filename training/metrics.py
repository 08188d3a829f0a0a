"""Captioning metrics: CIDEr, BLEU-4 and ROUGE-L from the COCO caption toolkit (pycocoevalcap), and exact match.

The toolkit's scorers are pure Python, but its tokenizer runs Stanford's PTBTokenizer in Java. `tokenize` does
the same job in Python: lower case, words split from punctuation and from English clitics ("don't" -> "do n't"),
then the toolkit's own punctuation filter. On ordinary captions the scores are exactly the Java-tokenized ones
(tests/test_metrics.py checks a fixture against numbers made with the toolkit's Java tokenizer), so no Java.
"""
import re

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

# Like PTBTokenizer: a clitic apart from its word, a hyphenated word or a number kept whole, any other symbol alone
TOKEN = re.compile(r"\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.]\w+)*|\.\.\.|--|\S")
DROPPED = set(PUNCTUATIONS) | {'"'}  # PTBTokenizer turns a " into `` or '', which the filter drops
# ...and brackets into -LRB- etc., which it lower-cases, so that the filter keeps them: a quirk kept for equal scores
BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def tokenize(text):
    return " ".join(BRACKETS.get(t, t) for t in TOKEN.findall(text.lower()) if t not in DROPPED)


def caption_scores(predictions, references):
    """{"cider", "bleu4", "rouge_l", "exact_match"} of predictions against one reference each (lists of str).
    exact_match is the fraction of predictions equal to their reference after tokenizing: the figure to read
    for short answers ("yes", "two", "red"), where the n-gram metrics say little."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references, at least one; got {len(predictions)} and "
                         f"{len(references)}")
    refs = {i: [tokenize(r)] for i, r in enumerate(references)}
    # An empty prediction scores zero, but the toolkit's ROUGE divides by its length: give it a word that never matches
    preds = {i: [tokenize(p) or "<empty>"] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(refs, preds, verbose=0)
    cider, _ = Cider().compute_score(refs, preds)
    rouge, _ = Rouge().compute_score(refs, preds)
    exact = sum(preds[i] == refs[i] for i in refs) / len(refs)
    return {"cider": float(cider), "bleu4": float(bleu[3]), "rouge_l": float(rouge), "exact_match": exact}


# --- short answers, scored as the VQAv2 evaluation scores them (its vqaEval.py rules, written out here) ---
# Punctuation is removed where it touches a space or in a number like 1,000, else it becomes a space; a period
# goes unless it stands between digits; then lower case, number words to digits, articles dropped, and
# contractions written without their apostrophe get it back ("dont" -> "don't"; the map is built from vqaEval.py's
# contractions, less those whose bare form is also a word: "well", "shell", ...).
VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                   "?", "!"]
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
WORDS_TOO = {"its", "id", "hell", "well", "were", "shell", "wed", "shed", "hed", "ill"}
CONTRACTIONS = {c.replace("'", ""): c for c in (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't shan't she'd she'd've she's should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll "
    "they're they've wasn't we'd we'd've we're we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all "
    "y'all'll y'all'd've you'd you'd've you'll you're you've").split() if c.replace("'", "") not in WORDS_TOO}
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
NUMBER_COMMA = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(answer):
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in VQA_PUNCTUATION:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or NUMBER_COMMA.search(text)) else " ")
    words = [NUMBER_WORDS.get(w, w) for w in PERIOD.sub("", out).lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def answer_scores(predictions, references):
    """{"vqa_exact_match", "yes_no_accuracy", "yes_no_n"}: the fraction of answers equal to their reference after
    vqa_normalize, and the same over the records whose reference is yes or no (as POPE reports; None if none is)."""
    pairs = [(vqa_normalize(p), vqa_normalize(r)) for p, r in zip(predictions, references, strict=True)]
    yes_no = [(p, r) for p, r in pairs if r in ("yes", "no")]
    return {"vqa_exact_match": sum(p == r for p, r in pairs) / max(len(pairs), 1),
            "yes_no_accuracy": sum(p == r for p, r in yes_no) / len(yes_no) if yes_no else None,
            "yes_no_n": len(yes_no)}


def score_line(scores, digits=3):
    """Scores as one line: "cider 0.512 | ... | yes_no_n 12" (a missing score as -)."""
    def text(v):
        return "-" if v is None else str(v) if isinstance(v, int) else f"{v:.{digits}f}"
    return " | ".join(f"{k} {text(v)}" for k, v in scores.items())
