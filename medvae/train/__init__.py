"""Training under Accelerate: the loop, checkpoints, data order, validation, divergence guard."""

from __future__ import annotations

import sys


def train_from_cli(config_path: str | None, overrides: list[str]) -> None:
    """Entry point of ``medvae train``: load the config, train, print where the results are."""
    from medvae.config import load_config
    from medvae.train.guard import DivergenceError
    from medvae.train.loop import train

    config = load_config(config_path, overrides)
    try:
        run_dir = train(config).run_dir
    except DivergenceError as err:
        print(f"medvae train: aborted: {err}", file=sys.stderr)
        sys.exit(3)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"medvae: run folder     {run_dir}")
        print(f"medvae: exported model {run_dir / 'export'} (model.safetensors + config.json)")
        print(f"medvae: events log     {run_dir / 'events.jsonl'}")
        print(f"medvae: metrics        {run_dir / 'metrics.jsonl'}")
        print(f"medvae: previews       {run_dir / 'previews'}")
        print(f"medvae: checkpoints    {run_dir / 'checkpoints'}")
