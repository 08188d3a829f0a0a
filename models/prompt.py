"""The prompt format: one function for training and generation.

A sample is the LM's own chat template (ChatML for SmolLM2, Llama 3's headers, Phi-3's tags, ...) over
the conversation, with the image placeholder expanded to exactly as many positions as the projector
emits. Labels cover each assistant reply and its end-of-turn token (the first special token the template
puts after a reply: <|im_end|>, <|eot_id|>, <|end|>); everything else is -100. Generation stops there.

A base LM without a chat template (Phi-2) gets PLAIN_TEMPLATE, which ends each reply with the LM's
own end-of-text token, the one token a base LM already knows how to emit:

    <bos>User:
    <image>
    Provide a brief description of the given image.

    Assistant:
    a red circle at the center .<eos>

"""
from itertools import groupby

IMAGE_TOKEN = "<image>"  # LLaVA's marker; added to the tokenizer as one special token
DEFAULT_PROMPT = "<image>\nProvide a brief description of the given image."
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IGNORE = -100
# Replies start on a new line: a header ending in a space would tokenize differently once the reply follows.
# (Newlines sit inside {{ }}: the template engine drops a newline that follows a {% %} tag.)
PLAIN_TEMPLATE = (
    "{{ bos_token or '' }}{% for message in messages %}{{ message['role'] | capitalize + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\n' }}{% endif %}"
)
# Llama 3's template writes today's date into its system prompt: a fixed one keeps training and generation
# (and two runs on different days) on the same tokens. Templates without a date ignore it.
TEMPLATE_VARIABLES = {"date_string": "26 Jul 2024"}


class SampleError(ValueError):
    """A record that cannot become a training sample; `reason` is a short key for skip counts."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def add_image_token(tokenizer):
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def prepare_tokenizer(tokenizer):
    """Make a freshly loaded tokenizer ready for `encode`, in place, before any weights load (it takes
    milliseconds; a template that cannot place labels fails here, not at the first batch). Adds the image
    token; a base LM gets PLAIN_TEMPLATE; a tokenizer without a pad token pads with end-of-text (padded
    positions are masked out of attention and labels, so any id will do)."""
    add_image_token(tokenizer)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = PLAIN_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    encode(tokenizer, probe * 2, n_image_tokens=0, has_image=False)  # raises if labels cannot be placed


def _text(tokenizer, messages, generation_prompt=False):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         **TEMPLATE_VARIABLES)


def _ids(tokenizer, messages, generation_prompt=False):
    return tokenizer(_text(tokenizer, messages, generation_prompt), add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer):
    """The token that ends an assistant turn: the first special token the template renders after a reply
    (<|im_end|> for ChatML, <|eot_id|> for Llama 3, <|end|> for Phi-3, end-of-text for PLAIN_TEMPLATE). It
    is often not the tokenizer's eos_token (Llama 3 base, Phi-3, Qwen2.5 base), so it is read off the template."""
    user = [{"role": "user", "content": "hi"}]
    start = len(_ids(tokenizer, user, generation_prompt=True))
    turn = _ids(tokenizer, user + [{"role": "assistant", "content": "hello"}])
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    eot = next((t for t in turn[start:] if t in special), None)
    if eot is None:
        raise ValueError("the chat template ends an assistant turn with no special token, so neither training nor "
                         "generation knows where a reply ends; give the tokenizer a template that does (or none: "
                         "tinyvlm then uses models.prompt.PLAIN_TEMPLATE)")
    return eot


def to_messages(conversations):
    """LLaVA turns ({"from": "human"|"gpt", "value": str}) -> chat messages. A reply's leading whitespace is dropped:
    a BPE tokenizer (SmolLM2's) merges it with the newline that ends the assistant header, so the reply would not
    start where generation starts (after that newline), and its labels could not be placed."""
    try:
        messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in conversations]
    except (KeyError, TypeError):
        raise SampleError("malformed_record", "conversations must be a list of {from, value} turns") from None
    if not messages or not all(isinstance(m["content"], str) for m in messages):
        raise SampleError("malformed_record", "empty conversation or non-text turn")
    return [{**m, "content": m["content"].lstrip()} if m["role"] == "assistant" else m for m in messages]


