"""Certify a test set with a saved pipeline on every process of an ``accelerate launch``, resumably.

    accelerate launch -m rrcm_diffusers.dataset_certification --pipeline runs/rrcm/rrcm-sigma0.5/pipeline \\
        --dataset mnist --per-class 50 --sigma 0.5 --n 100000 --out runs/certify-rrcm

How the work is shared (why the certificates do not depend on the number of processes):

1. Image ``i``'s noise comes from its own generator, seeded from ``(seed, i)`` alone, and
   ``certify`` draws noise in fixed chunks whatever the batch size: image ``i`` gets the same
   certificate on rank 0 of 1 or on rank 5 of 8, with any ``--batch-size``, on any device.
2. The images not certified yet form a queue: each rank takes the next one from a counter shared
   through the process group's store (``shared_dist.next_index``), so a rank never waits behind
   another's slow image (with sequential certification an image costs 100x another). Every
   ``ROUND_SECONDS`` (and at least once per image) the ranks' finished records are gathered (a
   bounded collective of shared-dist: a rank that dies makes the others fail within
   ``SHARED_DIST_TIMEOUT``, not hang) and rank 0 appends them to ``OUT/certificates.jsonl``, one
   line per image, flushed and fsync'd. Only rank 0 writes, so several machines need no shared disk.
3. The same command again (any number of processes) reads that file and certifies only what
   is missing; ``OUT/run.json`` records what the run certifies (pipeline weights, images, σ,
   n0, n, α, seed) and a run that differs is refused rather than mixed in.
4. Rank 0 writes the report (``OUT/report/``: the format of :mod:`rrcm_diffusers.report`),
   stating processes, devices, n, α and wall time.

Splitting one image's ``n`` samples across ranks is not done: with the queue, a rank idles at most
while the others finish the image they hold at the end of a round, and per-image generators keep
the certificates exact whichever rank certifies an image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import norm
from tqdm.auto import tqdm

from shared_dist import broadcast_object, gather_object, get_rank, next_index

from ._atomic import claim_folder
from ._checks import check_int
from .certification import (
    DEFAULT_BATCH_SIZE,
    FUTILITY,
    SELECTION_LOOKS,
    CertifyResult,
    certify,
    certify_sequential,
    check_arguments,
    check_futility,
    image_generator,
    radius_thresholds,
)
from .pipeline_dds import DDSPipeline
from .pipeline_rrcm import RRCMPipeline
from .report import summary_row, write_report

RECORDS = "certificates.jsonl"
ROUND_SECONDS = 30.0  # how often finished certificates are gathered and written (a kill loses at most this)
RUN = "run.json"
PIPELINES = {"RRCMPipeline": RRCMPipeline, "DDSPipeline": DDSPipeline}


def load_pipeline(path: str | Path) -> RRCMPipeline | DDSPipeline:
    """An ``RRCMPipeline`` or ``DDSPipeline`` folder, by the class its ``model_index.json`` names."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise ValueError(f"pipeline must be a saved RRCMPipeline/DDSPipeline folder, no {index}")
    name = json.loads(index.read_text()).get("_class_name")
    name = name[-1] if isinstance(name, list) and name else name  # [custom-pipeline file, class]
    if name not in PIPELINES:
        raise ValueError(f"pipeline must be one of {sorted(PIPELINES)}, {index} names {name!r}")
    return PIPELINES[name].from_pretrained(str(path))


def _fingerprint(pipeline: Any, images: torch.Tensor, labels: torch.Tensor) -> dict[str, str]:
    """SHA-256 of every weight of the pipeline's modules, and of the images and labels."""
    weights = hashlib.sha256()
    for name, component in sorted(pipeline.components.items()):
        if isinstance(component, torch.nn.Module):
            for key, value in sorted(component.state_dict().items()):
                weights.update(f"{name}.{key}".encode())
                weights.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    data = hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes())
    data.update(labels.detach().cpu().numpy().astype(np.int64).tobytes())
    return {"weights_sha256": weights.hexdigest(), "images_sha256": data.hexdigest()}


def _run_id(run: dict[str, Any]) -> str:
    """A short hash of a run's record: every certificate line carries the one it was made under."""
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_records(out: str | Path, run_id: str | None = None) -> dict[int, dict[str, Any]]:
    """The finished images of ``OUT/certificates.jsonl`` by index. A last line cut short by a
    kill during the append (the file's own, never anything else) is cut off the file.

    Refused, with the file and line named: a damaged line before the last, two lines for one image
    that disagree, and (with ``run_id``) a line made under another run record — a ``run.json``
    edited by hand would otherwise relabel the old certificates as the new settings'."""
    path = Path(out) / RECORDS
    if not path.is_file():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    records: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(data[:end].splitlines(), start=1):
        try:
            record = json.loads(line)
            index = record["index"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}, line {number}: not a certificate record ({err}); {_FIX}") from None
        if run_id is not None and record.get("run") != run_id:
            raise ValueError(
                f"{path}, line {number}: made under another run record than {path.parent / RUN} "
                f"(run {record.get('run')!r}, the record's is {run_id!r}: edited by hand?); {_FIX}"
            )
        if index in records and records[index] != record:
            raise ValueError(
                f"{path}, line {number}: a second, different certificate for image {index}; {_FIX}"
            )
        records[index] = record
    return records


