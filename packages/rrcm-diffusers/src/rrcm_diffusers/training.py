"""A small trainer for both rRCM stages, on accelerate (1 CPU process to many GPUs).

Your own loop can use the loss modules directly; these functions are that loop written
once, with EMA, grad clipping after warmup, skipping of non-finite steps, periodic
checkpoints (safetensors + JSON, no pickle), resume, progress bars and a JSONL log.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.utils.data import DataLoader, Sampler, TensorDataset
from tqdm.auto import tqdm

from ._atomic import claim_folder
from ._checks import check_choice, check_int, check_real, check_sigma
from .augment import check_classifier_augment, classifier_view, light_view, strong_view
from .checkpointing import (  # noqa: F401  (save/load_optimizer, latest_checkpoint: their old home)
    checkpoints,
    latest_checkpoint,
    load_newest_checkpoint,
    load_optimizer,
    restore_generator,
    save_checkpoint,
    save_optimizer,
    trim_log,
)
from .data import to_model_space
from .evaluation import extract_features, linear_probe_accuracy, noisy_accuracy  # noqa: F401  (their old home)
from .losses import RRCMFinetuningLoss, RRCMPretrainingLoss, ema_rate, update_ema
from .modeling_rrcm import RRCMModel
from .pipeline_rrcm import RRCMPipeline, write_model_card
from .trajectory import icm_num_scales, sample_grid_index


@dataclass
class PretrainConfig:
    steps: int = 300
    batch_size: int = 64  # per process
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    grad_clip: float = 3.0  # applied after warmup
    ema_start: float = 0.99
    ema_end: float = 0.9999
    ema_schedule: str = "sigmoid"  # or "authors" (their code's concave schedule; see ema_rate)
    tau: float = 0.2
    instance_weight: float = 1.0
    consistency_weight: float = 1.0
    symmetric_instance: bool = True  # False: a→b only, as the authors' code
    icm_s0: int = 20
    icm_s1: int = 80
    augment: str = "grey"  # "grey" for digits, "rgb" for colour images
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Every field, at construction and again when training starts (a field set later is checked
        too): log_every=0 was a ZeroDivisionError in the loop, a float step count a TypeError."""
        for name, minimum in [("steps", 0), ("batch_size", 1), ("warmup_steps", 0), ("icm_s0", 1),
                              ("icm_s1", 1), ("seed", 0), ("log_every", 1), ("checkpoint_every", 0)]:  # fmt: skip
            check_int(f"PretrainConfig.{name}", getattr(self, name), minimum)
        check_real("PretrainConfig.lr", self.lr, 0.0, low_open=True)
        check_real("PretrainConfig.tau", self.tau, 0.0, low_open=True)
        check_real("PretrainConfig.grad_clip", self.grad_clip, 0.0, low_open=True)
        for name in ("weight_decay", "instance_weight", "consistency_weight"):
            check_real(f"PretrainConfig.{name}", getattr(self, name))
        for name in ("ema_start", "ema_end"):
            check_real(f"PretrainConfig.{name}", getattr(self, name), 0.0, 1.0)
        check_choice("PretrainConfig.ema_schedule", self.ema_schedule, ("sigmoid", "authors"))
        check_choice("PretrainConfig.augment", self.augment, ("grey", "rgb"))
        if not isinstance(self.symmetric_instance, bool):
            raise ValueError(
                f"PretrainConfig.symmetric_instance must be a bool, got {self.symmetric_instance!r}"
            )


