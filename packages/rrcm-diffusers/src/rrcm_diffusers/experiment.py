"""The rRCM experiment end to end: pretrain → probe → fine-tune per σ → baselines → DDS → certify.

Every stage writes its result under ``out/`` and is skipped when that result is already
there, so an interrupted run resumes where it stopped. Used by ``examples/rrcm/*.py`` and by
the project's main job; run it directly with
``accelerate launch -m rrcm_diffusers.experiment --config CONFIG --out DIR``.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from accelerate import Accelerator
from diffusers import CMStochasticIterativeScheduler, DDPMScheduler

from ._atomic import claim_folder, write_text_atomic
from ._checks import check_choice, check_int, check_sigma
from .augment import check_classifier_augment
from .certification import DEFAULT_BATCH_SIZE, check_futility
from .data import DATASETS, load_dataset, strided_class_subset
from .evaluation import linear_probe_accuracy
from .modeling_rrcm import RRCMModel
from .pipeline_dds import DDSPipeline, small_unet, train_ddpm
from .pipeline_rrcm import RRCMPipeline, write_model_card
from .report import (
    RADII,
    certify_methods,
    markdown_table,
    seed_summary,
    seed_tables,
    uncertainty_tables,
    write_report,
)
from .training import FinetuneConfig, PretrainConfig, finetune
from .training import pretrain as pretrain_encoder
from .trajectory import CERTIFY_NUM_SCALES, grid_scheduler

# ----------------------------------------------------------------------------- the config


@dataclass
class CohenConfig:
    """Cohen et al.'s Gaussian augmentation: the same classifier trained from a random init."""

    enabled: bool = True
    steps: int = 400
    batch_size: int = 64
    lr: float = 1.0e-3
    consistency: bool = False  # True: with rRCM's consistency regulariser ("Cohen+consistency")

    def finetune_config(self, sigma: float, seed: int, augment: str = "none") -> FinetuneConfig:
        return FinetuneConfig(
            sigma=sigma,
            probe_steps=0,
            steps=self.steps,
            augment=augment,
            batch_size=self.batch_size,
            lr=self.lr,
            layer_decay=1.0,
            num_noise_samples=2 if self.consistency else 1,
            consistency_weight=None if self.consistency else 0.0,
            seed=seed,
        )


@dataclass
class ScratchConfig:
    """The matched baseline: rRCM's fine-tuning (same loss, consistency included) from a random init."""

    enabled: bool = False
    steps: int | None = None  # None: pretrain.steps + finetune.steps, the optimizer steps rRCM took


@dataclass
class DDSConfig:
    """Diffusion denoised smoothing: a diffusers UNet (DDPM) + a classifier trained on clean images."""

    enabled: bool = True
    unet_steps: int = 600
    classifier_steps: int = 300
    batch_size: int = 64

    def classifier_config(self, seed: int, augment: str = "none") -> FinetuneConfig:
        return FinetuneConfig(
            sigma=1e-3,
            augment=augment,
            probe_steps=0,
            steps=self.classifier_steps,
            batch_size=self.batch_size,
            layer_decay=1.0,
            num_noise_samples=1,
            consistency_weight=0.0,
            seed=seed,
        )


@dataclass
class ProbeConfig:
    enabled: bool = True
    train_images: int = 2000
    test_images: int = 1000


@dataclass
class CertifyConfig:
    per_class: int = 10  # test images per class (strided: the CSVs are sorted by label)
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    batch_size: int = DEFAULT_BATCH_SIZE
    sequential: bool = False  # True: n is each image's most samples; it stops once its radius is decided
    futility: float | None = None  # with sequential: certify_sequential's futility level (None: 0.05)
    workers: int = 1  # threads certifying images side by side, one torch thread each (certify_methods)


def _model_defaults() -> dict[str, Any]:
    return dict(
        patch_size=4, hidden_size=96, depth=4, num_heads=4, projection_hidden_dim=256, projection_dim=64
    )


