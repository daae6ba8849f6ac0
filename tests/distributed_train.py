"""Launched by tests/test_train_distributed.py under ``accelerate launch``: train, then dump this rank's
weights and the ids it trained on, so the test can compare the ranks."""

import json
import sys
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import set_seed
from safetensors.torch import save_file

from medvae.config import load_config, to_dict
from medvae.models import VAE3D
from medvae.train.loop import train

out = Path(sys.argv[1])
config = load_config(None, sys.argv[2:])
result = train(config)
state = PartialState()
rank = state.process_index
weights = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
save_file(weights, str(out / f"rank_{rank}.safetensors"))
if rank == 0:
    set_seed(config.train.seed)
    initial = VAE3D(**to_dict(config)["model"])
    save_file({k: v.contiguous() for k, v in initial.state_dict().items()}, str(out / "initial.safetensors"))
(out / f"rank_{rank}.json").write_text(json.dumps({
    "seen_ids": result.seen_ids, "distributed_type": str(state.distributed_type),
    "num_processes": state.num_processes, "backend": state.backend,
}))