@dataclass
class FinetuneConfig:
    sigma: float = 0.5
    probe_steps: int = 100
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    probe_lr: float = 1e-2
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    warmup_steps: int = 30
    num_noise_samples: int = 2
    consistency_weight: float | None = None  # λ: 10 for σ = 0.25, 20 for σ >= 0.5
    entropy_weight: float = 0.5
    grad_clip: float = 3.0
    augment: str = "none"  # "crop_flip" for CIFAR-10: pad-4 random crop + horizontal flip
    seed: int = 0
    log_every: int = 10
    # no checkpoint_every: fine-tuning is short next to pretraining and does not resume; the same
    # call again (after a kill) starts over in the same folder, its log with it

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Every field, at construction and again when fine-tuning starts."""
        check_sigma(self.sigma, "FinetuneConfig.sigma")
        for name, minimum in [("probe_steps", 0), ("steps", 0), ("batch_size", 1), ("warmup_steps", 0),
                              ("num_noise_samples", 1), ("seed", 0), ("log_every", 1)]:  # fmt: skip
            check_int(f"FinetuneConfig.{name}", getattr(self, name), minimum)
        for name in ("lr", "probe_lr", "grad_clip"):
            check_real(f"FinetuneConfig.{name}", getattr(self, name), 0.0, low_open=True)
        check_real("FinetuneConfig.weight_decay", self.weight_decay)
        check_real("FinetuneConfig.entropy_weight", self.entropy_weight)
        check_real("FinetuneConfig.layer_decay", self.layer_decay, 0.0, 1.0, low_open=True)
        if self.consistency_weight is not None:
            check_real("FinetuneConfig.consistency_weight", self.consistency_weight)
        check_classifier_augment(self.augment, "FinetuneConfig.augment")


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` drawn from (seed, epoch) alone: the order of epoch ``e`` is
    known without replaying epochs ``0..e-1``, so a resumed run serves the same batches."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:  # accelerate's prepared loader forwards set_epoch here
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = (
            f"{tuple(images.shape)} {images.dtype}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise ValueError(f"{name} must be a uint8 tensor (N, C, H, W) of pixels in [0, 255], got {got}")


def _batches(loader: DataLoader, start: int, batch_size: int, processes: int):
    """Endless iterator over epochs, from batch ``start`` (counted over all epochs: resume)."""
    if len(loader) == 0:  # drop_last with too few images: the epoch loop would spin forever
        raise ValueError(
            f"images: {len(loader.dataset)} images make no full batch of batch_size={batch_size} on each of "
            f"{processes} processes; pass at least {batch_size * processes} images or a smaller batch_size"
        )
    epoch, skip = divmod(start, len(loader))
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            if skip:
                skip -= 1
                continue
            yield batch
        epoch += 1


def _log(out: Path | None, accelerator: Accelerator, record: dict, prefix: str, step: int) -> None:
    """One record to ``out/log.jsonl`` and to the accelerator's trackers (``log_with=...``; a
    no-op without any). ``step`` only grows within a run, as wandb requires."""
    accelerator.log({f"{prefix}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
    if out is not None and accelerator.is_main_process:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- the loop both stages share


RUN_RECORD = "training_run.json"


def _sha256_of(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _run_dir(
    output_dir: str | Path | None, stage: str, config, model: RRCMModel, data: tuple, accelerator: Accelerator
) -> Path | None:
    """Claim ``output_dir`` for this run BEFORE anything is written to it (as the experiment's stages
    do): ``training_run.json`` records the stage, its config, the model's config and a hash of the
    data. A folder that holds another run's record — another architecture, data, seed or learning
    rate — or checkpoints with no record is refused, never overwritten nor silently resumed."""
    if not output_dir:
        return None
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} exists and is not a folder")
    # how long, and how often to log and save, may change between invocations: a longer run in the
    # same folder continues the shorter one (its first steps followed the shorter schedule)
    extendable = ("steps", "log_every", "checkpoint_every")
    key = {
        "stage": stage,
        "config": {k: v for k, v in asdict(config).items() if k not in extendable},
        "model": {k: v for k, v in model.config.items() if not k.startswith("_")},
        "data_sha256": _sha256_of(*data),
    }
    if stage == "finetune":  # no resume here: the starting weights (the pretraining) are part of the run
        backbone = [v for k, v in sorted(model.state_dict().items()) if k.startswith("backbone.")]
        key["backbone_sha256"] = _sha256_of(*backbone)
    ours = (*checkpoints(out), out / "log.jsonl", out / "final", out / "probe", out / "finetune")
    hint = "pass another output_dir (or the same settings to resume that run)"
    claim_folder(
        out / RUN_RECORD, key, any(p.exists() for p in ours), write=accelerator.is_main_process, hint=hint
    )
    accelerator.wait_for_everyone()  # no rank writes before the claim is on disk
    return out


def _rank_generator(seed: int, accelerator: Accelerator) -> torch.Generator:
    """Noise and augmentations differ per rank (each rank has other images); seeded per rank."""
    return torch.Generator(device=accelerator.device).manual_seed(seed * 1000 + accelerator.process_index)


def _progress_bar(steps: range, progress: bool, accelerator: Accelerator, desc: str) -> tqdm:
    return tqdm(steps, disable=not (progress and accelerator.is_main_process), desc=desc)


@dataclass(frozen=True)
class _Loop:
    """What a training loop carries from step to step, whole from construction; ``update`` and
    ``end_step`` are the parts of a step that pretraining and fine-tuning share."""

    accelerator: Accelerator
    model: Any  # prepared (DDP-wrapped on several processes)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    log_every: int
    out: Path | None  # the run folder: log.jsonl
    models: dict[str, Any] = field(default_factory=dict)  # saved in each checkpoint, by folder name
    checkpoint_dir: Path | None = None  # None: no checkpoints
    checkpoint_every: int = 0  # 0: none during the run
    generator: torch.Generator | None = None  # its state is saved too: exact resume
    step_offset: int = 0  # steps of earlier phases: the trackers' step only grows (wandb requires it)

    def update(self, loss: torch.Tensor, clip: float) -> tuple[float, bool]:
        """Backward, clip, step, zero. A non-finite gradient norm (of the all-reduced gradients, so
        the same on every rank) skips the update on every rank alike; the lr schedule advances
        either way. Returns (grad norm, skipped)."""
        self.accelerator.backward(loss)
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), clip)
        skipped = not torch.isfinite(torch.as_tensor(grad_norm)).item()
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm), skipped

    def end_step(
        self, record: dict, prefix: str, step: int, steps: int, bar: tqdm, show: tuple[str, ...]
    ) -> None:
        """After optimizer step ``step`` (1-based, of ``steps``): log every ``log_every`` steps and
        at the end (the bar shows the ``show`` keys of ``record``), checkpoint every ``checkpoint_every``."""
        if step % self.log_every == 0 or step == steps:
            bar.set_postfix(
                {k: f"{record[k]:.3f}" if isinstance(record[k], float) else record[k] for k in show}
            )
            _log(self.out, self.accelerator, record, prefix, self.step_offset + step)
        if self.checkpoint_dir is not None and self.checkpoint_every and step % self.checkpoint_every == 0:
            self.save(step)

    def save(self, step: int) -> None:
        save_checkpoint(
            self.checkpoint_dir,
            step,
            self.accelerator,
            self.models,
            self.optimizer,
            self.scheduler,
            self.generator,
        )


# ----------------------------------------------------------------------------- pretraining


def _resume_pretraining(
    out: Path | None, accelerator: Accelerator, models: dict, optimizer, scheduler
) -> tuple[Path, dict] | None:
    """Load ``models`` (online, target), optimizer and schedule from the newest complete checkpoint in
    ``out`` and drop the log records written after it; None when there is none (or no ``out``)."""
    loaded = load_newest_checkpoint(out, models, optimizer, scheduler) if out else None
    if loaded and accelerator.is_main_process:
        trim_log(out, loaded[1]["step"])
    return loaded


def _pretrain_step(
    loop: _Loop, config: PretrainConfig, target: RRCMModel, loss_fn: RRCMPretrainingLoss, batch, step: int
) -> dict:
    gen = loop.generator
    # 1. grid size for this step (icm doubling) and one index n shared by all ranks
    num_scales = icm_num_scales(step, config.steps, config.icm_s0, config.icm_s1)
    n = sample_grid_index(num_scales, gen)
    # 2. one light and two strong views of the batch (B, C, H, W) in [-1, 1]
    x = to_model_space(batch)
    views = (
        light_view(x, config.augment, gen),
        strong_view(x, config.augment, gen),
        strong_view(x, config.augment, gen),
    )
    # 3. loss and update; no clipping during warmup
    losses = loss_fn(loop.model, target, *views, grid_index=n, num_scales=num_scales, generator=gen)
    grad_norm, skipped = loop.update(
        losses["loss"], config.grad_clip if step >= config.warmup_steps else math.inf
    )
    # 4. EMA target, from the updated online network
    rate = ema_rate(step, config.steps, config.ema_start, config.ema_end, schedule=config.ema_schedule)
    if not skipped:
        update_ema(target, loop.accelerator.unwrap_model(loop.model), rate)
    losses = {k: float(v.detach()) for k, v in losses.items()}
    return {
        "step": step + 1,
        "N": num_scales,
        "n": n,
        "ema": rate,
        "skipped": skipped,
        "grad_norm": grad_norm,
        **losses,
    }


def pretrain(
    model: RRCMModel,
    images: torch.Tensor,
    config: PretrainConfig,
    accelerator: Accelerator | None = None,
    output_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> tuple[RRCMModel, RRCMModel, list[dict]]:
    """Pretrain ``model`` on uint8 ``images`` (N, C, H, W). Returns (online, ema target, history).

    With ``output_dir``, checkpoints go to ``output_dir/checkpoint-<step>`` and training
    resumes from the latest one when ``resume`` is true.
    """
    _check_images(images)
    config.check()
    if model.projector is None:
        raise ValueError("pretraining needs a projector: build the model with projection_dim > 0")
    accelerator = accelerator or Accelerator()
    out = _run_dir(output_dir, "pretrain", config, model, (images,), accelerator)
    if out is not None and not resume and checkpoints(out):
        raise ValueError(
            f"output_dir {out} holds checkpoints of this run and resume=False would overwrite them; "
            "pass resume=True to continue it, or another output_dir to start over"
        )
    # 1. models, optimizer, schedule; their state from the newest complete checkpoint
    target = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    models = {"online": model, "target": target}  # saved in each checkpoint, by folder name
    loaded = _resume_pretraining(out if resume else None, accelerator, models, optimizer, scheduler)
    start = loaded[1]["step"] if loaded else 0
    # 2. data in a per-epoch order that does not depend on the epochs before it (exact resume)
    sampler = EpochShuffle(len(images), config.seed)
    loader = DataLoader(TensorDataset(images), batch_size=config.batch_size, sampler=sampler, drop_last=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    target.to(accelerator.device)
    gen = _rank_generator(config.seed, accelerator)
    if loaded:
        restore_generator(gen, *loaded, accelerator, config.seed)
    # 3. the loop; its checkpoints save `models` (prepare wraps the online model, it does not copy it)
    loop = _Loop(
        accelerator, model, optimizer, scheduler, config.log_every, out, models=models,
        checkpoint_dir=out, checkpoint_every=config.checkpoint_every, generator=gen,
    )  # fmt: skip
    loss_fn = RRCMPretrainingLoss(
        config.tau, config.instance_weight, config.consistency_weight, config.symmetric_instance
    )
    batches = _batches(loader, start, config.batch_size, accelerator.num_processes)
    bar = _progress_bar(range(start, config.steps), progress, accelerator, "pretrain")
    history: list[dict] = []
    model.train()
    target.train()
    for step in bar:
        (batch,) = next(batches)
        history.append(r := _pretrain_step(loop, config, target, loss_fn, batch, step))
        loop.end_step(r, "pretrain", step + 1, config.steps, bar, show=("loss", "instance", "consistency"))
    if out is not None and start < config.steps:
        loop.save(config.steps)
    return accelerator.unwrap_model(model), target, history


# ----------------------------------------------------------------------------- fine-tuning


def param_groups_lrd(model: RRCMModel, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with layer-wise lr decay: lr · decay^(top − layer); no decay on norms/biases/tokens."""
    top = model.num_layers - 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = model.get_layer_id(name)
        no_wd = p.ndim == 1 or name.endswith(("cls_token", "pos_embed"))
        key = (layer, no_wd)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": lr * layer_decay ** (top - layer),
                "weight_decay": 0.0 if no_wd else weight_decay,
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def _check_labels(labels: torch.Tensor, num_images: int, num_classes: int) -> None:
    if (
        labels.shape != (num_images,)
        or labels.dtype != torch.long
        or (labels.numel() and not (int(labels.min()) >= 0 and int(labels.max()) < num_classes))
    ):
        raise ValueError(
            f"labels must be int64 class ids in [0, {num_classes}) (the head's num_classes), one per image; "
            f"got {tuple(labels.shape)} {labels.dtype}"
            + (f" in [{int(labels.min())}, {int(labels.max())}]" if labels.numel() else "")
        )


