"""The local web page app.py serves (gradio), once its flags are checked: drop or paste an image, edit the prompt and
the sampling, watch the caption appear token by token, or chat about the image."""
import sys
from functools import partial
from pathlib import Path
from threading import Thread

import gradio as gr
import transformers
from PIL import Image
from transformers import TextIteratorStreamer

from data.llava import decode_image
from models.config import ConfigError
from models.hub import HubError
from models.prompt import DEFAULT_PROMPT, IMAGE_TOKEN, SampleError
from models.vision import image_pixels
from training import checkpoint
from training.distributed import pick_device

MAX_FILE_BYTES = 20 * 2**20
MAX_PIXELS = 50_000_000  # decoding more would take seconds and gigabytes, and the model sees a small square anyway


# ----------------------------------------------------------------------------- bad input: a message for the page
class InputError(ValueError):
    """Something wrong with what the person gave the page; the message says what to do instead."""


def read_image(path):
    """The uploaded file as an RGB image. Size and format are checked from the header, before decoding."""
    if Path(path).stat().st_size > MAX_FILE_BYTES:
        raise InputError(f"This file is over {MAX_FILE_BYTES // 2**20} MB; please use a smaller image.")
    try:
        with Image.open(path) as img:  # reads the header only
            width, height = img.size
    except (OSError, ValueError, Image.DecompressionBombError):  # Pillow's "not an image" is an OSError
        raise InputError("This file is not an image (or not one Pillow reads); try a PNG, JPEG or WebP.") from None
    if width * height > MAX_PIXELS:
        raise InputError(f"This image is {width}x{height} pixels, over {MAX_PIXELS // 10**6} megapixels; "
                         "please scale it down first.")
    try:
        return decode_image(Path(path).read_bytes())
    except SampleError as e:
        raise InputError(f"This image cannot be decoded ({e.reason}); is the file complete?") from None


def check_prompt(prompt):
    if not prompt.strip():
        raise InputError(f"The prompt is empty; write a question or instruction, e.g. {DEFAULT_PROMPT!r}.")
    if prompt.count(IMAGE_TOKEN) > 1:
        raise InputError(f"The prompt holds {IMAGE_TOKEN} more than once; the model reads one image, at one place.")


def message(text):
    """A message for the page about what the person gave it. gradio prints a traceback to the console for every
    gr.Error it catches unless print_exception is off: input the page has answered is not a fault to look into."""
    return gr.Error(text, print_exception=False)


def read_upload(preprocess, payload):
    """gr.Image's `preprocess`, but an uploaded file goes through read_image: a bad file gets a message."""
    if payload is None or payload.path is None:
        return preprocess(payload)
    try:
        return read_image(payload.path)
    except InputError as e:
        raise message(str(e)) from None


# ----------------------------------------------------------------------------- the page
def streamed(model, generate):
    """Yields the reply so far, each time the model adds a piece: generate(streamer) runs in a thread."""
    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    failed = []

    def run():
        try:
            generate(streamer)
        except Exception as e:  # e.g. a prompt longer than the LM's context: said on the page, and the stream ends
            failed.append(e)
            streamer.end()
    Thread(target=run, daemon=True).start()
    reply = ""
    for piece in streamer:
        reply += piece
        yield reply
    if failed:  # a fault, not the person's input: the console gets its traceback (chained from the thread's error)
        raise gr.Error(f"The model could not caption this: {failed[0]}") from failed[0]


def pixels_of(model, image):
    if image is None:
        raise message("Drop, paste or pick an image first.")
    return image_pixels(model.processor, [image], model.cfg.image_fit).to(next(model.parameters()).device)  # [1, 3, H, W]


def caption_stream(model, image, prompt, temperature, top_p, max_new_tokens):
    """Yields the caption so far, as the model writes it."""
    pixel_values = pixels_of(model, image)
    try:
        check_prompt(prompt)
    except InputError as e:
        raise message(str(e)) from None
    yield from streamed(model, lambda streamer: model.generate(pixel_values, prompt, int(max_new_tokens), temperature,
                                                               top_p, streamer))


def chat_stream(model, image, text, history, temperature, top_p, max_new_tokens):
    """Yields the conversation about the image (gradio's messages: {"role", "content"}), the new reply growing at
    its end; the model reads the whole history (VLM.chat)."""
    pixel_values = pixels_of(model, image)
    if not text.strip():
        raise message("Write a question first.")
    messages = [{"role": m["role"], "content": m["content"]} for m in history or []]
    messages.append({"role": "user", "content": text})
    for reply in streamed(model, lambda streamer: model.chat(pixel_values, messages, int(max_new_tokens), temperature,
                                                             top_p, streamer)):
        yield messages + [{"role": "assistant", "content": reply}]


def build_page(model, examples_dir):
    with gr.Blocks(title="tinyvlm", analytics_enabled=False) as page:  # a local page: no usage reports sent
        gr.Markdown("# tinyvlm\nDrop or paste an image, then press **Caption**.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="image", type="pil", sources=["upload", "clipboard"], elem_id="image")
                # gr.Image would open the file with Pillow itself; a subclass instead would make gradio write a .pyi
                image.preprocess = partial(read_upload, image.preprocess)
                prompt = gr.Textbox(DEFAULT_PROMPT, label="prompt", lines=2, elem_id="prompt")
                temperature = gr.Slider(0, 2, 0, step=0.05, label="temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1, 1, step=0.05, label="top-p")
                max_new_tokens = gr.Slider(1, 256, 32, step=1, label="max new tokens")
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
            caption = gr.Textbox(label="caption", lines=6, elem_id="caption")
        gr.Markdown("**Chat** about the same image: each answer reads the conversation so far.")
        chat = gr.Chatbot(label="chat", elem_id="chat")
        with gr.Row():
            question = gr.Textbox(label="question", placeholder="What colour is it?", scale=4, elem_id="question")
            ask = gr.Button("Ask", elem_id="ask-button")
            gr.ClearButton([chat, question], value="New chat")
        ask.click(partial(chat_stream, model), [image, question, chat, temperature, top_p, max_new_tokens], chat,
                  api_name="chat")
        samples = sorted(p for p in Path(examples_dir).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if samples:
            gr.Examples([[str(p)] for p in samples], inputs=[image], label="held-out images of the demo")
        button.click(partial(caption_stream, model),
                     [image, prompt, temperature, top_p, max_new_tokens], caption, api_name="caption")
    return page


def serve(args):
    """app.py's work, its flags (args) checked: load the checkpoint and serve the page until stopped."""
    transformers.utils.logging.disable_progress_bar()
    try:
        model = checkpoint.load_model(args.checkpoint).place(pick_device(args.device))
    except (ConfigError, HubError) as e:
        sys.exit(f"error: {e}")
    build_page(model, args.examples).launch(server_port=args.port, max_file_size=MAX_FILE_BYTES)
