"""Without the Hugging Face Hub: a run stops at once with a message naming the way out, and a failed download
leaves no folder behind (but keeps what a rerun resumes from)."""
import os
import socket
import subprocess
import sys
import time

import huggingface_hub
import pytest

import main
from conftest import REPO
from data.download import DataError, ensure_dataset
from models.config import VLMConfig
from models.hub import hub_reachable

WAY_OUT = ("--vision_model", "--lm_model", "--data_dir", "`uv run python demo.py`")


@pytest.fixture
def no_network(monkeypatch):
    """A machine without internet, as a new user's may be: HF_HUB_OFFLINE unset, and no host name resolves."""
    def getaddrinfo(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    hub_reachable.cache_clear()  # its answer is kept for the process
    yield
    hub_reachable.cache_clear()


def test_default_run_without_internet_stops_at_once_naming_the_way_out(no_network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(SystemExit) as e:
        main.main([f"--cache_dir={tmp_path / 'tinyvlm'}"])
    assert time.monotonic() - start < 10  # huggingface_hub's own retries took over 30 s
    assert all(way in str(e.value) for way in WAY_OUT), e.value
    assert not any(tmp_path.iterdir())  # no hub cache, data cache or run folder


def test_data_download_without_internet_stops_at_once(no_network, tmp_path):
    start = time.monotonic()
    with pytest.raises(DataError, match="--data_dir.*`uv run python demo.py`"):
        ensure_dataset(VLMConfig(cache_dir=str(tmp_path / "tinyvlm")))
    assert time.monotonic() - start < 10 and not any(tmp_path.iterdir())


def test_a_failed_download_leaves_no_folder(tmp_path, monkeypatch):
    """The hub answered the probe, then the download failed: here the real huggingface_hub fails at once in
    offline mode (the suite's), after making its folders, lock and markers under the data set's folder."""
    monkeypatch.setattr("data.download.hub_reachable", lambda: True)
    with pytest.raises(DataError, match="--data_dir.*`uv run python demo.py`"):
        ensure_dataset(VLMConfig(cache_dir=str(tmp_path / "cache" / "tinyvlm")))
    assert not any(tmp_path.iterdir())


def test_a_failed_download_keeps_a_partial_file_to_resume_from(tmp_path, monkeypatch):
    def download_then_drop(repo_id, filename, repo_type, local_dir):
        partial = local_dir / ".cache" / "huggingface" / "download" / f"{filename}.etag.incomplete"
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"the first bytes")
        raise ConnectionError("connection reset")
    monkeypatch.setattr("data.download.hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download_then_drop)
    cfg = VLMConfig(cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="ConnectionError"):
        ensure_dataset(cfg)
    partial = tmp_path / cfg.dataset.replace("/", "--") / ".cache" / "huggingface" / "download"
    assert (partial / "chat.json.etag.incomplete").read_bytes() == b"the first bytes"


def test_the_command_line_names_the_way_out(tmp_path):
    """`python main.py` without the hub: the message, no traceback, from the check that runs before the imports
    of torch and transformers (a local path that does not exist is reported the same way)."""
    for flags in ([], ["--vision_model", str(tmp_path / "no_such_dir")]):
        out = subprocess.run([sys.executable, str(REPO / "main.py"), *flags], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 1 and "--vision_model and --lm_model" in out.stderr and "demo.py" in out.stderr
        assert "Traceback" not in out.stderr
