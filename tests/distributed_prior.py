"""Launched by tests/test_prior_diffusion.py under ``accelerate launch``: train the diffusion prior, then dump
this rank's trained weights (not EMA), the initial weights and the latent ids it trained on."""

import json
import sys
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import set_seed
from safetensors.torch import save_file

from medvae.config import load_config
from medvae.prior.config import PriorConfig
from medvae.prior.training import DiffusionPriorTask, train_prior

out = Path(sys.argv[1])
config = load_config(None, sys.argv[2:], schema=PriorConfig)
config.train.ema_decay = None  # compare the trained weights themselves
result = train_prior(config)
state = PartialState()
rank = state.process_index
save_file({k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()},
          str(out / f"rank_{rank}.safetensors"))
if rank == 0:
    set_seed(config.train.seed)
    initial = DiffusionPriorTask(config).build_model()
    save_file({k: v.contiguous() for k, v in initial.state_dict().items()}, str(out / "initial.safetensors"))
(out / f"rank_{rank}.json").write_text(json.dumps({
    "seen_ids": result.seen_ids, "num_processes": state.num_processes, "backend": state.backend,
}))
