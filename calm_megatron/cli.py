"""Console entry points (installed by pyproject.toml) and what the command-line tools share."""
import sys
from typing import Callable, Type


def train_main() -> None:
    """`calm-train CONFIG [overrides]`: the same as `python -m calm_megatron.train`."""
    from calm_megatron.train import main

    sys.exit(main())


def exit_status(work: Callable[[], int], *user_errors: Type[BaseException]) -> int:
    """Run a tool's work and return its exit status; a user error (bad input, one of `user_errors`)
    prints `error: <message>` to stderr and returns 2 instead of a traceback."""
    try:
        return work()
    except user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
