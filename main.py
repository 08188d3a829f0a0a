"""Train tinyvlm, one phase per run: the flags, then the loop of training/loop.py.

    uv run python main.py                                   # phase 1: align the projector on LLaVA-CC3M-595K
    uv run python main.py --phase lora --init_from checkpoints/run --out_dir checkpoints/lora   # phase 2
    torchrun --standalone --nproc_per_node 8 main.py --batch_tokens 2048   # DDP, one process per GPU: 16384 a step
    uv run python main.py --help                            # every config field, its default and its meaning
    uv run python demo.py                                   # offline, CPU, about a minute: both phases
"""
import sys

from data.download import DataError, check_data_dir
from models.config import ConfigError, parse_or_exit
from models.hub import HubError, check_reachable


def main(argv):
    """Trains the phase argv's flags describe; returns train()'s result. --help, a typo, a bad value, a user's bad data
    and an unreachable hub answer first, in a second: torch and the models load only after these checks."""
    cfg = parse_or_exit(argv, prog="main.py", description=__doc__.splitlines()[0])
    try:
        check_reachable(check_data_dir(cfg.validate()))
    except (ConfigError, DataError, HubError) as e:
        sys.exit(f"error: {e}")
    from training.loop import run_command, train  # the slow imports (torch, transformers), after the checks
    return run_command(lambda: train(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
