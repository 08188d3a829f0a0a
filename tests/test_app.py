"""app.py, the local page: bad input gets a message, the caption streams, and a real browser reads it."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from PIL import Image

from conftest import REPO
from models.config import VLMConfig
from models.vision import image_pixels
from models.vlm import VLM
from training import checkpoint

gr = pytest.importorskip("gradio", reason="the page's dependencies are an extra: uv sync --extra app")
from training import page  # noqa: E402 (it imports gradio)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_assets, tmp_path_factory):
    torch.manual_seed(0)
    cfg = VLMConfig(vision_model=tiny_assets.vision, lm_model=tiny_assets.lm, projector_hidden_dim=64)
    path = tmp_path_factory.mktemp("checkpoint")
    checkpoint.save_model(VLM.from_config(cfg), path)
    return path


@pytest.fixture
def red_square(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), "red").save(path)
    return path


def test_bad_files_get_a_message_not_an_error(tmp_path, red_square, monkeypatch):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(page.InputError, match="not an image"):
        page.read_image(not_an_image)
    monkeypatch.setattr(page, "MAX_PIXELS", 40 * 30 - 1)  # checked from the header, before any decoding
    with pytest.raises(page.InputError, match="40x30 pixels, over"):
        page.read_image(red_square)
    monkeypatch.undo()
    assert page.read_image(red_square).size == (40, 30)


def test_an_empty_prompt_gets_a_message():
    with pytest.raises(page.InputError, match="prompt is empty"):
        page.check_prompt("  \n")
    with pytest.raises(page.InputError, match="more than once"):
        page.check_prompt("<image> <image> what is this?")


def test_the_caption_streams_to_what_generate_writes(tiny_checkpoint, red_square):
    model = checkpoint.load_model(tiny_checkpoint)
    image = page.read_image(red_square)
    stream = list(page.caption_stream(model, image, "<image>\nWhat is it?", 0.0, 1.0, 8))
    assert len(stream) > 1 and all(a == b[:len(a)] for a, b in zip(stream, stream[1:]))  # it grows
    expected = model.generate(image_pixels(model.processor, [image]), "<image>\nWhat is it?", max_new_tokens=8)[0]
    assert stream[-1].strip() == expected


def too_long(*args):
    raise ValueError("the prompt is longer than the LM's context")


def test_a_failed_generation_ends_the_stream_with_a_message(tiny_checkpoint, red_square, monkeypatch):
    model = checkpoint.load_model(tiny_checkpoint)
    monkeypatch.setattr(model, "generate", too_long)
    with pytest.raises(gr.Error, match="could not caption this: the prompt is longer"):
        list(page.caption_stream(model, page.read_image(red_square), "<image> hi", 0.0, 1.0, 8))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tiny_checkpoint, tmp_path):
    """(model, a client of the page), served by this process: the test sees what the server prints."""
    from gradio_client import Client
    model = checkpoint.load_model(tiny_checkpoint)
    blocks = page.build_page(model, tmp_path / "no_examples")
    blocks.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    yield model, Client(blocks.local_url, verbose=False)
    blocks.close()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")  # gradio's queue statistics, under pandas 3
def test_messages_about_the_input_print_no_traceback_and_faults_do(served, red_square, tmp_path, capfd, monkeypatch):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    model, client = served
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    for image, prompt, said in ((not_an_image, "<image> hi", "not an image"), (red_square, " ", "prompt is empty")):
        with pytest.raises(AppError, match=said):
            client.predict(handle_file(str(image)), prompt, 0.0, 1.0, 4, api_name="/caption")
    assert "Traceback" not in capfd.readouterr().err  # the person got the message; the console has nothing to fix
    monkeypatch.setattr(model, "generate", too_long)
    with pytest.raises(AppError, match="could not caption this"):
        client.predict(handle_file(str(red_square)), "<image> hi", 0.0, 1.0, 4, api_name="/caption")
    printed = capfd.readouterr().err
    assert "Traceback" in printed and "ValueError: the prompt is longer" in printed  # the fault's own traceback


# ----------------------------------------------------------------------------- a real browser
@pytest.fixture(scope="module")
def browser():
    """Debian's chromium and chromedriver, headless, or a skip saying what is missing (before any server starts)."""
    pytest.importorskip("selenium", reason="selenium comes with the app extra: uv sync --extra app")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    missing = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
    if missing:
        pytest.skip(f"no {' and '.join(missing)} on PATH: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_url(tiny_checkpoint, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "app.py", "--checkpoint", str(tiny_checkpoint), "--port", str(port),
                               "--device", "cpu", "--examples", str(tmp_path_factory.mktemp("none"))],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"app.py did not serve {url}: {server.communicate()[1].decode()[-2000:]}")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(30)


@pytest.mark.slow
def test_a_browser_uploads_an_image_and_reads_the_caption(browser, page_url, tiny_checkpoint, red_square, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    model = checkpoint.load_model(tiny_checkpoint)
    expected = model.generate(image_pixels(model.processor, [Image.open(red_square).convert("RGB")]))[0]
    browser.get(page_url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#image input[type=file]")).send_keys(str(red_square))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))  # the preview: uploaded
    browser.find_element(By.ID, "caption-button").click()
    caption = browser.find_element(By.CSS_SELECTOR, "#caption textarea")
    wait.until(lambda d: caption.get_attribute("value").strip() == expected)

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    browser.get(page_url)  # a fresh page
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#image input[type=file]")).send_keys(str(not_an_image))
    browser.find_element(By.ID, "caption-button").click()  # the server reads the upload when asked to caption
    wait.until(lambda d: "This file is not an image" in d.find_element(By.TAG_NAME, "body").text)


def test_the_chat_keeps_the_conversation_and_streams_what_chat_answers(tiny_checkpoint, red_square):
    model = checkpoint.load_model(tiny_checkpoint)
    image = page.read_image(red_square)
    history = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "a red square ."}]
    stream = list(page.chat_stream(model, image, "Where is it?", history, 0.0, 1.0, 8))
    last = stream[-1]
    assert last[:2] == history and last[2] == {"role": "user", "content": "Where is it?"}
    expected = model.chat(image_pixels(model.processor, [image]), last[:3], max_new_tokens=8)
    assert last[3]["role"] == "assistant" and last[3]["content"].strip() == expected
    with pytest.raises(gr.Error, match="Write a question"):
        list(page.chat_stream(model, image, " ", history, 0.0, 1.0, 8))
