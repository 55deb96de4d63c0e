"""A small trainer for both rRCM stages, on accelerate (1 CPU process to many GPUs).

Your own loop can use the loss modules directly; these functions are that loop written
once, with EMA, grad clipping after warmup, skipping of non-finite steps, periodic
checkpoints (safetensors + JSON, no pickle), resume, progress bars and a JSONL log.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.optimization import get_cosine_schedule_with_warmup
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Sampler, TensorDataset
from tqdm.auto import tqdm

import shared_dist

from ._atomic import write_text_atomic
from .augment import light_view, strong_view
from .data import to_model_space
from .losses import RRCMFinetuningLoss, RRCMPretrainingLoss, ema_rate, update_ema
from .modeling_rrcm import RRCMModel
from .pipeline_rrcm import RRCMPipeline, write_model_card
from .trajectory import grid_sigma_for_sigma, icm_num_scales, sample_grid_index


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
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0


# ----------------------------------------------------------------------------- checkpoints


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Optimizer state as safetensors (tensors) + JSON (everything else)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(
        json.dumps({"param_groups": state["param_groups"], "scalars": scalars})
    )


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    meta = json.loads(path.with_suffix(".json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, v in load_file(str(path.with_suffix(".safetensors"))).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _save_checkpoint(
    out: Path,
    step: int,
    accelerator: Accelerator,
    models: dict,
    optimizer,
    scheduler,
    generator: torch.Generator | None = None,
) -> None:
    """``out/checkpoint-<step>``, written whole or not at all: everything goes into
    ``checkpoint-<step>.tmp`` first, which is renamed when complete (a kill leaves only a
    ``.tmp`` folder, which resume ignores). ``generator``: every rank's state is kept, so a
    resumed run draws the same noise as an uninterrupted one."""
    states = shared_dist.gather_object(generator.get_state()) if generator is not None else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
        if tmp.exists():  # our own leftover from a killed save
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name, model in models.items():
            accelerator.unwrap_model(model).save_pretrained(tmp / name)
        save_optimizer(optimizer, tmp / "optimizer")
        if states is not None:
            save_file({f"rank{r}": s for r, s in enumerate(states)}, str(tmp / "rng_states.safetensors"))
        (tmp / "trainer_state.json").write_text(
            json.dumps(
                {"step": step, "scheduler": scheduler.state_dict(), "world_size": accelerator.num_processes}
            )
        )
        if final.exists():  # a checkpoint of this step from before a resume: replaced whole
            old = out / f"checkpoint-{step}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()


def _load_pretrain_checkpoint(out: Path, model, target, optimizer, scheduler) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads completely; a damaged one is skipped with a warning."""
    for ckpt in _checkpoints(out):
        try:
            online_state = RRCMModel.from_pretrained(ckpt / "online").state_dict()
            target_state = RRCMModel.from_pretrained(ckpt / "target").state_dict()
            state = json.loads((ckpt / "trainer_state.json").read_text())
            model.load_state_dict(online_state)
            target.load_state_dict(target_state)
            load_optimizer(optimizer, ckpt / "optimizer")
            scheduler.load_state_dict(state["scheduler"])
            return ckpt, state
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            warnings.warn(f"skipping checkpoint {ckpt}: it does not load ({err})", stacklevel=3)
    return None


