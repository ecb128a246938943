"""Console entry points (installed by pyproject.toml)."""
import sys


def train_main() -> None:
    """`calm-train CONFIG [overrides]`: the same as `python -m calm_megatron.train`."""
    from calm_megatron.train import main

    sys.exit(main())
