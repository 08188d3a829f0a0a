"""The prompt format: which tokens train, where the image goes, and that generation sees the same format."""
import pytest
from transformers import AutoTokenizer

from models.prompt import (IGNORE, IMAGE_TOKEN, SampleError, add_image_token, encode, encode_prompt, encoded_length,
                           end_of_turn_id, to_messages, trained_turns)

N_IMAGE = 5  # any count: the image placeholder expands to what the projector emits
INSTRUCTION = "Describe the image concisely."
CAPTION = "a red circle at the center ."


@pytest.fixture(scope="module")
def tok(tiny_assets):
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.lm)  # SmolLM2's ChatML template, default system prompt
    add_image_token(tokenizer)
    return tokenizer


def chat(*turns):
    """Alternating user / assistant messages."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def trained_runs(tok, ids, labels):
    """The labelled stretches of a sample, decoded; labels must equal the ids wherever they train."""
    assert len(ids) == len(labels)
    runs, current = [], []
    for i, label in enumerate(labels):
        if label != IGNORE:
            assert label == ids[i]
            current.append(label)
        elif current:
            runs, current = runs + [tok.decode(current)], []
    return runs + ([tok.decode(current)] if current else [])


def image_span(tok, ids):
    """(start, count) of the image positions, which must be contiguous."""
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    at = [i for i, t in enumerate(ids) if t == image_id]
    assert at == list(range(at[0], at[0] + len(at))), "image positions must be one contiguous block"
    return at[0], len(at)


@pytest.mark.parametrize("user", [f"{IMAGE_TOKEN}\n{INSTRUCTION}", f"{INSTRUCTION}\n{IMAGE_TOKEN}"],
                         ids=["image_first", "image_last"])
def test_only_the_reply_and_its_end_of_turn_train(tok, user):
    ids, labels = encode(tok, chat(user, CAPTION), N_IMAGE)
    assert trained_runs(tok, ids, labels) == [CAPTION + "<|im_end|>"]
    start, count = image_span(tok, ids)
    assert count == N_IMAGE
    assert all(labels[i] == IGNORE for i in range(start, start + count))
    # everything before the reply (system prompt, user turn, role headers, image) is masked ...
    first = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert "You are a helpful AI assistant" in tok.decode(ids[:first]) and INSTRUCTION in tok.decode(ids[:first])
    # ... and so is what follows the end-of-turn token (the template's trailing newline)
    last = max(i for i, label in enumerate(labels) if label != IGNORE)
    assert ids[last] == tok.convert_tokens_to_ids("<|im_end|>") and all(l == IGNORE for l in labels[last + 1:])


def test_llava_records_become_chat_messages(tok):
    record = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{INSTRUCTION}"}, {"from": "gpt", "value": CAPTION}]
    assert to_messages(record) == chat(f"{IMAGE_TOKEN}\n{INSTRUCTION}", CAPTION)


@pytest.mark.parametrize("record", [
    [{"from": "robot", "value": "hi"}],
    [{"from": "human"}],
    [],
    [{"from": "gpt", "value": "hello"}, {"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": CAPTION}],
], ids=["unknown_role", "no_value", "empty", "starts_with_reply"])
def test_malformed_records_are_sample_errors_not_crashes(tok, record):
    with pytest.raises(SampleError) as e:  # the data loader skips and counts these
        encode(tok, to_messages(record), N_IMAGE)
    assert e.value.reason == "malformed_record"


def test_every_assistant_turn_trains_in_a_multi_turn_conversation(tok):
    replies = ["a blue square .", "it is at the top left .", "no , only one ."]
    turns = [f"{IMAGE_TOKEN}\nWhat is in this picture?", replies[0], "Where is it?", replies[1],
             "Are there others?", replies[2]]
    ids, labels = encode(tok, chat(*turns), N_IMAGE)
    assert trained_runs(tok, ids, labels) == [r + "<|im_end|>" for r in replies]
    assert image_span(tok, ids)[1] == N_IMAGE


@pytest.mark.parametrize("prompt, user", [
    (INSTRUCTION, f"{IMAGE_TOKEN}\n{INSTRUCTION}"),  # no <image> in the prompt: it goes first, as in training data
    (f"{IMAGE_TOKEN}\n{INSTRUCTION}", f"{IMAGE_TOKEN}\n{INSTRUCTION}"),
    (f"{INSTRUCTION}\n{IMAGE_TOKEN}", f"{INSTRUCTION}\n{IMAGE_TOKEN}"),
])
def test_generation_prompt_is_the_training_prefix(tok, prompt, user):
    ids, labels = encode(tok, chat(user, CAPTION), N_IMAGE)
    reply_start = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert encode_prompt(tok, prompt, N_IMAGE) == ids[:reply_start]


@pytest.mark.parametrize("turns, reason", [
    ((INSTRUCTION, CAPTION), "no_image_token"),
    ((f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n{INSTRUCTION}", CAPTION), "several_image_tokens"),
    ((f"{IMAGE_TOKEN}\n{INSTRUCTION}", CAPTION, f"And this one? {IMAGE_TOKEN}", CAPTION), "several_image_tokens"),
])
def test_a_sample_needs_exactly_one_image(tok, turns, reason):
    with pytest.raises(SampleError) as e:
        encode(tok, chat(*turns), N_IMAGE)
    assert e.value.reason == reason


def multi_turn(n):
    return [m for i in range(n) for m in ({"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is it?" if i == 0 else
                                          f"And turn {i}?"}, {"role": "assistant", "content": f"{CAPTION} ({i})"})]


def test_an_overlong_conversation_is_cut_at_the_end_of_a_turn(tok):
    """Whole turns are kept, up to the last assistant turn that fits (its end-of-turn token included); the image
    is never cut; encoded_length plans with the cut length."""
    messages = multi_turn(4)
    full_ids, full_labels = encode(tok, messages, N_IMAGE)
    assert len(trained_turns(full_labels)) == 4
    kept = set()
    for max_text in range(len(full_ids) - N_IMAGE - 1, 20, -7):
        try:
            ids, labels = encode(tok, messages, N_IMAGE, max_text_tokens=max_text)
        except SampleError as e:
            assert e.reason == "longer_than_max_text_tokens"
            continue
        assert len(ids) - N_IMAGE <= max_text and ids == full_ids[:len(ids)] and labels == full_labels[:len(ids)]
        assert image_span(tok, ids)[1] == N_IMAGE
        assert ids[-1] == end_of_turn_id(tok)  # ends with a whole reply
        assert encoded_length(tok, messages, N_IMAGE, max_text) == len(ids)
        kept.add(len(trained_turns(labels)))
    assert {1, 2, 3} <= kept


def test_a_sample_whose_first_reply_does_not_fit_is_skipped_with_a_reason(tok):
    for user in (f"{IMAGE_TOKEN}\n{INSTRUCTION}", " ".join([INSTRUCTION] * 20) + f"\n{IMAGE_TOKEN}"):
        messages = chat(user, " ".join([CAPTION] * 20))
        with pytest.raises(SampleError) as e:
            encode(tok, messages, N_IMAGE, max_text_tokens=40)
        assert e.value.reason == "longer_than_max_text_tokens"


def test_a_cut_keeps_an_image_of_a_later_user_turn_in_its_place(tok):
    """An <image> in the 2nd user turn: a max_text_tokens that would fit the first reply alone does not cut the image
    off (it was expanded after that reply); the cut keeps whole turns up to one after the image, or skips the sample."""
    turns = ["Hello.", "Hi, what should I look at?", f"This: {IMAGE_TOKEN}\nWhat is in it?", CAPTION,
             "Where is it?", "at the center ."]
    messages = chat(*turns)
    full_ids, full_labels = encode(tok, messages, N_IMAGE)
    start, _ = image_span(tok, full_ids)
    ends = [end for _, end in trained_turns(full_labels)]  # the turns' ends, image expanded
    assert ends[0] < start < ends[1]
    text_end = lambda end: end - N_IMAGE  # noqa: E731  text tokens up to a turn's end after the image
    for max_text, kept_turns in ((ends[0], None), (text_end(ends[1]) - 1, None),
                                 (text_end(ends[1]), 2), (text_end(ends[2]) - 1, 2), (text_end(ends[2]), 3)):
        if kept_turns is None:  # the first reply alone would fit, but not with the image: skipped
            with pytest.raises(SampleError, match="first reply after its <image> ends") as e:
                encode(tok, messages, N_IMAGE, max_text_tokens=max_text)
            assert e.value.reason == "longer_than_max_text_tokens"
            continue
        ids, labels = encode(tok, messages, N_IMAGE, max_text_tokens=max_text)
        assert image_span(tok, ids) == (start, N_IMAGE)  # never cut, never moved
        assert ids == full_ids[:len(ids)] and labels == full_labels[:len(ids)]
        assert len(trained_turns(labels)) == kept_turns and len(ids) == ends[kept_turns - 1]
        assert encoded_length(tok, messages, N_IMAGE, max_text) == len(ids)
