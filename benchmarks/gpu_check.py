"""rRCM on an accelerator: training and certification speed, bf16 vs fp32, and that a CPU generator
certifies the same on the device as on the CPU. Run by scripts/gpu_check.sh on a lent GPU machine;
``--device cpu --quick`` is the dry run that checks this script here.

Prints one JSON line per measurement and a summary:

* pretraining and fine-tuning steps/s (fp32, and bf16 autocast) on CIFAR-10-shaped data
  (the paper's benchmark; random pixels: speed does not depend on them);
* certification samples/s and achieved TFLOP/s (FLOPs from torch.utils.flop_counter) against the
  device's bf16 peak (``--peak-tflops``, H200 dense bf16 ~ 790 as measured on these machines);
* certificates of 20 images with n = 10,000: fp32 vs bf16 (how many predictions and radii agree),
  and fp32 on the device vs fp32 on the CPU with the same CPU generator (must be identical
  predictions; radii equal up to float rounding of the logits).

    python benchmarks/gpu_check.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode


def _emit(**record) -> dict:
    print(json.dumps(record), flush=True)
    return record


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the script")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the device's dense bf16 peak")
    args = parser.parse_args()
    from rrcm_diffusers import RRCMModel, RRCMPipeline
    from rrcm_diffusers.certification import certify
    from rrcm_diffusers.training import FinetuneConfig, PretrainConfig, finetune, pretrain
    from rrcm_diffusers.trajectory import noise_level_for_sigma

    device = torch.device(args.device)
    q = args.quick
    # rRCM-B is 768/12/12 on 32x32 with patch 2 (the paper); a smaller ViT keeps the check to minutes
    kw = dict(image_size=32, in_channels=3, patch_size=4, hidden_size=64 if q else 384, depth=2 if q else 8)
    kw.update(
        num_heads=2 if q else 6, projection_hidden_dim=64 if q else 1024, projection_dim=32 if q else 256
    )
    steps, batch, images_n = (4, 16, 64) if q else (60, 256, 4096)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (images_n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (images_n,), generator=g)
    results: dict[str, dict] = {"device": {"name": str(device)}}
    if device.type == "cuda":
        results["device"]["name"] = torch.cuda.get_device_name(device)

    # 1. training speed, fp32 and bf16 autocast (accelerate's state is one per process, so bf16
    #    is autocast around the same trainer, as accelerate's mixed_precision="bf16" does)
    accelerator = Accelerator(cpu=device.type == "cpu")
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        cfg = PretrainConfig(steps=steps, batch_size=batch, warmup_steps=1, augment="rgb")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            _sync(device)
            t0 = time.perf_counter()
            online, _, _ = pretrain(RRCMModel(**kw), images, cfg, accelerator, progress=False)
            _sync(device)
            pre_s = (time.perf_counter() - t0) / steps
            fcfg = FinetuneConfig(sigma=0.5, probe_steps=1, steps=steps, batch_size=batch, warmup_steps=1)
            t0 = time.perf_counter()
            finetune(online.for_classification(10), images, labels, fcfg, accelerator, progress=False)
            _sync(device)
            ft_s = (time.perf_counter() - t0) / (steps + 1)
        results[f"train_{precision}"] = _emit(
            what="training",
            precision=precision,
            pretrain_steps_per_s=1 / pre_s,
            finetune_steps_per_s=1 / ft_s,
        )

    # 2. certification: samples/s and TFLOP/s, fp32 and bf16
    torch.manual_seed(0)
    model = RRCMModel(**{**kw, "projection_dim": 0, "num_classes": 10}).eval().to(device)
    test = torch.rand(4 if q else 20, 3, 32, 32, generator=g)
    sigma, n0, n = 0.5, 100, 500 if q else 10_000
    level = noise_level_for_sigma(sigma)

    def classifier(x: torch.Tensor) -> torch.Tensor:
        return model(x * 2 - 1, level).logits

    with FlopCounterMode(display=False) as counter:
        classifier(torch.rand(8, 3, 32, 32, device=device))
    flops_per_sample = counter.get_total_flops() / 8
    certificates = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            certify(classifier, test[:1].to(device), sigma, 10, 100, batch_size=1000)  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            res = certify(
                classifier, test.to(device), sigma, n0, n, batch_size=1000, generator=torch.Generator()
            )
            _sync(device)
        seconds = time.perf_counter() - t0
        samples_per_s = len(test) * (n0 + n) / seconds
        tflops = samples_per_s * flops_per_sample / 1e12
        certificates[precision] = res
        results[f"certify_{precision}"] = _emit(
            what="certify",
            precision=precision,
            images=len(test),
            n=n,
            samples_per_s=samples_per_s,
            tflops=tflops,
            fraction_of_bf16_peak=tflops / args.peak_tflops,
        )
    a, b = certificates["fp32"], certificates["bf16"]
    results["bf16_vs_fp32"] = _emit(
        what="bf16 vs fp32 certificates",
        same_prediction=int((a.predictions == b.predictions).sum()),
        of=len(test),
        max_radius_gap=float((a.radii - b.radii).abs().max()),
    )
    # 3. the same CPU generator certifies the same on the device and on the CPU
    cpu_model = RRCMModel(**{**kw, "projection_dim": 0, "num_classes": 10}).eval()
    cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    cpu_pipe, dev_pipe = RRCMPipeline(model=cpu_model), RRCMPipeline(model=model)
    for pipe in (cpu_pipe, dev_pipe):
        pipe.set_progress_bar_config(disable=True)
    few = test[:4]
    on_cpu = cpu_pipe.certify(few, sigma, n0, 1000, generator=torch.Generator().manual_seed(1))
    on_dev = dev_pipe.certify(few.to(device), sigma, n0, 1000, generator=torch.Generator().manual_seed(1))
    results["cpu_generator"] = _emit(
        what="CPU generator: device vs CPU",
        same_prediction=int((on_cpu.predictions == on_dev.predictions).sum()),
        of=len(few),
        max_radius_gap=float((on_cpu.radii - on_dev.radii).abs().max()),
    )
    print("SUMMARY " + json.dumps(results))


if __name__ == "__main__":
    main()
