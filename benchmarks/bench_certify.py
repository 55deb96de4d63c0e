"""Certification cost: rRCM vs Cohen vs DDS per noise sample, the pipeline's overhead, bf16.

One run on this machine, the model of an experiment config (default
examples/rrcm/configs/mnist_main.yaml, the main job's; weights do not change the cost, so fresh models are used;
the image shape and the DDS UNet follow the config's dataset: 1x28x28 MNIST, 3x32x32 CIFAR-10).
Every round times, in a rotating order: RRCMPipeline.certify, a bare batched forward of the same
model over the same number of samples (inputs drawn beforehand), DDS certify (``--dds-images``
images; the cost per sample is what counts), and a forward in fp32 and under bf16 autocast.
Prints the machine, median [min, max] over ``--rounds`` rounds, and:

* FLOPs per noise sample (torch.utils.flop_counter) and wall time per noise sample, rRCM (one ViT
  pass), Cohen (the same backbone, so the same cost) and DDS (one UNet pass + one classifier
  pass); ratio DDS / rRCM (target >= 20x);
* certify vs the bare forward, per round (target overhead <= 5%);
* achieved GFLOP/s of certify against this machine's fp32 (and bf16) GEMM peak, measured here;
* bf16 autocast vs fp32 forward, and how many certificates change with it (off by default);
* with ``--compile``, torch.compile vs eager.

    python benchmarks/bench_certify.py [--config examples/rrcm/configs/mnist_p7.yaml] [--rounds 5]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings

import torch
from _common import classifier_kwargs, interleave, machine, ratios, spread
from diffusers import DDPMScheduler
from torch.utils.flop_counter import FlopCounterMode


def gemm_peak(
    dtype: torch.dtype, max_size: int = 2048, reps: int = 5, budget_s: float = 0.05
) -> tuple[float, int]:
    """GFLOP/s of a square matmul on this machine (the ceiling for a transformer's forward), and the size.

    The size doubles from 256 while one product takes under ``budget_s``: a dtype this CPU has no
    instructions for can run 400x slower (one 2048^2 bf16 product took 57 s on an AVX2-only EPYC)."""
    size = 256
    while True:
        product = functools.partial(torch.matmul, *torch.randn(2, size, size, dtype=dtype))
        product()  # warm-up
        if size >= max_size or _timed(product) > budget_s:
            break
        size *= 2
    best = min(_timed(product) for _ in range(reps))
    return 2 * size**3 / best / 1e9, size


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--dds-images", type=int, default=1)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (first call ~20 s)")
    parser.add_argument("--config", default="examples/rrcm/configs/mnist_main.yaml")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from rrcm_diffusers import RRCMModel, RRCMPipeline
    from rrcm_diffusers.experiment import cm_scheduler
    from rrcm_diffusers.pipeline_dds import DDSPipeline, small_unet
    from rrcm_diffusers.trajectory import noise_level_for_sigma

    print(machine())
    torch.manual_seed(0)
    kw, shape = classifier_kwargs(args.config)
    print(f"model: {kw}, images {shape} ({args.config})")
    clf = RRCMModel(**kw).eval()
    rrcm = RRCMPipeline(model=clf, scheduler=cm_scheduler())
    dds = DDSPipeline(
        unet=small_unet(shape[-1], shape[0]).eval(),
        scheduler=DDPMScheduler(num_train_timesteps=1000),
        classifier=RRCMModel(**kw).eval(),
    )
    for p in (rrcm, dds):
        p.set_progress_bar_config(disable=True)
    sigma, n0 = 0.5, 100
    images = torch.rand(args.images, *shape)

    def flops(f) -> float:
        # grad enabled: nn.TransformerEncoderLayer's inference fast path is invisible to the counter
        x = torch.rand(100, *shape)
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            f(x)
        return counter.get_total_flops() / 100

    def certify_time(pipe, imgs, **kwargs) -> float:
        seed = torch.Generator().manual_seed(0)
        t = _timed(
            lambda: pipe.certify(
                imgs, sigma, n0=n0, n=args.n, batch_size=args.batch, generator=seed, **kwargs
            )
        )
        return 1000 * t / (len(imgs) * (n0 + args.n))  # ms per noise sample

    # the bare loop: the same model, the same batch sizes, inputs drawn beforehand, nothing else
    level = noise_level_for_sigma(sigma, rrcm.scheduler.config.num_train_timesteps)
    batch_sizes = [min(args.batch, n0 - s) for s in range(0, n0, args.batch)]
    batch_sizes += [min(args.batch, args.n - s) for s in range(0, args.n, args.batch)]
    xs = {b: torch.randn(b, *shape) for b in set(batch_sizes)}

    @torch.inference_mode()
    def bare_time() -> float:
        t0 = time.perf_counter()
        for _ in range(args.images):
            for b in batch_sizes:
                clf(xs[b], level).logits.argmax(-1)
        return 1000 * (time.perf_counter() - t0) / (args.images * (n0 + args.n))

    x = torch.rand(args.batch, *shape)

    @torch.inference_mode()
    def forward_time(dtype: torch.dtype | None) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            return 1000 * min(_timed(lambda: clf(x, level)) for _ in range(3)) / args.batch

    f_rrcm, f_dds = flops(rrcm.base_classifier(sigma)), flops(dds.base_classifier(sigma))
    for pipe in (rrcm, dds):
        pipe.certify(images[:1], sigma, n0=10, n=args.batch, batch_size=args.batch)  # warm-up
    bare_time(), forward_time(None), forward_time(torch.bfloat16)
    t = interleave(
        {
            "rrcm": lambda: certify_time(rrcm, images),
            "bare": bare_time,
            "dds": lambda: certify_time(dds, images[: args.dds_images]),
            "fp32": lambda: forward_time(None),
            "bf16": lambda: forward_time(torch.bfloat16),
        },
        args.rounds,
    )
    (peak32, size32), (peak16, size16) = gemm_peak(torch.float32), gemm_peak(torch.bfloat16)
    print(
        f"per noise sample          FLOPs     wall ms, median [min, max] of {args.rounds} rounds   "
        f"(certify: n0={n0}, n={args.n}, batch {args.batch}; rRCM {args.images} images, DDS {args.dds_images})"
    )
    print(f"rRCM  (ViT)          {f_rrcm / 1e6:9.1f} M  {spread(t['rrcm'])}")
    print(f"Cohen (same ViT)     {f_rrcm / 1e6:9.1f} M  {spread(t['rrcm'])}   (same backbone, same cost)")
    print(f"DDS   (UNet + ViT)   {f_dds / 1e6:9.1f} M  {spread(t['dds'])}")
    print(
        f"DDS / rRCM: {f_dds / f_rrcm:.1f}x FLOPs, {spread(ratios(t['dds'], t['rrcm']), '.1f')}x wall time"
        "   (target >= 20x)"
    )
    overhead = [100 * (r - 1) for r in ratios(t["rrcm"], t["bare"])]
    print(
        f"pipeline certify vs bare forward, per round: overhead {spread(overhead, '+.1f')} %   (target <= 5%)"
    )
    achieved = [f_rrcm / (ms / 1000) / 1e9 for ms in t["rrcm"]]
    print(
        f"certify achieves {spread(achieved, '.1f')} GFLOP/s; this machine's GEMM peak (measured now): "
        f"fp32 {peak32:.1f} ({size32}^2), bf16 {peak16:.1f} ({size16}^2) GFLOP/s -> "
        f"{statistics.median(achieved) / peak32:.0%} of fp32 peak"
    )

    # bf16 autocast: how much faster here, and how many certificates it changes
    speed = ratios(t["bf16"], t["fp32"])
    seed = dict(n0=n0, n=args.n, batch_size=args.batch)
    a = rrcm.certify(images, sigma, generator=torch.Generator().manual_seed(1), **seed)
    b = rrcm.certify(
        images, sigma, generator=torch.Generator().manual_seed(1), autocast_dtype=torch.bfloat16, **seed
    )
    same = (a.predictions == b.predictions).float().mean().item()
    print(
        f"bf16 autocast forward / fp32: {spread(speed, '.2f')}x (< 1: faster here); same prediction on "
        f"{same:.0%} of {len(images)} images, radii differ by at most {(a.radii - b.radii).abs().max():.4f} "
        "(opt in with autocast_dtype=torch.bfloat16; off by default so certificates do not depend on the machine)"
    )
    if args.compile:
        _compile_report(clf, x, level, forward_time(None) * args.batch / 1000, args.batch)


def _compile_report(clf, x: torch.Tensor, level: float, eager_s: float, batch: int) -> None:
    """torch.compile (inductor) on this CPU: worth it only if faster and the votes do not change."""
    compiled = torch.compile(clf)
    with torch.inference_mode():
        first = _timed(lambda: compiled(x, level))
        comp = min(_timed(lambda: compiled(x, level)) for _ in range(3))
        votes = torch.randn_like(x)
        agree = (
            (compiled(votes, level).logits.argmax(-1) == clf(votes, level).logits.argmax(-1)).float().mean()
        )
    print(
        f"torch.compile forward / eager on this CPU: {comp / eager_s:.2f}x "
        f"(first call {first:.1f} s; same argmax on {100 * agree:.2f}% of {batch} noisy inputs)"
    )


if __name__ == "__main__":
    main()
