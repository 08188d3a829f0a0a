"""Captioning metrics: the COCO toolkit's scores without its Java tokenizer, equal to the standard (Java) ones."""
import shutil

import pytest

from metrics import caption_scores, tokenize

# (prediction, reference): capitals, punctuation, clitics, hyphens, numbers, quotes, brackets, a short answer
PAIRS = [
    ("A red square at the bottom right.", "a red square at the bottom right ."),
    ("A man riding a horse on the beach.", "A man rides a brown horse along the beach, at sunset."),
    ("Two dogs playing in the snow!", "two dogs play in the snow"),
    ("The woman's black-and-white photo (1950s).", "A black-and-white photo of a woman from the 1950s."),
    ("It doesn't look like a cat; it's a dog.", "A dog that doesn't look like a cat."),
    ("A \"vintage\" car, 3.5 meters long -- parked.", "an old car parked on a street"),
    ("yes", "Yes"),
    ("a blue circle at the top left .", "a green triangle at the center ."),
]
# pycocoevalcap 1.2 on PAIRS, tokenized by its PTBTokenizer (Stanford CoreNLP 3.4.1, Java 17)
STANDARD = {"cider": 3.3511463274126516, "bleu4": 0.34257362748662906, "rouge_l": 0.6451784093096901}


def test_scores_equal_the_java_tokenized_standard():
    scores = caption_scores([p for p, _ in PAIRS], [r for _, r in PAIRS])
    assert scores == {**{k: pytest.approx(v, abs=1e-12) for k, v in STANDARD.items()}, "exact_match": 2 / 8}


@pytest.mark.skipif(not shutil.which("java"), reason="no java: the standard tokenizer cannot run here")
def test_tokenize_equals_the_standard_java_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    texts = [t for pair in PAIRS for t in pair]
    java = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [tokenize(t) for t in texts] == [java[i][0] for i in range(len(texts))]


def test_an_empty_caption_scores_zero_instead_of_failing():
    scores = caption_scores(["", "a red circle"], ["a red circle", "a red circle"])
    assert scores["exact_match"] == 0.5 and 0 < scores["rouge_l"] < 1


def test_mismatched_lists_are_refused():
    with pytest.raises(ValueError, match="as many predictions as references"):
        caption_scores(["a cat"], ["a cat", "a dog"])
