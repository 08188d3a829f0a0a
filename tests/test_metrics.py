"""Captioning metrics: the COCO toolkit's scores without its Java tokenizer, equal to the standard (Java) ones."""
import shutil

import pytest

from training.metrics import answer_scores, caption_scores, tokenize, vqa_normalize

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


# The VQAv2 evaluation's normalisation (vqaEval.py: processPunctuation, then processDigitArticle), case by case
VQA_CASES = [("Two", "2"), ("a dog.", "dog"), ("Yes!", "yes"), ("The red one", "red 1"), ("dont know", "don't know"),
             ("1,000", "1000"), ("3.5", "3.5"), ("t-shirt", "t shirt"), ("left, right", "left right"),
             ("  No.\n", "no"), ("an apple", "apple"), ("ten", "10"), ("none", "0"), ("cant", "can't"),
             ("black and white", "black and white"), ("(stop)", "stop")]


@pytest.mark.parametrize("answer, normalized", VQA_CASES)
def test_vqa_normalisation_follows_the_official_rules(answer, normalized):
    assert vqa_normalize(answer) == normalized


def test_answer_scores_count_exact_matches_and_yes_no_apart():
    scores = answer_scores(["Yes", "two dogs", "No.", "a cat"], ["yes", "2 dogs", "yes", "cat"])
    assert scores == {"vqa_exact_match": 0.75, "yes_no_accuracy": 0.5, "yes_no_n": 2}
    assert answer_scores(["red"], ["blue"])["yes_no_accuracy"] is None
