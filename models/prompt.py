"""The prompt format: one function for training and generation.

A sample is the LM's own chat template (ChatML for SmolLM2) over the conversation, with the
image placeholder expanded to exactly as many positions as the projector emits. Labels cover each
assistant reply and its end-of-turn token; everything else is -100.
"""
IMAGE_TOKEN = "<image>"  # LLaVA's marker; added to the tokenizer as one special token
DEFAULT_PROMPT = "<image>\nProvide a brief description of the given image."
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IGNORE = -100


class SampleError(ValueError):
    """A record that cannot become a training sample; `reason` is a short key for skip counts."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def add_image_token(tokenizer):
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _ids(tokenizer, messages, generation_prompt=False):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def to_messages(conversations):
    """LLaVA turns ({"from": "human"|"gpt", "value": str}) -> chat messages."""
    try:
        messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in conversations]
    except (KeyError, TypeError):
        raise SampleError("malformed_record", "conversations must be a list of {from, value} turns") from None
    if not messages or not all(isinstance(m["content"], str) for m in messages):
        raise SampleError("malformed_record", "empty conversation or non-text turn")
    return messages


def encode(tokenizer, messages, n_image_tokens, max_text_tokens=None, generation_prompt=False):
    """Tokenize a conversation with exactly one image. Returns (input_ids, labels) as lists.

    With generation_prompt=True the sequence ends with the assistant header, ready to decode.
    """
    ids = _ids(tokenizer, messages, generation_prompt)
    labels = [IGNORE] * len(ids)
    eot = tokenizer.eos_token_id  # end of turn (<|im_end|> for ChatML models)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:  # nothing to reply to; the template cannot even render the empty prefix
            raise SampleError("malformed_record", "the conversation starts with an assistant turn")
        if not m["content"].strip():  # its end-of-turn token alone would train the model to say nothing
            raise SampleError("empty_reply", f"assistant turn {i} has no text")
        prefix = _ids(tokenizer, messages[:i], generation_prompt=True)
        if ids[: len(prefix)] != prefix:  # the slicing below relies on the template being incremental
            raise ValueError("the chat template does not render turns incrementally; labels cannot be placed")
        start, end = len(prefix), len(_ids(tokenizer, messages[: i + 1]))
        reply = ids[start:end]
        stop = reply.index(eot) + 1 if eot in reply else len(reply)  # train the reply and its end-of-turn
        labels[start:start + stop] = reply[:stop]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_images = ids.count(image_id)
    if n_images != 1:
        raise SampleError("no_image_token" if n_images == 0 else "several_image_tokens",
                          f"expected exactly one {IMAGE_TOKEN} in the conversation, found {n_images}")
    at = ids.index(image_id)
    if max_text_tokens is not None and len(ids) - 1 > max_text_tokens:
        if at >= max_text_tokens:
            raise SampleError("image_beyond_max_text_tokens", f"{IMAGE_TOKEN} sits at text token {at}")
        ids, labels = ids[: max_text_tokens + 1], labels[: max_text_tokens + 1]  # cut text, never the image
    if not generation_prompt and all(l == IGNORE for l in labels):
        raise SampleError("no_target_tokens", "nothing left to train on (empty or truncated reply)")
    ids = ids[:at] + [image_id] * n_image_tokens + ids[at + 1:]
    labels = labels[:at] + [IGNORE] * n_image_tokens + labels[at + 1:]
    return ids, labels


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
