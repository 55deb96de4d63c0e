"""Run by test_accelerate.py under `accelerate launch`: gather inside an Accelerator job."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

import shared_dist
from tests.shared_dist.helpers import inputs, local_loss, small_model

SIZES = [3, 5]


def main(out_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    model = accelerator.prepare(small_model())
    z = model(inputs(SIZES)[rank])
    k_all, offsets = shared_dist.gather(z[:, 1:], return_offsets=True)
    mine = shared_dist.local_slice(offsets)
    loss = local_loss(z[:, :4], k_all, torch.arange(mine.start, mine.stop))
    accelerator.backward(loss)
    record = {
        "rank": rank,
        "num_processes": accelerator.num_processes,
        "offsets": list(offsets),
        "grads": [p.grad.flatten().tolist() for p in model.parameters()],
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
