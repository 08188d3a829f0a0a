"""Loading backbones by hub id or local directory, with one error that says what to do."""


class HubError(OSError):
    """A backbone could not be loaded (offline, wrong id or path); the message names the way out."""


def from_hub(loader, name, **kw):
    """`loader.from_pretrained(name)`, turning a failed download into a HubError a user can act on."""
    try:
        return loader.from_pretrained(name, **kw)
    except OSError as e:
        raise HubError(f"could not load '{name}' ({type(e).__name__}). Without access to the Hugging Face "
                       "Hub, point --vision_model and --lm_model at local copies (and --data_dir at the data), "
                       "or try the offline demo: `uv run python demo.py`") from e