@dataclass
class ExperimentConfig:
    """Everything ``run`` reads. ``model``, ``pretrain`` and ``finetune`` are keyword arguments of
    `RRCMModel` and fields of `PretrainConfig` / `FinetuneConfig` that differ from their defaults
    (σ and the seed are set per run); the other sections are the dataclasses above."""

    dataset: str = "mnist"
    data_dir: str | None = None
    seed: int = 0
    sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    model: dict[str, Any] = field(default_factory=_model_defaults)
    pretrain: dict[str, Any] = field(
        default_factory=lambda: {"steps": 400, "batch_size": 64, "lr": 2.0e-3, "checkpoint_every": 100}
    )
    finetune: dict[str, Any] = field(
        default_factory=lambda: {"probe_steps": 100, "steps": 300, "batch_size": 64, "lr": 1.0e-3}
    )
    cohen: CohenConfig = field(default_factory=CohenConfig)
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    dds: DDSConfig = field(default_factory=DDSConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    # pretraining-loss ablations: report row name -> `PretrainConfig` fields on top of ``pretrain``,
    # e.g. {"rRCM, instance term only": {"consistency_weight": 0.0}}; each row is pretrained and
    # fine-tuned per σ exactly as rRCM is, in its own folders
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | Path | None = None) -> ExperimentConfig:
        """Each section updates the defaults one level deep. A key no stage reads is an error that
        names it, the nearest known key and ``source``: a misspelt ``certify: {nn: 10000}`` would
        otherwise run silently with the default n."""
        merged = asdict(cls())
        _check_keys("the top level", set(values), set(merged), source)
        for name, v in values.items():
            if name in _SECTIONS:
                if not isinstance(v, dict):
                    raise ValueError(f"config section {name!r} must be a mapping, got {v!r}")
                v = {**merged[name], **v}
            merged[name] = v
        for name, known in _SECTIONS.items():
            _check_keys(f"section {name!r}", set(merged[name]), known(), source)
        _check_ablations(merged["ablations"], source)
        # a bad value would otherwise surface only at fine-tuning, after the whole pretraining
        augment = merged["finetune"].get("augment", FinetuneConfig.augment)
        check_classifier_augment(augment, f"finetune.augment in {source or 'the overrides'}")
        typed = {name: _SECTION_TYPES[name](**merged[name]) for name in _SECTION_TYPES}
        cfg = cls(**{**merged, **typed})
        cfg.check_values(source)
        return cfg

    def check_values(self, source: str | Path | None = None) -> None:
        """Every value, before any stage claims a folder: a bad value named after a stage had claimed
        its folder left a record that refused the corrected command as "another config"."""
        where = f" (in {source or 'the overrides'})"
        try:
            check_choice("dataset", self.dataset, DATASETS)
            check_int("seed", self.seed, 0)
            if not isinstance(self.sigmas, (list, tuple)) or not self.sigmas:
                raise ValueError(f"sigmas must be a non-empty list of noise levels, got {self.sigmas!r}")
            for sigma in self.sigmas:
                check_sigma(sigma, "sigmas[...]")
                section_config(FinetuneConfig, self.finetune, sigma=sigma)
                if self.cohen.enabled:
                    self.cohen.finetune_config(sigma, self.seed)
            for name in [None, *self.ablations]:
                section_config(
                    PretrainConfig, self.pretrain if name is None else self.ablation_pretrain(name)
                )
            if self.dds.enabled:
                check_int("dds.unet_steps", self.dds.unet_steps, 0)
                self.dds.classifier_config(self.seed)
            if self.scratch.steps is not None:
                check_int("scratch.steps", self.scratch.steps, 1)
            for name in ("train_images", "test_images"):
                check_int(f"probe.{name}", getattr(self.probe, name), 1)
            for name in ("per_class", "n0", "n", "batch_size", "workers"):
                check_int(f"certify.{name}", getattr(self.certify, name), 1)
            if not 0 < self.certify.alpha < 1 or isinstance(self.certify.alpha, bool):
                raise ValueError(f"certify.alpha must be in (0, 1), got {self.certify.alpha!r}")
            if not isinstance(self.certify.sequential, bool):
                raise ValueError(f"certify.sequential must be true or false, got {self.certify.sequential!r}")
            if self.certify.futility is not None and not self.certify.sequential:
                raise ValueError(
                    f"certify.futility ({self.certify.futility!r}) applies only with certify.sequential: true"
                )
            if self.certify.sequential:
                try:
                    check_futility(self.certify.futility, RADII)
                except ValueError as err:
                    raise ValueError(f"certify.{err}") from None
        except (ValueError, TypeError) as err:
            raise ValueError(f"{err}{where}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def augment(self) -> str:
        """The classifiers' training augmentation (``finetune.augment``); every method trains with it."""
        return self.finetune.get("augment", FinetuneConfig.augment)

    def ablation_pretrain(self, name: str) -> dict[str, Any]:
        """The ``pretrain`` section of ablation ``name``: its overrides on top of the config's."""
        return {**self.pretrain, **self.ablations[name]}


# report rows and result folders the other methods use: an ablation may not take them
_METHOD_NAMES = {"rRCM", "Cohen", "Cohen+consistency", "scratch+consistency", "DDS"}
_METHOD_FOLDERS = {"rrcm", "cohen", "scratch"}


def _check_ablations(ablations: dict[str, Any], source: str | Path | None) -> None:
    folders: dict[str, str] = {}
    for row, overrides in ablations.items():
        if not isinstance(overrides, dict):
            raise ValueError(f"ablation {row!r} must map PretrainConfig fields to values, got {overrides!r}")
        _check_keys(f"ablation {row!r}", set(overrides), _SECTIONS["pretrain"](), source)
        folder = _slug(str(row))
        if row in _METHOD_NAMES or not folder or folder in _METHOD_FOLDERS or folder in folders:
            taken = folders.get(folder, "another method")
            raise ValueError(
                f"ablation name {row!r} in {source or 'the overrides'} needs its own report row and folder "
                f"({folder!r}-sigma*); it clashes with {taken}: choose another name"
            )
        folders[folder] = repr(row)


_SECTION_TYPES = {
    "cohen": CohenConfig,
    "scratch": ScratchConfig,
    "dds": DDSConfig,
    "probe": ProbeConfig,
    "certify": CertifyConfig,
}
_SECTIONS: dict[str, Callable[[], set[str]]] = {  # the keys each section may hold
    "model": lambda: set(inspect.signature(RRCMModel.__init__).parameters) - {"self"},
    "pretrain": lambda: {f.name for f in fields(PretrainConfig)},
    "finetune": lambda: {f.name for f in fields(FinetuneConfig)} - {"sigma"},  # σ comes from ``sigmas``
    **{name: (lambda t=t: {f.name for f in fields(t)}) for name, t in _SECTION_TYPES.items()},
}


def load_config(path: str | Path | None = None, **overrides: Any) -> ExperimentConfig:
    """The defaults, updated by a YAML file and then by ``overrides`` (each one level deep)."""
    values: dict[str, Any] = {}
    for extra in ([yaml.safe_load(Path(path).read_text())] if path else []) + [overrides]:
        for k, v in (extra or {}).items():
            values[k] = {**values[k], **v} if isinstance(v, dict) and isinstance(values.get(k), dict) else v
    return ExperimentConfig.from_dict(values, path)


def _check_keys(where: str, given: set[str], known: set[str], path: str | Path | None) -> None:
    for key in sorted(given - known):
        near = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(
            f"unknown key {key!r} in {where} of {path or 'the overrides'}{hint}; known keys: {sorted(known)}"
        )


def section_config(cls, values: dict[str, Any], **extra: Any):
    """A ``PretrainConfig``/``FinetuneConfig`` from a config section, plus ``extra`` fields."""
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; expected some of {sorted(names)}")
    return cls(**{**values, **extra})


def cm_scheduler() -> CMStochasticIterativeScheduler:
    return grid_scheduler(CERTIFY_NUM_SCALES)


# ----------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """What every stage reads: the config, the data, where results go, and the timings so far."""

    cfg: ExperimentConfig
    out: Path
    accelerator: Accelerator
    progress: bool
    x_train: torch.Tensor  # (N, C, H, W) uint8
    y_train: torch.Tensor  # (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    summary: dict[str, Any]

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return {"image_size": self.x_train.shape[-1], "in_channels": self.x_train.shape[1], **self.cfg.model}

    @property
    def data_key(self) -> dict[str, Any]:  # what every stage's results depend on
        return {"dataset": self.cfg.dataset, "seed": self.cfg.seed, "train_images": list(self.x_train.shape)}

    @property
    def pretrain_key(self) -> dict[str, Any]:
        return self.pretrain_key_for(self.cfg.pretrain)

    def pretrain_key_for(self, pretrain: dict[str, Any]) -> dict[str, Any]:
        return {**self.data_key, "model": self.cfg.model, "pretrain": pretrain}

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.summary["timings_s"][name] = round(time.perf_counter() - start, 1)


class _Baseline(NamedTuple):
    folder: str  # results in ``out/<folder>-sigma<σ>``
    stage: str  # timings key prefix
    config_for: Callable[[float], FinetuneConfig]  # σ → how it is trained
    key: dict[str, Any]  # what its results depend on, besides the data and σ


def run(
    cfg: ExperimentConfig | dict[str, Any],
    out: str | Path,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) every stage into ``out``; returns the summary (also ``out/summary.json``)."""
    cfg = cfg if isinstance(cfg, ExperimentConfig) else ExperimentConfig.from_dict(cfg)
    accelerator = accelerator or Accelerator()
    torch.manual_seed(cfg.seed)
    r = _Run(
        cfg,
        Path(out),
        accelerator,
        progress,
        *load_dataset(cfg.dataset, "train", cfg.data_dir),
        *load_dataset(cfg.dataset, "test", cfg.data_dir),
        summary={"config": cfg.to_dict(), "timings_s": {}},
    )
    with torch.device("meta"):  # the model section is checked before any folder is claimed, at no cost
        RRCMModel(**r.model_kwargs)
    # 1. pretraining along the trajectory
    online = _pretrain_stage(r)
    # 2. linear probes on noisy features: random init vs pretrained
    _probe_stage(r, online=online)
    # 3. fine-tuning per σ: rRCM from the pretrained encoder, the baselines from a random init
    methods, baselines = _train_methods(r, online=online)
    # 4. the DDS baseline: a diffusers UNet denoiser in front of a clean classifier
    _train_dds(r)
    accelerator.wait_for_everyone()
    # 5. certification of every method on one test subset, and the report
    if r.main:
        _certify_and_report(r, methods=methods, baselines=baselines)
    return r.summary


def run_seeds(
    cfg: ExperimentConfig | dict[str, Any],
    seeds: list[int],
    out: str | Path,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """``run`` once per training seed into ``out/seed{S}``, then the table over seeds.

    A seed whose ``summary.json`` was written under the same config is read back, not run again.
    Writes ``out/seeds.md`` and ``out/seeds.json`` (:func:`~rrcm_diffusers.report.seed_summary`:
    mean ± sd per method, rRCM's paired differences with 95 % t intervals over seeds) and returns
    that summary on the main process (None on the others).
    """
    cfg = cfg if isinstance(cfg, ExperimentConfig) else ExperimentConfig.from_dict(cfg)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct training seeds, at least one; got {seeds}")
    accelerator = accelerator or Accelerator()
    runs = []
    for seed in seeds:
        one = replace(cfg, seed=seed)
        done = Path(out) / f"seed{seed}" / "summary.json"
        have = json.loads(done.read_text()) if done.is_file() else {}
        if (
            have.get("config") != json.loads(json.dumps(one.to_dict(), default=str))
            or "certified" not in have
        ):
            have = run(one, done.parent, accelerator, progress)
        runs.append(have.get("certified", []))
    if not accelerator.is_main_process:
        return None
    summary = {"seeds": list(seeds), **seed_summary(runs)}
    write_text_atomic(Path(out) / "seeds.json", json.dumps(summary, indent=2))
    write_text_atomic(Path(out) / "seeds.md", seed_tables(summary))
    return summary


def _pretrain_stage(r: _Run, folder: str = "pretrain", pretrain: dict[str, Any] | None = None) -> RRCMModel:
    """The encoder pretrained with ``pretrain`` (default: the config's section) into ``out/folder``."""
    pretrain = r.cfg.pretrain if pretrain is None else pretrain
    pre_dir = r.out / folder
    claim_folder(pre_dir / "stage.json", r.pretrain_key_for(pretrain), _has_files(pre_dir), r.main)
    if (pre_dir / "online" / "config.json").is_file():
        return RRCMModel.from_pretrained(pre_dir / "online")
    torch.manual_seed(r.cfg.seed)
    augment = "grey" if r.x_train.shape[1] == 1 else "rgb"
    config = section_config(PretrainConfig, pretrain, augment=augment, seed=r.cfg.seed)
    with r.timed(folder):
        online, _, history = pretrain_encoder(
            RRCMModel(**r.model_kwargs),
            r.x_train,
            config,
            r.accelerator,
            pre_dir / "run",
            progress=r.progress,
        )
    if r.main:
        online.save_pretrained(pre_dir / "online")
        (pre_dir / "history.json").write_text(json.dumps(history))
    if folder == "pretrain":
        r.summary["pretrain_loss"] = {
            "first10": _mean(history[:10], "loss"),
            "last10": _mean(history[-10:], "loss"),
        }
        r.summary["s_per_pretrain_step"] = r.summary["timings_s"]["pretrain"] / max(len(history), 1)
    return online


def _probe_stage(r: _Run, online: RRCMModel) -> None:
    probe, path = r.cfg.probe, r.out / "probe.json"
    if not probe.enabled:
        return
    key = {**r.pretrain_key, "probe": asdict(probe), "sigmas": r.cfg.sigmas}
    claim_folder(r.out / "probe.stage.json", key, path.is_file(), r.main)
    if r.main and not path.is_file():
        torch.manual_seed(r.cfg.seed)
        random_init = RRCMModel(**r.model_kwargs)
        per_class = probe.train_images // r.num_classes, probe.test_images // r.num_classes
        train_idx = strided_class_subset(r.y_train, per_class[0])  # the CSVs are sorted by label
        test_idx = strided_class_subset(r.y_test, per_class[1])
        train, test = (r.x_train[train_idx], r.y_train[train_idx]), (r.x_test[test_idx], r.y_test[test_idx])
        probes = {
            str(s or 0.0): {
                "random_init": linear_probe_accuracy(random_init, train, test, s, seed=r.cfg.seed),
                "pretrained": linear_probe_accuracy(online, train, test, s, seed=r.cfg.seed),
            }
            for s in [None, *r.cfg.sigmas]
        }
        path.write_text(json.dumps(probes, indent=2))
    if path.is_file():
        r.summary["probe"] = json.loads(path.read_text())


def _baselines(cfg: ExperimentConfig) -> dict[str, _Baseline]:
    """The methods trained from a random init with rRCM's trainer, by report name."""
    baselines = {}
    if cfg.cohen.enabled:
        name = "Cohen+consistency" if cfg.cohen.consistency else "Cohen"
        key = {"model": cfg.model, "cohen": asdict(cfg.cohen), "augment": cfg.augment}
        baselines[name] = _Baseline(
            "cohen", "train_cohen", lambda s: cfg.cohen.finetune_config(s, cfg.seed, cfg.augment), key
        )
    if cfg.scratch.enabled:
        steps = cfg.scratch.steps or cfg.pretrain["steps"] + cfg.finetune["steps"]

        def scratch(sigma: float) -> FinetuneConfig:
            # rRCM's fine-tuning without head-only warm-up or layer-wise decay: no pretrained layers to keep
            return section_config(
                FinetuneConfig,
                cfg.finetune,
                sigma=sigma,
                seed=cfg.seed,
                steps=steps,
                probe_steps=0,
                layer_decay=1.0,
            )

        key = {"model": cfg.model, "finetune": cfg.finetune, "scratch_steps": steps}
        baselines["scratch+consistency"] = _Baseline("scratch", "train_scratch", scratch, key)
    return baselines


def _train_methods(r: _Run, online: RRCMModel) -> tuple[dict[str, dict[float, Path]], dict[str, _Baseline]]:
    """rRCM, its ablations and each baseline fine-tuned per σ; returns {method: {σ: pipeline folder}}
    and the baselines."""
    cfg = r.cfg
    methods = {"rRCM": _finetuned_rrcm(r, online, folder="rrcm", pretrain=cfg.pretrain)}
    for name in cfg.ablations:
        slug, pretrain = _slug(name), cfg.ablation_pretrain(name)
        encoder = _pretrain_stage(r, folder=f"pretrain-{slug}", pretrain=pretrain)
        methods[name] = _finetuned_rrcm(r, encoder, folder=slug, pretrain=pretrain)
    baselines = _baselines(cfg)
    for name, b in baselines.items():
        methods[name] = {
            sigma: _finetuned(
                r,
                folder=r.out / f"{b.folder}-sigma{sigma:g}",
                make=lambda: _fresh(r.model_kwargs, r.num_classes, cfg.seed),
                config=b.config_for(sigma),
                stage=f"{b.stage}_{sigma:g}",
                key={**r.data_key, **b.key, "sigma": sigma},
            )
            for sigma in cfg.sigmas
        }
    return methods, baselines


def _finetuned_rrcm(
    r: _Run, encoder: RRCMModel, *, folder: str, pretrain: dict[str, Any]
) -> dict[float, Path]:
    """``encoder`` with a new head, fine-tuned per σ into ``out/<folder>-sigma<σ>``."""
    cfg = r.cfg
    return {
        sigma: _finetuned(
            r,
            folder=r.out / f"{folder}-sigma{sigma:g}",
            make=lambda: _seeded(cfg.seed, encoder.for_classification, r.num_classes),
            config=section_config(FinetuneConfig, cfg.finetune, sigma=sigma, seed=cfg.seed),
            stage=f"finetune_{folder}_{sigma:g}",
            key={**r.pretrain_key_for(pretrain), "finetune": cfg.finetune, "sigma": sigma},
        )
        for sigma in cfg.sigmas
    }


def _slug(name: str) -> str:
    """A folder name for a report row name: "rRCM, instance term only" -> "rrcm-instance-term-only"."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def _finetuned(
    r: _Run, *, folder: Path, make: Callable[[], RRCMModel], config: FinetuneConfig, stage: str, key: dict
) -> Path:
    """``folder/pipeline``: the model ``make()`` returns, fine-tuned with ``config`` (unless there)."""
    claim_folder(folder / "stage.json", key, _has_files(folder), r.main)
    pipe_dir = folder / "pipeline"
    if not (pipe_dir / "model_index.json").is_file():
        with r.timed(stage):
            model, _ = finetune(
                make(), r.x_train, r.y_train, config, r.accelerator, folder, progress=r.progress
            )
        if r.main:
            RRCMPipeline(model=model, scheduler=cm_scheduler()).save_pretrained(pipe_dir)
        r.accelerator.wait_for_everyone()
    return pipe_dir


def _train_dds(r: _Run) -> None:
    dds, dds_dir = r.cfg.dds, r.out / "dds"
    if not dds.enabled:
        return
    key = {**r.data_key, "model": r.cfg.model, "dds": asdict(dds), "augment": r.cfg.augment}
    claim_folder(dds_dir / "stage.json", key, _has_files(dds_dir), r.main)
    if not r.main or (dds_dir / "model_index.json").is_file():
        return
    torch.manual_seed(r.cfg.seed)
    unet = small_unet(r.x_train.shape[-1], r.x_train.shape[1])
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    with r.timed("train_dds_unet"):
        train_ddpm(
            unet,
            scheduler,
            r.x_train,
            dds.unet_steps,
            dds.batch_size,
            seed=r.cfg.seed,
            progress=r.progress,
            device=r.accelerator.device,
        )
    clean = dds.classifier_config(r.cfg.seed, r.cfg.augment)
    with r.timed("train_dds_classifier"):
        model = _fresh(r.model_kwargs, r.num_classes, r.cfg.seed)
        classifier, _ = finetune(model, r.x_train, r.y_train, clean, r.accelerator, progress=r.progress)
    DDSPipeline(unet=unet, scheduler=scheduler, classifier=classifier).save_pretrained(dds_dir)


def _certify_and_report(
    r: _Run, *, methods: dict[str, dict[float, Path]], baselines: dict[str, _Baseline]
) -> None:
    cfg, cc = r.cfg, r.cfg.certify
    sub = strided_class_subset(r.y_test, cc.per_class)
    images, labels = r.x_test[sub].float() / 255.0, r.y_test[sub]  # (n, C, H, W) in [0, 1], (n,)
    table = {name: (lambda s, p=paths: _pipeline(p[s]).base_classifier(s)) for name, paths in methods.items()}
    if cfg.dds.enabled:
        table["DDS"] = DDSPipeline.from_pretrained(r.out / "dds").base_classifier
    with r.timed("certify"):
        rows = certify_methods(
            table,
            images,
            labels,
            cfg.sigmas,
            n0=cc.n0,
            n=cc.n,
            alpha=cc.alpha,
            batch_size=cc.batch_size,
            seed=cfg.seed,
            progress=r.progress,
            sequential=cc.sequential,
            futility=cc.futility,
            workers=cc.workers,
        )
    how = (
        f"sequential CERTIFY n0={cc.n0}, n_max={cc.n} (each image's selection stops once its leading class is "
        "clear, and its sampling once its radius on the table's grid is decided: forward_passes and samples_* "
        "in results.csv" + ("" if cc.futility is None else f"; futility {cc.futility}") + ")"
        if cc.sequential
        else f"CERTIFY n0={cc.n0}, n={cc.n}"
    )
    notes = (
        f"{cfg.dataset} test, {len(labels)} images ({cc.per_class} per class, strided), "
        f"{how}, alpha={cc.alpha}; noise in [0, 1] pixel space."
    )
    paths = write_report(rows, r.out / "report", f"Certified accuracy (%) — {cfg.dataset}", notes)
    _write_model_cards(r, rows, methods["rRCM"])
    r.summary["certified"] = rows
    r.summary["budgets"] = _budgets(cfg, r.summary["timings_s"], baselines)
    r.summary["report"] = {k: str(v) for k, v in paths.items()}
    r.summary["table_md"] = markdown_table(rows) + uncertainty_tables(rows)
    write_text_atomic(r.out / "summary.json", json.dumps(r.summary, indent=2, default=str))


def _write_model_cards(r: _Run, rows: list[dict[str, Any]], folders: dict[float, Path]) -> None:
    """Each rRCM pipeline folder gets a model card with the certified accuracy just measured."""
    steps = {
        "pretraining": r.cfg.pretrain.get("steps", 0),
        "linear probe": r.cfg.finetune.get("probe_steps", 0),
        "fine-tuning": r.cfg.finetune.get("steps", 0),
    }
    for row in (row for row in rows if row["method"] == "rRCM"):
        write_model_card(
            folders[row["sigma"]],
            sigma=row["sigma"],
            data=f"{r.cfg.dataset} train ({len(r.x_train)} images)",
            steps=steps,
            certified={k: v for k, v in row.items() if k.startswith("r=")} | {"ACR": row["acr"]},
        )


def _budgets(
    cfg: ExperimentConfig, timings: dict[str, float], baselines: dict[str, _Baseline]
) -> list[dict[str, str]]:
    """Optimizer steps and wall seconds per method, per σ ("cached": a stage reused from disk)."""

    def wall(stage: str) -> str:
        return " / ".join(str(timings.get(f"{stage}_{s:g}", "cached")) for s in cfg.sigmas)

    p, f, dds = cfg.pretrain, cfg.finetune, cfg.dds
    rows = [
        {
            "method": "rRCM",
            "steps": f"{p['steps']} pretraining (shared) + {f['probe_steps']} probe + {f['steps']}",
            "wall_s": f"{timings.get('pretrain', 'cached')} (shared) + {wall('finetune_rrcm')}",
        }
    ]
    for name in cfg.ablations:
        slug = _slug(name)
        rows.append(
            {
                "method": name,
                "steps": f"{cfg.ablation_pretrain(name)['steps']} pretraining (own) + {f['probe_steps']} probe + {f['steps']}",
                "wall_s": f"{timings.get(f'pretrain-{slug}', 'cached')} (own) + {wall(f'finetune_{slug}')}",
            }
        )
    for name, b in baselines.items():  # the configs they were trained with
        rows.append(
            {"method": name, "steps": str(b.config_for(cfg.sigmas[0]).steps), "wall_s": wall(b.stage)}
        )
    if dds.enabled:
        stages = ("train_dds_unet", "train_dds_classifier")
        rows.append(
            {
                "method": "DDS",
                "steps": f"{dds.unet_steps} UNet + {dds.classifier_steps} classifier (all σ)",
                "wall_s": " + ".join(str(timings.get(k, "cached")) for k in stages),
            }
        )
    return rows


# ----------------------------------------------------------------------------- small helpers


def _seeded(seed: int, make: Callable[..., RRCMModel], *args: Any, **kwargs: Any) -> RRCMModel:
    """``make(*args)`` after seeding torch: a new head's init must not depend on what ran before it in
    this process (a probe, a stage run here rather than loaded from disk), or a resumed run differs."""
    torch.manual_seed(seed)
    return make(*args, **kwargs)


def _fresh(model_kw: dict[str, Any], classes: int, seed: int) -> RRCMModel:
    return _seeded(seed, RRCMModel, **{**model_kw, "projection_dim": 0, "num_classes": classes})


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _pipeline(path: Path) -> RRCMPipeline:
    pipe = RRCMPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / max(len(rows), 1)


def main(argv: list[str] | None = None) -> None:
    """``rrcm-experiment``: parse (`rrcm_diffusers.cli`), then run."""
    from .cli import experiment_parser

    run_cli(experiment_parser().parse_args(argv))


def run_cli(args: argparse.Namespace) -> None:
    accelerator = Accelerator()
    cfg, progress = load_config(args.config), not args.no_progress
    if args.seeds:
        summary = run_seeds(cfg, args.seeds, args.out, accelerator, progress)
        if summary is not None:
            print(seed_tables(summary))
    else:
        summary = run(cfg, args.out, accelerator, progress=progress)
        if "table_md" in summary and accelerator.is_main_process:
            print(summary["table_md"])
    accelerator.wait_for_everyone()
    accelerator.end_training()  # close the process group, as torch asks of every process before exit


if __name__ == "__main__":
    main()
