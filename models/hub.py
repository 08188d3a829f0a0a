"""Loading backbones by hub id or local directory, with one error that says what to do."""
import functools
import os

OFFLINE_DEMO = "try the offline demo: `uv run python demo.py`"


class HubError(OSError):
    """A backbone could not be loaded (offline, wrong id or path); the message names the way out."""


@functools.cache
def hub_reachable():
    """One quick request per process. Without it, an offline run would spend over 20 s on huggingface_hub's
    retries (waits of 1, 2, 4, 8 and 8 s) for the first file that is not cached, before failing."""
    from huggingface_hub import constants, get_session
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        return get_session().head(constants.ENDPOINT, timeout=3.0).status_code < 500  # a 5xx hub serves no files
    except Exception:  # no DNS, no route, a timeout, a proxy or TLS failure: the hub cannot be used now
        return False


def from_hub(loader, name, **kw):
    """`loader.from_pretrained(name)`, turning a failed download into a HubError a user can act on. Without the
    hub, only the local cache is read, so a model that is not there fails at once instead of after retries."""
    cache_only = not os.path.isdir(name) and not hub_reachable()  # a local directory needs no hub
    try:
        return loader.from_pretrained(name, **kw, **({"local_files_only": True} if cache_only else {}))
    except OSError as e:
        raise unreachable(name, NO_HUB if cache_only else type(e).__name__) from e


NO_HUB = "no Hugging Face Hub (offline or unreachable), not in the local cache"


def unreachable(name, why):
    return HubError(f"could not load '{name}' ({why}). Without access to the Hugging Face Hub, point "
                    "--vision_model and --lm_model at local copies (and --data_dir at the data), or "
                    f"{OFFLINE_DEMO}")


def check_reachable(cfg):
    """Cheap (no torch): each backbone is a local directory, in the cache, or the hub answers. A script calls it
    before its slow imports, so an offline run without local copies fails in a second, not after ten."""
    for name in filter(None, (cfg.vision_model, cfg.fused_vision_model, cfg.lm_model)):
        if not os.path.isdir(name) and not in_cache(name) and not hub_reachable():
            raise unreachable(name, NO_HUB)
    return cfg


def in_cache(name):
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except HFValidationError:  # not a hub id either (e.g. a path that does not exist)
        return False
