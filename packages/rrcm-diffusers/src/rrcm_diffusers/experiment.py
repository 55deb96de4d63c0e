"""The rRCM experiment end to end: pretrain → fine-tune per σ → baselines → certify → report.

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
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from diffusers import CMStochasticIterativeScheduler, DDPMScheduler

from ._atomic import claim_folder
from .data import load_dataset, strided_class_subset
from .modeling_rrcm import RRCMModel
from .pipeline_dds import DDSPipeline, small_unet, train_ddpm
from .pipeline_rrcm import RRCMPipeline, write_model_card
from .report import certify_methods, markdown_table, uncertainty_tables, write_report
from .training import FinetuneConfig, PretrainConfig, finetune, linear_probe_accuracy, pretrain
from .trajectory import CERTIFY_NUM_SCALES, grid_scheduler

DEFAULTS: dict[str, Any] = {
    "dataset": "mnist",
    "data_dir": None,
    "seed": 0,
    "sigmas": [0.25, 0.5, 1.0],
    "model": {
        "patch_size": 4,
        "hidden_size": 96,
        "depth": 4,
        "num_heads": 4,
        "projection_hidden_dim": 256,
        "projection_dim": 64,
    },
    "pretrain": {"steps": 400, "batch_size": 64, "lr": 2.0e-3, "checkpoint_every": 100},
    "finetune": {"probe_steps": 100, "steps": 300, "batch_size": 64, "lr": 1.0e-3},
    "cohen": {"enabled": True, "steps": 400, "batch_size": 64, "lr": 1.0e-3, "consistency": False},
    # the matched baseline: rRCM's fine-tuning (same loss, consistency included) from a random init;
    # steps None = pretrain.steps + finetune.steps, the optimizer steps rRCM took in all
    "scratch": {"enabled": False, "steps": None},
    "dds": {"enabled": True, "unet_steps": 600, "classifier_steps": 300, "batch_size": 64},
    "probe": {"enabled": True, "train_images": 2000, "test_images": 1000},
    "certify": {"per_class": 10, "n0": 100, "n": 1000, "alpha": 0.001, "batch_size": 1100},
}


def load_config(path: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """DEFAULTS, updated (one level deep) by a YAML file and then by ``overrides``.

    A key no stage reads is an error that names it (and the nearest known key): a misspelt
    ``certify: {n0: ..., nn: 10000}`` would otherwise run silently with the default n."""
    cfg = json.loads(json.dumps(DEFAULTS))
    for extra in ([yaml.safe_load(Path(path).read_text())] if path else []) + [overrides]:
        for k, v in (extra or {}).items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k].update(v)
            else:
                cfg[k] = v
    _check_keys("the top level", set(cfg), set(DEFAULTS), path)
    allowed = {
        "model": set(inspect.signature(RRCMModel.__init__).parameters) - {"self"},
        "pretrain": {f.name for f in fields(PretrainConfig)},
        "finetune": {f.name for f in fields(FinetuneConfig)} - {"sigma"},
    }
    for section, default in DEFAULTS.items():
        if isinstance(default, dict):
            if not isinstance(cfg[section], dict):
                raise ValueError(f"config section {section!r} must be a mapping, got {cfg[section]!r}")
            _check_keys(f"section {section!r}", set(cfg[section]), allowed.get(section, set(default)), path)
    return cfg


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


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def cm_scheduler() -> CMStochasticIterativeScheduler:
    return grid_scheduler(CERTIFY_NUM_SCALES)


def run(
    cfg: dict[str, Any], out: str | Path, accelerator: Accelerator | None = None, progress: bool = True
) -> dict[str, Any]:
    accelerator = accelerator or Accelerator()
    out = Path(out)
    main = accelerator.is_main_process
    torch.manual_seed(cfg["seed"])
    x_train, y_train = load_dataset(cfg["dataset"], "train", cfg["data_dir"])
    x_test, y_test = load_dataset(cfg["dataset"], "test", cfg["data_dir"])
    channels, size = x_train.shape[1], x_train.shape[-1]
    classes = int(y_train.max()) + 1
    model_kw = {"image_size": size, "in_channels": channels, **cfg["model"]}
    augment = "grey" if channels == 1 else "rgb"
    summary: dict[str, Any] = {"config": cfg, "timings_s": {}}

    def timed(name: str, fn):
        start = time.perf_counter()
        result = fn()
        summary["timings_s"][name] = round(time.perf_counter() - start, 1)
        return result

    # 1. pretraining along the trajectory
    pre_dir = out / "pretrain"
    data_key = {"dataset": cfg["dataset"], "seed": cfg["seed"], "train_images": list(x_train.shape)}
    pre_key = {**data_key, "model": cfg["model"], "pretrain": cfg["pretrain"]}
    claim_folder(pre_dir / "stage.json", pre_key, _has_files(pre_dir), main)
    if (pre_dir / "online" / "config.json").is_file():
        online = RRCMModel.from_pretrained(pre_dir / "online")
    else:
        torch.manual_seed(cfg["seed"])
        pcfg = section_config(PretrainConfig, cfg["pretrain"], augment=augment, seed=cfg["seed"])
        online, _, history = timed(
            "pretrain",
            lambda: pretrain(
                RRCMModel(**model_kw), x_train, pcfg, accelerator, pre_dir / "run", progress=progress
            ),
        )
        if main:
            online.save_pretrained(pre_dir / "online")
            (pre_dir / "history.json").write_text(json.dumps(history))
        summary["pretrain_loss"] = {
            "first10": _mean(history[:10], "loss"),
            "last10": _mean(history[-10:], "loss"),
        }
        summary["s_per_pretrain_step"] = summary["timings_s"]["pretrain"] / max(len(history), 1)

    # 2. linear probes on noisy features: random init vs pretrained
    if cfg["probe"]["enabled"]:
        probe_key = {**pre_key, "probe": cfg["probe"], "sigmas": cfg["sigmas"]}
        claim_folder(out / "probe.stage.json", probe_key, (out / "probe.json").is_file(), main)
    if cfg["probe"]["enabled"] and main and not (out / "probe.json").is_file():
        torch.manual_seed(cfg["seed"])
        random_init = RRCMModel(**model_kw)
        tr_idx = strided_class_subset(
            y_train, cfg["probe"]["train_images"] // classes
        )  # the CSV is sorted by label
        tr = (x_train[tr_idx], y_train[tr_idx])
        sub = strided_class_subset(y_test, cfg["probe"]["test_images"] // classes)
        te = (x_test[sub], y_test[sub])
        probes = {}
        for s in [None, *cfg["sigmas"]]:
            probes[str(s or 0.0)] = {
                "random_init": linear_probe_accuracy(random_init, tr, te, s, seed=cfg["seed"]),
                "pretrained": linear_probe_accuracy(online, tr, te, s, seed=cfg["seed"]),
            }
        (out / "probe.json").write_text(json.dumps(probes, indent=2))
    if (out / "probe.json").is_file():
        summary["probe"] = json.loads((out / "probe.json").read_text())

    # 3. fine-tuning per σ (rRCM), and the baselines trained in the same trainer
    methods: dict[str, dict[float, Path]] = {"rRCM": {}}
    for sigma in cfg["sigmas"]:
        methods["rRCM"][sigma] = _finetuned(
            out / f"rrcm-sigma{sigma:g}",
            lambda: _seeded(cfg["seed"], online.for_classification, classes),
            section_config(FinetuneConfig, cfg["finetune"], sigma=sigma, seed=cfg["seed"]),
            x_train,
            y_train,
            accelerator,
            progress,
            timed,
            f"finetune_rrcm_{sigma:g}",
            {**pre_key, "finetune": cfg["finetune"], "sigma": sigma},
        )
    # the baselines from a random init, each per σ: (folder, stage name, FinetuneConfig for σ, stage key)
    baselines: dict[str, tuple[str, str, Callable[[float], FinetuneConfig], dict[str, Any]]] = {}
    if cfg["cohen"]["enabled"]:
        c = cfg["cohen"]

        def cohen(sigma: float) -> FinetuneConfig:
            return FinetuneConfig(
                sigma=sigma,
                probe_steps=0,
                steps=c["steps"],
                batch_size=c["batch_size"],
                lr=c["lr"],
                layer_decay=1.0,
                num_noise_samples=2 if c["consistency"] else 1,
                consistency_weight=None if c["consistency"] else 0.0,
                seed=cfg["seed"],
            )

        name = "Cohen+consistency" if c["consistency"] else "Cohen"
        baselines[name] = ("cohen", "train_cohen", cohen, {"model": cfg["model"], "cohen": c})
    if cfg["scratch"]["enabled"]:
        steps = cfg["scratch"]["steps"] or cfg["pretrain"]["steps"] + cfg["finetune"]["steps"]
        # rRCM's fine-tuning without head-only warm-up or layer-wise decay: no pretrained layers to keep

        def scratch(sigma: float) -> FinetuneConfig:
            return section_config(
                FinetuneConfig,
                cfg["finetune"],
                sigma=sigma,
                seed=cfg["seed"],
                steps=steps,
                probe_steps=0,
                layer_decay=1.0,
            )

        key = {"model": cfg["model"], "finetune": cfg["finetune"], "scratch_steps": steps}
        baselines["scratch+consistency"] = ("scratch", "train_scratch", scratch, key)
    for name, (folder, stage, config_for, key) in baselines.items():
        methods[name] = {
            sigma: _finetuned(
                out / f"{folder}-sigma{sigma:g}",
                lambda: _fresh(model_kw, classes, cfg["seed"]),
                config_for(sigma),
                x_train,
                y_train,
                accelerator,
                progress,
                timed,
                f"{stage}_{sigma:g}",
                {**data_key, **key, "sigma": sigma},
            )
            for sigma in cfg["sigmas"]
        }
    dds_dir = out / "dds"
    if cfg["dds"]["enabled"]:
        dds_key = {**data_key, "model": cfg["model"], "dds": cfg["dds"]}
        claim_folder(dds_dir / "stage.json", dds_key, _has_files(dds_dir), main)
    if cfg["dds"]["enabled"] and main and not (dds_dir / "model_index.json").is_file():
        d = cfg["dds"]
        torch.manual_seed(cfg["seed"])
        unet, sched = small_unet(size, channels), DDPMScheduler(num_train_timesteps=1000)
        timed(
            "train_dds_unet",
            lambda: train_ddpm(
                unet,
                sched,
                x_train,
                d["unet_steps"],
                d["batch_size"],
                seed=cfg["seed"],
                progress=progress,
                device=accelerator.device,
            ),
        )
        clean = FinetuneConfig(
            sigma=1e-3,
            probe_steps=0,
            steps=d["classifier_steps"],
            batch_size=d["batch_size"],
            layer_decay=1.0,
            num_noise_samples=1,
            consistency_weight=0.0,
            seed=cfg["seed"],
        )
        clf, _ = timed(
            "train_dds_classifier",
            lambda: finetune(
                _fresh(model_kw, classes, cfg["seed"]),
                x_train,
                y_train,
                clean,
                accelerator,
                progress=progress,
            ),
        )
        DDSPipeline(unet=unet, scheduler=sched, classifier=clf).save_pretrained(dds_dir)
    accelerator.wait_for_everyone()

    # 4. certification of every method on one class-balanced, strided test subset
    if main:
        cc = cfg["certify"]
        sub = strided_class_subset(y_test, cc["per_class"])
        images, labels = x_test[sub].float() / 255.0, y_test[sub]
        table = {
            name: (lambda s, paths=paths: _pipeline(paths[s]).base_classifier(s))
            for name, paths in methods.items()
        }
        if cfg["dds"]["enabled"]:
            dds = DDSPipeline.from_pretrained(dds_dir)
            table["DDS"] = dds.base_classifier
        rows = timed(
            "certify",
            lambda: certify_methods(
                table,
                images,
                labels,
                cfg["sigmas"],
                cc["n0"],
                cc["n"],
                cc["alpha"],
                cc["batch_size"],
                cfg["seed"],
                progress,
            ),
        )
        notes = (
            f"{cfg['dataset']} test, {len(labels)} images ({cc['per_class']} per class, strided), "
            f"CERTIFY n0={cc['n0']}, n={cc['n']}, alpha={cc['alpha']}; noise in [0, 1] pixel space."
        )
        paths = write_report(rows, out / "report", f"Certified accuracy (%) — {cfg['dataset']}", notes)
        # each rRCM pipeline folder gets a model card with the certified accuracy just measured
        for row in rows:
            if row["method"] == "rRCM":
                f = cfg["finetune"]
                write_model_card(
                    methods["rRCM"][row["sigma"]],
                    sigma=row["sigma"],
                    data=f"{cfg['dataset']} train ({len(x_train)} images)",
                    steps={
                        "pretraining": cfg["pretrain"].get("steps", 0),
                        "linear probe": f.get("probe_steps", 0),
                        "fine-tuning": f.get("steps", 0),
                    },
                    certified={k: v for k, v in row.items() if k.startswith("r=")} | {"ACR": row["acr"]},
                )
        summary["certified"] = rows
        summary["budgets"] = _budgets(cfg, summary["timings_s"], baselines)
        summary["report"] = {k: str(v) for k, v in paths.items()}
        summary["table_md"] = markdown_table(rows) + uncertainty_tables(rows)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _budgets(
    cfg: dict[str, Any], timings: dict[str, float], baselines: dict[str, tuple[Any, ...]]
) -> list[dict[str, str]]:
    """Optimizer steps and wall seconds per method, per σ ("cached": a stage reused from disk)."""

    def wall(stage: str) -> str:
        return " / ".join(str(timings.get(f"{stage}_{s:g}", "cached")) for s in cfg["sigmas"])

    p, f, d = cfg["pretrain"], cfg["finetune"], cfg["dds"]
    rows = [
        {
            "method": "rRCM",
            "steps": f"{p['steps']} pretraining (shared) + {f['probe_steps']} probe + {f['steps']}",
            "wall_s": f"{timings.get('pretrain', 'cached')} (shared) + {wall('finetune_rrcm')}",
        }
    ]
    for name, (_, stage, config_for, _) in baselines.items():  # the configs they were trained with
        rows.append({"method": name, "steps": str(config_for(cfg["sigmas"][0]).steps), "wall_s": wall(stage)})
    if d["enabled"]:
        rows.append(
            {
                "method": "DDS",
                "steps": f"{d['unet_steps']} UNet + {d['classifier_steps']} classifier (all σ)",
                "wall_s": " + ".join(
                    str(timings.get(k, "cached")) for k in ("train_dds_unet", "train_dds_classifier")
                ),
            }
        )
    return rows


def _seeded(seed: int, make: Callable[..., RRCMModel], *args: Any, **kwargs: Any) -> RRCMModel:
    """``make(*args)`` after seeding torch: a new head's init must not depend on what ran before it in
    this process (a probe, a stage run here rather than loaded from disk), or a resumed run differs."""
    torch.manual_seed(seed)
    return make(*args, **kwargs)


def _fresh(model_kw: dict[str, Any], classes: int, seed: int) -> RRCMModel:
    return _seeded(seed, RRCMModel, **{**model_kw, "projection_dim": 0, "num_classes": classes})


def _finetuned(
    folder: Path, make, config: FinetuneConfig, x, y, accelerator, progress, timed, name, key: dict[str, Any]
) -> Path:
    claim_folder(folder / "stage.json", key, _has_files(folder), accelerator.is_main_process)
    pipe_dir = folder / "pipeline"
    if not (pipe_dir / "model_index.json").is_file():
        model, _ = timed(name, lambda: finetune(make(), x, y, config, accelerator, folder, progress=progress))
        if accelerator.is_main_process:
            RRCMPipeline(model=model, scheduler=cm_scheduler()).save_pretrained(pipe_dir)
        accelerator.wait_for_everyone()
    return pipe_dir


def _pipeline(path: Path) -> RRCMPipeline:
    pipe = RRCMPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / max(len(rows), 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file overriding the defaults")
    parser.add_argument("--out", required=True, help="output folder (stages already there are reused)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    summary = run(load_config(args.config), args.out, progress=not args.no_progress)
    if "table_md" in summary:
        print(summary["table_md"])


if __name__ == "__main__":
    main()
