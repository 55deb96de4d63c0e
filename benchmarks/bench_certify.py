"""Certification cost: rRCM vs Cohen vs DDS per noise sample, and the pipeline's overhead.

One run on this machine, the model of an experiment config (default
examples/rrcm/configs/mnist_small.yaml; weights do not change the cost, so fresh models are used).
Wall times are the minimum over ``--repeats`` interleaved runs, so that a burst of load on a shared
machine does not land on one side of a ratio only:

* FLOPs per noise sample (torch.utils.flop_counter) and wall time per noise sample when
  certifying (n0 + n samples, batched), for rRCM (one ViT pass), Cohen (the same backbone,
  so the same cost) and DDS (one UNet pass + one classifier pass); ratio DDS / rRCM
  (target >= 10x);
* RRCMPipeline.certify vs a bare batched forward of the same model over the same number of
  samples (target overhead <= 10%);
* bf16 autocast and torch.compile on this CPU, to show whether they help (neither is on by default).

    python benchmarks/bench_certify.py [--config examples/rrcm/configs/mnist_p7.yaml] [--images 4] [--n 2000]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from diffusers import DDPMScheduler
from torch.utils.flop_counter import FlopCounterMode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default="examples/rrcm/configs/mnist_small.yaml")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from rrcm_diffusers import RRCMModel, RRCMPipeline
    from rrcm_diffusers.experiment import cm_scheduler, load_config
    from rrcm_diffusers.pipeline_dds import DDSPipeline, small_unet
    from rrcm_diffusers.trajectory import grid_sigma_for_sigma

    torch.manual_seed(0)
    model_cfg = load_config(args.config)["model"]
    print(f"model: {model_cfg} ({args.config})")
    kw = {**model_cfg, "projection_dim": 0, "num_classes": 10}
    clf = RRCMModel(**kw).eval()
    rrcm = RRCMPipeline(model=clf, scheduler=cm_scheduler())
    dds = DDSPipeline(
        unet=small_unet().eval(),
        scheduler=DDPMScheduler(num_train_timesteps=1000),
        classifier=RRCMModel(**kw).eval(),
    )
    for p in (rrcm, dds):
        p.set_progress_bar_config(disable=True)
    sigma, n0 = 0.5, 100
    images = torch.rand(args.images, 1, 28, 28)

    def flops(f) -> float:
        # grad enabled: nn.TransformerEncoderLayer's inference fast path is invisible to the counter
        x = torch.rand(100, 1, 28, 28)
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            f(x)
        return counter.get_total_flops() / 100

    samples = args.images * (n0 + args.n)  # noise samples per certify call

    def certify_time(pipe) -> float:
        t0 = time.perf_counter()
        pipe.certify(
            images, sigma, n0=n0, n=args.n, batch_size=args.batch, generator=torch.Generator().manual_seed(0)
        )
        return (time.perf_counter() - t0) / samples

    # the bare loop: the same model, the same batch shapes, inputs drawn beforehand, nothing else
    level = grid_sigma_for_sigma(sigma, rrcm.scheduler.config.num_train_timesteps)
    shapes = [min(args.batch, n0 - s) for s in range(0, n0, args.batch)]
    shapes += [min(args.batch, args.n - s) for s in range(0, args.n, args.batch)]
    xs = {b: torch.randn(b, 1, 28, 28) for b in set(shapes)}

    @torch.inference_mode()
    def bare_time() -> float:
        t0 = time.perf_counter()
        for _ in range(args.images):
            for b in shapes:
                clf(xs[b], level).logits.argmax(-1)
        return (time.perf_counter() - t0) / samples

    f_rrcm, f_dds = flops(rrcm.base_classifier(sigma)), flops(dds.base_classifier(sigma))
    for pipe in (rrcm, dds):
        pipe.certify(images[:1], sigma, n0=10, n=args.batch, batch_size=args.batch)  # warm-up
    bare_time()
    runs = [(certify_time(rrcm), bare_time(), certify_time(dds)) for _ in range(args.repeats)]
    t_rrcm, bare, t_dds = (min(r[i] for r in runs) for i in range(3))
    print(
        f"per noise sample          FLOPs      wall ms   (certify: {args.images} images, n0={n0}, "
        f"n={args.n}, batch {args.batch}, min of {args.repeats})"
    )
    print(f"rRCM  (ViT)          {f_rrcm / 1e6:9.1f} M  {1000 * t_rrcm:9.3f}")
    print(f"Cohen (same ViT)     {f_rrcm / 1e6:9.1f} M  {1000 * t_rrcm:9.3f}   (same backbone, same cost)")
    print(f"DDS   (UNet + ViT)   {f_dds / 1e6:9.1f} M  {1000 * t_dds:9.3f}")
    print(f"DDS / rRCM: {f_dds / f_rrcm:.1f}x FLOPs, {t_dds / t_rrcm:.1f}x wall time   (target >= 10x)")
    print(
        f"pipeline certify {1000 * t_rrcm:.3f} ms vs bare forward {1000 * bare:.3f} ms per sample: "
        f"overhead {100 * (t_rrcm / bare - 1):+.1f}%   (target <= 10%)"
    )

    # bf16 autocast on this CPU
    x = torch.rand(args.batch, 1, 28, 28)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(3):
            clf(x, level)
        fp32 = time.perf_counter() - t0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            clf(x, level)
            t0 = time.perf_counter()
            for _ in range(3):
                clf(x, level)
            bf16 = time.perf_counter() - t0
    print(f"bf16 autocast forward / fp32 on this CPU: {bf16 / fp32:.2f}x (>1 means slower: left off)")

    # torch.compile (inductor) on this CPU: worth it only if faster and the votes do not change
    compiled = torch.compile(clf)
    with torch.inference_mode():
        t0 = time.perf_counter()
        compiled(x, level)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(3):
            compiled(x, level)
        comp = time.perf_counter() - t0
        votes = torch.randn(args.batch, 1, 28, 28)
        agree = (
            (compiled(votes, level).logits.argmax(-1) == clf(votes, level).logits.argmax(-1)).float().mean()
        )
    print(
        f"torch.compile forward / eager on this CPU: {comp / fp32:.2f}x "
        f"(first call {compile_s:.1f} s; same argmax on {100 * agree:.2f}% of {args.batch} noisy inputs)"
    )


if __name__ == "__main__":
    main()