def _trim_log(out: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint a run resumes from)."""
    log = out / "log.jsonl"
    if log.is_file():
        keep = [line for line in log.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        write_text_atomic(log, "".join(line + "\n" for line in keep))


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


def _checkpoints(out: str | Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders, newest first; other names (``checkpoint-8.bak``, a
    ``checkpoint-8.tmp`` left by a killed save) are not checkpoints of this trainer."""
    ckpts = [p for p in Path(out).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def latest_checkpoint(out: str | Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step."""
    ckpts = _checkpoints(out)
    return ckpts[0] if ckpts else None


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


# ----------------------------------------------------------------------------- pretraining


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
    if config.steps < 0:
        raise ValueError(f"config.steps must be >= 0, got {config.steps}")
    accelerator = accelerator or Accelerator()
    out = Path(output_dir) if output_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if model.projector is None:
        raise ValueError("pretraining needs a projector: build the model with projection_dim > 0")
    target = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    start, ckpt = 0, None
    loaded = _load_pretrain_checkpoint(out, model, target, optimizer, scheduler) if (out and resume) else None
    if loaded is not None:
        ckpt, state = loaded
        start = state["step"]
        if accelerator.is_main_process:
            _trim_log(out, start)
    loader = DataLoader(
        TensorDataset(images),
        batch_size=config.batch_size,
        sampler=EpochShuffle(len(images), config.seed),
        drop_last=True,
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    target.to(accelerator.device)
    loss_fn = RRCMPretrainingLoss(
        config.tau, config.instance_weight, config.consistency_weight, config.symmetric_instance
    )
    # noise and augmentations differ per rank (different images), the grid index does not
    gen = torch.Generator(device=accelerator.device).manual_seed(
        config.seed * 1000 + accelerator.process_index
    )
    if ckpt is not None:
        rng = ckpt / "rng_states.safetensors"
        if rng.is_file() and state.get("world_size") == accelerator.num_processes:
            gen.set_state(load_file(str(rng))[f"rank{accelerator.process_index}"])
        else:  # an older checkpoint, or another number of processes: resumes, but not bit-exactly
            warnings.warn(
                f"{ckpt} holds no generator state for this run; the noise after resume differs", stacklevel=2
            )
            gen.manual_seed(config.seed * 1000 + accelerator.process_index + start)
    history: list[dict] = []
    bar = tqdm(
        range(start, config.steps), disable=not (progress and accelerator.is_main_process), desc="pretrain"
    )
    batches = _batches(loader, start, config.batch_size, accelerator.num_processes)
    model.train()
    target.train()
    for step in bar:
        (batch,) = next(batches)
        # 1. grid size for this step (icm doubling) and one shared index
        num_scales = icm_num_scales(step, config.steps, config.icm_s0, config.icm_s1)
        n = sample_grid_index(num_scales, gen)
        # 2. views
        x = to_model_space(batch)
        views = (
            light_view(x, config.augment, gen),
            strong_view(x, config.augment, gen),
            strong_view(x, config.augment, gen),
        )
        # 3. loss and update; a non-finite gradient norm skips the step on every rank alike
        losses = loss_fn(model, target, *views, grid_index=n, num_scales=num_scales, generator=gen)
        accelerator.backward(losses["loss"])
        clip = config.grad_clip if step >= config.warmup_steps else math.inf
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
        skipped = not torch.isfinite(torch.as_tensor(grad_norm)).item()
        if not skipped:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # 4. EMA target
        rate = ema_rate(step, config.steps, config.ema_start, config.ema_end, schedule=config.ema_schedule)
        if not skipped:
            update_ema(target, accelerator.unwrap_model(model), rate)
        record = {
            "step": step + 1,
            "N": num_scales,
            "n": n,
            "ema": rate,
            "skipped": skipped,
            "grad_norm": float(grad_norm),
            **{k: float(v.detach()) for k, v in losses.items()},
        }
        history.append(record)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                inst=f"{record['instance']:.3f}",
                cons=f"{record['consistency']:.3f}",
                N=num_scales,
            )
            _log(out, accelerator, record, "pretrain", step + 1)
        if out is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            _save_checkpoint(
                out, step + 1, accelerator, {"online": model, "target": target}, optimizer, scheduler, gen
            )
    online = accelerator.unwrap_model(model)
    if out is not None and start < config.steps:
        _save_checkpoint(
            out, config.steps, accelerator, {"online": model, "target": target}, optimizer, scheduler, gen
        )
    return online, target, history


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
    if model.classifier is None:
        raise ValueError("finetune needs a classifier head: use model.for_classification(num_classes)")
    _check_images(images)
    k = model.classifier.out_features
    if (
        labels.shape != (images.shape[0],)
        or labels.dtype != torch.long
        or (labels.numel() and not (int(labels.min()) >= 0 and int(labels.max()) < k))
    ):
        raise ValueError(
            f"labels must be int64 class ids in [0, {k}) (the head's num_classes), one per image; got "
            f"{tuple(labels.shape)} {labels.dtype}"
            + (f" in [{int(labels.min())}, {int(labels.max())}]" if labels.numel() else "")
        )
    accelerator = accelerator or Accelerator()
    out = Path(output_dir) if output_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    loss_fn = RRCMFinetuningLoss(
        config.sigma, config.num_noise_samples, config.consistency_weight, config.entropy_weight
    )
    gen = torch.Generator(device=accelerator.device).manual_seed(
        config.seed * 1000 + accelerator.process_index
    )
    history: list[dict] = []
    phases = [("probe", config.probe_steps), ("finetune", config.steps)]
    done = 0  # steps of the phases before, so that the trackers' step keeps growing
    for phase, steps in phases:
        if steps <= 0:
            continue
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
            TensorDataset(images, labels),
            batch_size=config.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(config.seed + (phase == "finetune")),
        )
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        model.train()
        batches = _batches(loader, 0, config.batch_size, accelerator.num_processes)
        bar = tqdm(range(steps), disable=not (progress and accelerator.is_main_process), desc=phase)
        for step in bar:
            x, y = next(batches)
            losses = loss_fn(model, to_model_space(x), y, generator=gen)
            accelerator.backward(losses["loss"])
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            if torch.isfinite(torch.as_tensor(grad_norm)).item():
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"phase": phase, "step": step + 1, **{k: float(v.detach()) for k, v in losses.items()}}
            history.append(record)
            if (step + 1) % config.log_every == 0 or step + 1 == steps:
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}")
                _log(out, accelerator, record, phase, done + step + 1)
            if out is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                _save_checkpoint(out / phase, step + 1, accelerator, {"model": model}, optimizer, scheduler)
        done += steps
    model = accelerator.unwrap_model(model)
    model.requires_grad_(True)
    if out is not None and accelerator.is_main_process:
        RRCMPipeline(model=model).save_pretrained(out / "final")
        write_model_card(
            out / "final",
            sigma=config.sigma,
            data=data or f"{images.shape[0]} images of shape {tuple(images.shape[1:])}",
            steps={"linear probe": config.probe_steps, "fine-tuning": config.steps},
        )
        (out / "finetune_config.json").write_text(json.dumps(asdict(config)))
    return model, history


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def extract_features(
    model: RRCMModel, images: torch.Tensor, sigma: float | None, batch_size: int = 256, seed: int = 0
) -> torch.Tensor:
    """LN(CLS) features of uint8 images, with smoothing noise σ (pixel space) or clean (None)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    level = grid_sigma_for_sigma(sigma) if sigma else 0.002
    feats = []
    for chunk in images.split(batch_size):
        x = to_model_space(chunk)
        if sigma:
            x = x + 2 * sigma * torch.randn(x.shape, generator=gen)
        feats.append(model(x.to(model.device), level).features.float().cpu())
    return torch.cat(feats)


def linear_probe_accuracy(
    model: RRCMModel,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    sigma: float | None,
    steps: int = 300,
    seed: int = 0,
) -> float:
    """Accuracy of a linear classifier trained on frozen (noisy) features of ``train``, on ``test``."""
    torch.manual_seed(seed)
    f_tr, f_te = (
        extract_features(model, train[0], sigma, seed=seed),
        extract_features(model, test[0], sigma, seed=seed + 1),
    )
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
    head = torch.nn.Linear(f_tr.shape[1], int(train[1].max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(f_tr), train[1]).backward()
        opt.step()
    return (head(f_te).argmax(1) == test[1]).float().mean().item()


@torch.no_grad()
def noisy_accuracy(
    model: RRCMModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    sigma: float | None,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Top-1 accuracy of the classifier on one noisy copy per image (σ in pixel space)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    level = grid_sigma_for_sigma(sigma) if sigma else 0.002
    correct = 0
    for xb, yb in zip(images.split(batch_size), labels.split(batch_size)):
        x = to_model_space(xb)
        if sigma:
            x = x + 2 * sigma * torch.randn(x.shape, generator=gen)
        correct += (model(x.to(model.device), level).logits.argmax(1).cpu() == yb).sum().item()
    return correct / len(labels)