_FIX = "the file was changed outside this program: certify into another --out"


def _append(out: Path, records: list[dict[str, Any]]) -> None:
    """One write per round, flushed and fsync'd: a kill loses at most the round in flight."""
    with open(out / RECORDS, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def certify_dataset(
    pipeline: RRCMPipeline | DDSPipeline,
    images: torch.Tensor,
    labels: torch.Tensor,
    sigma: float,
    out: str | Path,
    *,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = True,
    radii: list[float] | None = None,
    futility: float | None = None,
) -> list[dict[str, Any]]:
    """Certify ``images`` (N, C, H, W) in [0, 1] across the processes of the running job.

    Every rank calls it with the same arguments; the pipeline sits on the rank's device.
    Returns, on every rank, one record per image in index order: ``index``, ``label``,
    ``prediction`` (-1: abstain), ``radius``, ``p_lower``, ``count`` and ``seconds``.
    Finished images in ``out`` are kept, never recomputed (see the module docstring). With ``radii``
    (the radii you report) each image is certified sequentially (`certify_sequential`, ``n`` the most
    samples per image) and its record carries ``samples`` and ``selection``, the estimation and selection
    samples it used; ``futility`` is then `certify_sequential`'s (default 0.05; refused without ``radii``).
    """
    # 0. every argument checked before OUT is claimed: a refused value must not leave a record
    #    that then refuses the corrected command as "another config"
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"images must be (N, C, H, W) with labels (N,), got {tuple(getattr(images, 'shape', ()))} and "
            f"{tuple(labels.shape)}"
        )
    check_arguments(images=images, sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size)
    check_int("seed", seed, 0)
    if images.shape[0]:
        pipeline._prepare(images[:1])  # the pipeline's own shape check: the wrong dataset is named here
    rank, out = get_rank(), Path(out)
    if radii is not None:
        radius_thresholds(list(radii), sigma)  # checked before the claim, like every argument
    futility = check_futility(futility, radii)
    run = {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "seed": seed, "num_images": int(images.shape[0])}
    if radii is not None:  # only then: a fixed-n run's record (and its folder) stays as before
        run["radii"] = [float(r) for r in radii]
        # the selection rule too: images certified before it stopped early are not mixed in
        run["selection_looks"] = list(SELECTION_LOOKS)
        if futility != FUTILITY:  # other certificates; at the default the record (and a resume) is as before
            run["futility"] = futility
    run.update(_fingerprint(pipeline, images, labels))
    # 1. rank 0 claims OUT and reads what is done; every rank gets the verdict (no rank left waiting)
    done = _claim(out, run, rank)
    todo = [i for i in range(images.shape[0]) if i not in done]
    run_id = _run_id(run)  # every line carries it
    queue = broadcast_object(f"rrcm-certify/{run_id}/{time.time_ns()}")  # a new counter per call
    classifier = pipeline.base_classifier(sigma)
    settings = dict(
        sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size, radii=radii, futility=futility
    )
    bar = tqdm(total=images.shape[0], initial=len(done), disable=rank != 0 or not progress, unit="img")
    # 2. rounds: each rank takes the next image from a shared counter until ROUND_SECONDS have passed
    #    (at least one image), then the round's records meet on rank 0, which appends them
    finished_everywhere = not todo
    while not finished_everywhere:
        records, start, exhausted = [], time.monotonic(), False
        while not records or time.monotonic() - start < ROUND_SECONDS:
            k = next_index(queue)
            if k >= len(todo):
                exhausted = True
                break
            i = todo[k]
            record = _certify_one(
                classifier,
                pipeline._prepare(images[i : i + 1]),
                i,
                int(labels[i]),
                image_generator(seed, i),
                settings,
            )
            records.append({**record, "run": run_id})
        gathered = gather_object((records, exhausted))
        finished = [r for rank_records, _ in gathered for r in rank_records]
        if rank == 0:
            _append(out, finished)
            bar.update(len(finished))
        done.update({r["index"]: r for r in finished})
        finished_everywhere = all(e for _, e in gathered)
    bar.close()
    return [done[i] for i in range(images.shape[0])]


def _claim(out: Path, run: dict[str, Any], rank: int) -> dict[int, dict[str, Any]]:
    """Rank 0 claims ``out`` for ``run`` and reads the records already there; every rank gets them,
    or the same error (a rank that raised alone would leave the others waiting)."""
    verdict = None
    if rank == 0:
        try:
            hint = "use another --out, or the same settings to resume it"
            claim_folder(out / RUN, run, (out / RECORDS).exists(), hint=hint)
            verdict = (None, read_records(out, _run_id(run)))
        except ValueError as err:  # never read (or cut) a file not ours
            verdict = (str(err), {})
    error, done = broadcast_object(verdict)
    if error:
        raise ValueError(error)
    return done


