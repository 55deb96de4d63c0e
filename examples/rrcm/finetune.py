"""Fine-tune a pretrained rRCM encoder for smoothing noise σ and save an RRCMPipeline.

    accelerate launch examples/rrcm/finetune.py --config examples/rrcm/configs/mnist_small.yaml \
        --pretrained runs/pre/online --sigma 0.5 --out runs/ft-0.5

Linear probe (backbone frozen), then full fine-tuning with the head trainable, layer-wise lr
decay, 2σ noise with nearest-grid conditioning and the consistency loss. Writes OUT/log.jsonl and
OUT/final, the certification pipeline with its model card (`RRCMPipeline.from_pretrained(OUT/final)`),
and prints the noisy test accuracy.
"""

from __future__ import annotations

import argparse
import json

from accelerate import Accelerator

from rrcm_diffusers import RRCMModel
from rrcm_diffusers.data import load_dataset
from rrcm_diffusers.evaluation import noisy_accuracy
from rrcm_diffusers.experiment import load_config, section_config
from rrcm_diffusers.training import FinetuneConfig, finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--pretrained", required=True, help="folder of a pretrained RRCMModel")
    parser.add_argument("--sigma", type=float, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--log_with", default=None, help="accelerate trackers: tensorboard, wandb, all, ... (default: none)"
    )
    args = parser.parse_args()
    cfg = load_config(args.config)
    accelerator = Accelerator(log_with=args.log_with, project_dir=args.out)
    accelerator.init_trackers("rrcm-finetune", config={k: v for k, v in vars(args).items() if v is not None})
    x, y = load_dataset(cfg.dataset, "train", cfg.data_dir)
    model = RRCMModel.from_pretrained(args.pretrained).for_classification(int(y.max()) + 1)
    fcfg = section_config(FinetuneConfig, cfg.finetune, sigma=args.sigma, seed=cfg.seed)
    model, _ = finetune(
        model, x, y, fcfg, accelerator, args.out, data=f"{cfg.dataset} train ({len(x)} images)"
    )
    if accelerator.is_main_process:
        xt, yt = load_dataset(cfg.dataset, "test", cfg.data_dir)
        acc = {str(s): noisy_accuracy(model, xt[:1000], yt[:1000], s) for s in (None, args.sigma)}
        print(json.dumps({"sigma": args.sigma, "test_accuracy_first1000": acc}))
    accelerator.end_training()  # flush and close the trackers


if __name__ == "__main__":
    main()