def encode(tokenizer, messages, n_image_tokens, max_text_tokens=None, generation_prompt=False, has_image=True):
    """Tokenize a conversation with exactly one image (has_image=False: none, a text-only sample that trains
    the LM alone). Returns (input_ids, labels) as lists.

    With generation_prompt=True the sequence ends with the assistant header, ready to decode.
    """
    ids = _ids(tokenizer, messages, generation_prompt)
    labels = [IGNORE] * len(ids)
    eot = end_of_turn_id(tokenizer)
    turn_ends = []  # where each assistant turn (its reply and end-of-turn token) ends
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:  # nothing to reply to; the template cannot even render the empty prefix
            raise SampleError("malformed_record", "the conversation starts with an assistant turn")
        if not m["content"].strip():  # its end-of-turn token alone would train the model to say nothing
            raise SampleError("empty_reply", f"assistant turn {i} has no text")
        prefix = _ids(tokenizer, messages[:i], generation_prompt=True)
        turn = _ids(tokenizer, messages[: i + 1])
        start = len(prefix)
        end = turn.index(eot, start) + 1  # the reply and its end-of-turn token
        if turn[:start] != prefix or ids[:end] != turn[:end]:  # the slicing relies on incremental rendering
            raise ValueError("the chat template renders a conversation differently from its turns one by one (it "
                             "may rewrite earlier replies), so labels cannot be placed; give the tokenizer a "
                             "template that renders turns incrementally")
        labels[start:end] = ids[start:end]
        turn_ends.append(end)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_images = ids.count(image_id)
    if n_images != has_image:
        reason = ("several_image_tokens" if n_images > 1 else "no_image_token" if has_image
                  else "image_token_without_image")
        raise SampleError(reason, f"expected {int(has_image)} {IMAGE_TOKEN} in the conversation, found {n_images}")
    at = ids.index(image_id) if has_image else None
    # A cut keeps the image (in a later user turn it may follow the first replies): cut before it, the image would
    # be expanded after the kept replies, and the sample's image would have no positions of its own in a packed batch
    cuts = [end for end in turn_ends if end > at] if has_image else turn_ends
    keep = kept_tokens(len(ids), cuts, max_text_tokens, has_image)
    if keep == 0:
        after = f" after its {IMAGE_TOKEN}" if has_image else ""
        raise SampleError("longer_than_max_text_tokens", f"its first reply{after} ends at text token "
                          f"{cuts[0] - has_image}, past max_text_tokens={max_text_tokens}" if cuts else
                          f"no reply follows its {IMAGE_TOKEN}, and it is past max_text_tokens={max_text_tokens}")
    ids, labels = ids[:keep], labels[:keep]
    if not generation_prompt and all(l == IGNORE for l in labels):
        raise SampleError("no_target_tokens", "nothing to train on (no assistant reply)")
    if has_image:
        ids = ids[:at] + [image_id] * n_image_tokens + ids[at + 1:]
        labels = labels[:at] + [IGNORE] * n_image_tokens + labels[at + 1:]
    return ids, labels


def kept_tokens(n, cuts, max_text_tokens, has_image):
    """Of a sample's n rendered tokens (its image one placeholder), how many `encode` keeps: all when its text fits
    max_text_tokens; else up to the last of `cuts` (the ends of the assistant turns after the image) that fits, never
    within a turn (0 when none fits: the sample is skipped)."""
    if max_text_tokens is None or n - has_image <= max_text_tokens:
        return n
    return max((end for end in cuts if end - has_image <= max_text_tokens), default=0)


def trained_turns(labels):
    """The assistant turns a sample's labels train, as (start, end) spans of labelled positions (a list of ids):
    fewer than the conversation's assistant turns when `encode` cut it."""
    spans, at = [], 0
    for trained, run in groupby(labels, key=lambda label: label != IGNORE):
        n = len(list(run))
        if trained:
            spans.append((at, at + n))
        at += n
    return spans


def encoded_length(tokenizer, messages, n_image_tokens, max_text_tokens=None, has_image=True, rendered=None):
    """len(encode(...)[0]) for a conversation `encode` accepts: what packing plans micro-batches with, before any
    image is read. A sample that fits takes one rendering (encode renders every turn), or none when `rendered` (its
    rendered_lengths) is given; a longer one is encoded."""
    n = len(_ids(tokenizer, messages)) if rendered is None else rendered
    if max_text_tokens is not None and n - has_image > max_text_tokens:
        n = len(encode(tokenizer, messages, 1, max_text_tokens, has_image=has_image)[0])  # cut at a turn's end
    return n + has_image * (n_image_tokens - 1)


def rendered_lengths(tokenizer, conversations):
    """len(_ids(tokenizer, messages)) of each conversation, its texts tokenized in one call: a call per text spent more
    time in transformers' per-call Python than in the tokenizer itself (packing's length pass, data/llava.py)."""
    texts = [_text(tokenizer, messages) for messages in conversations]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def encode_prompt(tokenizer, prompt, n_image_tokens):
    """The generation side of `encode`: a user turn with the image, then the assistant header."""
    if IMAGE_TOKEN not in prompt:
        prompt = f"{IMAGE_TOKEN}\n{prompt}"
    ids, _ = encode(tokenizer, [{"role": "user", "content": prompt}], n_image_tokens, generation_prompt=True)
    return ids


def label_positions(labels):
    """Flat indices into [B * T] of the positions whose next token is trained: where the LM head must run."""
    B, T = labels.shape
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return rows * T + cols