def _finetune_phase(
    model: RRCMModel, phase: str, steps: int, data: tuple, config: FinetuneConfig, accelerator: Accelerator
) -> tuple[Any, torch.optim.Optimizer, Any, DataLoader]:
    """Optimizer, schedule and loader of one phase: "probe" trains the head alone, "finetune" all
    layers with layer-wise lr decay. Returns the prepared model, optimizer and loader, and the schedule."""
    model = accelerator.unwrap_model(model)
    model.backbone.requires_grad_(phase == "finetune")  # before prepare: DDP sees the right params
    if phase == "probe":
        optimizer = torch.optim.AdamW(model.classifier.parameters(), lr=config.probe_lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(
            param_groups_lrd(model, config.lr, config.weight_decay, config.layer_decay)
        )
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, steps // 10), steps)
    loader = DataLoader(
        TensorDataset(*data),  # (images, labels)
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(config.seed + (phase == "finetune")),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return model, optimizer, scheduler, loader


def finetune(
    model: RRCMModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: FinetuneConfig,
    accelerator: Accelerator | None = None,
    output_dir: str | Path | None = None,
    progress: bool = True,
    data: str | None = None,
) -> tuple[RRCMModel, list[dict]]:
    """Linear probe (backbone frozen, ``probe_steps``), then full fine-tuning with the head
    trainable and layer-wise lr decay (``steps``), on 2σ-noisy copies with the consistency loss.

    ``model`` must have a classifier (``RRCMModel.for_classification``). With ``output_dir``,
    ends with ``output_dir/final``: an :class:`RRCMPipeline` folder (``RRCMPipeline.from_pretrained``)
    with a model card stating σ, ``data`` (a description of the training images) and the steps.
    """
    # 1. inputs checked and the run folder claimed, before any step
    if model.classifier is None:
        raise ValueError("finetune needs a classifier head: use model.for_classification(num_classes)")
    _check_images(images)
    _check_labels(labels, images.shape[0], model.classifier.out_features)
    config.check()
    accelerator = accelerator or Accelerator()
    out = _run_dir(output_dir, "finetune", config, model, (images, labels), accelerator)
    if out is not None and accelerator.is_main_process:
        trim_log(out, 0)  # a run started again starts over: no records of the killed one stay
    loss_fn = RRCMFinetuningLoss(
        config.sigma, config.num_noise_samples, config.consistency_weight, config.entropy_weight
    )
    gen = _rank_generator(config.seed, accelerator)
    history: list[dict] = []
    done = 0  # steps of the phases before, so that the trackers' step keeps growing
    for phase, steps in [("probe", config.probe_steps), ("finetune", config.steps)]:
        if steps <= 0:
            continue
        # 2. the phase's optimizer, schedule and loader: the head alone, then every layer
        model, optimizer, scheduler, loader = _finetune_phase(
            model, phase, steps, (images, labels), config, accelerator
        )
        loop = _Loop(accelerator, model, optimizer, scheduler, config.log_every, out, step_offset=done)
        model.train()
        batches = _batches(loader, 0, config.batch_size, accelerator.num_processes)
        bar = _progress_bar(range(steps), progress, accelerator, phase)
        # 3. the steps: an augmented view (B, C, H, W) in [-1, 1], its 2σ-noisy copies inside the loss
        for step in bar:
            x, y = next(batches)
            x = classifier_view(to_model_space(x), config.augment, gen)
            losses = loss_fn(model, x, y, generator=gen)
            loop.update(losses["loss"], config.grad_clip)
            record = {"phase": phase, "step": step + 1, **{k: float(v.detach()) for k, v in losses.items()}}
            history.append(record)
            loop.end_step(record, phase, step + 1, steps, bar, show=("loss", "accuracy"))
        done += steps
    # 4. the trained classifier, and with output_dir the pipeline folder with its model card
    model = accelerator.unwrap_model(model)
    model.requires_grad_(True)
    if out is not None and accelerator.is_main_process:
        _save_final(
            out, model, config, data or f"{images.shape[0]} images of shape {tuple(images.shape[1:])}"
        )
    return model, history


def _save_final(out: Path, model: RRCMModel, config: FinetuneConfig, data: str) -> None:
    RRCMPipeline(model=model).save_pretrained(out / "final")
    steps = {"linear probe": config.probe_steps, "fine-tuning": config.steps}
    write_model_card(out / "final", sigma=config.sigma, data=data, steps=steps)
    (out / "finetune_config.json").write_text(json.dumps(asdict(config)))
