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
