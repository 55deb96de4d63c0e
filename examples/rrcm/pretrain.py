"""Pretrain an rRCM encoder along the diffusion noise trajectory.

    accelerate launch examples/rrcm/pretrain.py --config examples/rrcm/configs/mnist_small.yaml --out runs/pre
    # on a CPU, two processes:
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no examples/rrcm/pretrain.py --config ... --out runs/pre

Checkpoints land in OUT/checkpoint-<step> (safetensors + JSON); running the same command
again resumes from the latest one. The loss log is OUT/log.jsonl; the final encoder OUT/online.
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import Accelerator

from rrcm_diffusers import RRCMModel
from rrcm_diffusers.data import load_dataset
from rrcm_diffusers.experiment import load_config, section_config
from rrcm_diffusers.training import PretrainConfig, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=None, help="override pretrain.steps")
    parser.add_argument(
        "--log_with", default=None, help="accelerate trackers: tensorboard, wandb, all, ... (default: none)"
    )
    args = parser.parse_args()
    cfg = load_config(args.config)
    if args.steps:
        cfg.pretrain["steps"] = args.steps
    accelerator = Accelerator(log_with=args.log_with, project_dir=args.out)
    accelerator.init_trackers("rrcm-pretrain", config={k: v for k, v in vars(args).items() if v is not None})
    images, _ = load_dataset(cfg.dataset, "train", cfg.data_dir)
    torch.manual_seed(cfg.seed)
    model = RRCMModel(image_size=images.shape[-1], in_channels=images.shape[1], **cfg.model)
    pcfg = section_config(
        PretrainConfig, cfg.pretrain, augment="grey" if images.shape[1] == 1 else "rgb", seed=cfg.seed
    )
    online, target, history = pretrain(model, images, pcfg, accelerator, args.out)
    if accelerator.is_main_process:
        online.save_pretrained(f"{args.out}/online")
        target.save_pretrained(f"{args.out}/target")
        if history:
            first, last = history[0]["loss"], sum(h["loss"] for h in history[-10:]) / len(history[-10:])
            print(
                json.dumps(
                    {
                        "steps_run": len(history),
                        "first_loss": first,
                        "last10_loss": last,
                        "processes": accelerator.num_processes,
                    }
                )
            )
    accelerator.end_training()  # flush and close the trackers


if __name__ == "__main__":
    main()