def _certify_one(
    classifier, x: torch.Tensor, index: int, label: int, generator: torch.Generator, settings: dict[str, Any]
) -> dict[str, Any]:
    """The record of image ``index`` (x: (1, C, H, W)); ``settings``: `certify`'s sigma, n0, n, alpha
    and batch_size, and `certify_sequential`'s radii (None: fixed n) and futility."""
    start = time.perf_counter()
    settings = dict(settings)
    radii, futility = settings.pop("radii", None), settings.pop("futility", FUTILITY)
    if radii is None:
        res = certify(classifier, x, generator=generator, **settings)
    else:
        settings["n_max"] = settings.pop("n")
        res = certify_sequential(
            classifier, x, generator=generator, radii=radii, futility=futility, **settings
        )
    record = {
        "index": index,
        "label": label,
        "prediction": int(res.predictions[0]),
        "radius": float(res.radii[0]),
        "p_lower": float(res.p_lower[0]),
        "count": int(res.counts[0]),
        "seconds": time.perf_counter() - start,
    }
    if res.samples is not None:
        record["samples"], record["selection"] = int(res.samples[0]), int(res.selection[0])
    return record


def report_row(
    records: list[dict[str, Any]], method: str, sigma: float, n0: int, n: int, alpha: float
) -> dict:
    """The report's row for one method and σ, from the per-image records."""
    result = CertifyResult(
        predictions=torch.tensor([r["prediction"] for r in records], dtype=torch.long),
        radii=torch.tensor([r["radius"] for r in records], dtype=torch.float64),
        p_lower=torch.tensor([r["p_lower"] for r in records], dtype=torch.float64),
        counts=torch.tensor([r["count"] for r in records], dtype=torch.long),
        samples=(
            torch.tensor([r["samples"] for r in records], dtype=torch.long)
            if records and "samples" in records[0]
            else None  # fixed-n CERTIFY: n each
        ),
        selection=(
            torch.tensor([r["selection"] for r in records], dtype=torch.long)
            if records and "selection" in records[0]
            else None  # CERTIFY's selection: n0 each
        ),
    )
    labels = torch.tensor([r["label"] for r in records], dtype=torch.long)
    seconds = sum(r["seconds"] for r in records)  # compute time, summed over processes
    return summary_row(method, sigma, result, labels, n0=n0, n=n, alpha=alpha, seconds=seconds)


def _device_name(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else str(device)  # accelerate says cpu:0 under DDP


def main(argv: list[str] | None = None) -> None:
    """``rrcm-certify``: parse (`rrcm_diffusers.cli`), then certify."""
    from .cli import certify_parser

    parser = certify_parser()
    run_cli(parser, parser.parse_args(argv))


def run_cli(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from .data import load_dataset, strided_class_subset

    if args.futility is not None and args.radii is None:
        parser.error("--futility applies only to sequential certification: give --radii as well")
    state = Accelerator()  # the process group accelerate launch set up (or one process)
    images, labels = load_dataset(args.dataset, "test", args.data_dir)
    if args.per_class is not None:
        keep = strided_class_subset(labels, args.per_class)
        images, labels = images[keep], labels[keep]
    if args.num_images is not None:
        if args.num_images > images.shape[0]:
            parser.error(f"--num-images {args.num_images}: the selection holds only {images.shape[0]} images")
        images, labels = images[: args.num_images], labels[: args.num_images]
    pipeline = load_pipeline(args.pipeline).to(state.device)
    pipeline.set_progress_bar_config(disable=True)  # the bar is per image, on rank 0
    start = time.perf_counter()
    records = certify_dataset(
        pipeline, images.float() / 255, labels, args.sigma, args.out,
        n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch_size, seed=args.seed,
        progress=not args.no_progress, radii=args.radii, futility=args.futility,
    )  # fmt: skip
    wall = time.perf_counter() - start
    devices = sorted(set(gather_object(_device_name(state.device))))  # every rank takes part
    if state.is_main_process:
        name = args.name or Path(args.pipeline).name
        row = report_row(records, name, args.sigma, args.n0, args.n, args.alpha)
        row.update(processes=state.num_processes, devices=", ".join(devices), wall_s=round(wall, 1))
        notes = (
            f"{len(records)} {args.dataset} test images; {state.num_processes} processes on {row['devices']}; "
            f"n0 = {args.n0}, n = {args.n}, α = {args.alpha}; wall time of this invocation {wall:.1f} s "
            f"(with n = {args.n} no radius exceeds σ·Φ⁻¹(α^(1/n)) = {args.sigma * norm.ppf(args.alpha ** (1 / args.n)):.3f})"
        )
        write_report([row], Path(args.out) / "report", f"{name}: certified accuracy", notes)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("r=")}))
    # close the process group, as torch asks of every process before exit (the SIGABRT some finished
    # runs met at exit came from garbage freed during finalization: shared_dist collects it at exit)
    state.wait_for_everyone()
    state.end_training()


if __name__ == "__main__":
    main()
