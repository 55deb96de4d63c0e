"""RRCMPipeline: a fine-tuned rRCM model as a certifiably robust classifier."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import CMStochasticIterativeScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from huggingface_hub import ModelCard

from ._atomic import write_text_atomic
from .certification import (
    DEFAULT_BATCH_SIZE,
    certify,
    certify_sequential,
    check_futility,
    predict,
    with_autocast,
)
from .modeling_rrcm import RRCMModel
from .trajectory import CERTIFY_NUM_SCALES, RHO, SIGMA_MAX, SIGMA_MIN, grid_scheduler, noise_level_for_sigma

CITATION = """@inproceedings{lei2025robust,
  title={Robust Representation Consistency Model via Contrastive Denoising},
  author={Lei, Jiachen and Berner, Julius and Wang, Jiongxiao and Chen, Zhongzhu and Ba, Zhongjia},
  booktitle={International Conference on Learning Representations},
  year={2025},
  eprint={2501.13094},
  archivePrefix={arXiv}
}"""


@dataclass
class RRCMPipelineOutput(BaseOutput):
    """
    Args:
        predictions (`torch.Tensor` of shape `(N,)`): smoothed class per image, -1 = abstain.
        counts (`torch.Tensor` of shape `(N, num_classes)`): votes over the noise samples.
        p_values (`torch.Tensor` of shape `(N,)`): two-sided binomial test p-values.
    """

    predictions: torch.Tensor
    counts: torch.Tensor
    p_values: torch.Tensor


@dataclass
class RRCMCertifyOutput(BaseOutput):
    """
    Args:
        predictions (`torch.Tensor` of shape `(N,)`): certified class per image, -1 = abstain.
        radii (`torch.Tensor` of shape `(N,)`): certified L2 radius in [0, 1] pixel space.
        p_lower (`torch.Tensor` of shape `(N,)`): lower confidence bound of p_A.
        counts (`torch.Tensor` of shape `(N,)`): votes for the selected class among `n` samples.
        samples (`torch.Tensor` of shape `(N,)`, *optional*): estimation samples drawn per image
            (sequential certification, `radii=`); `None` for fixed-n CERTIFY (`n` for every image).
        selection (`torch.Tensor` of shape `(N,)`, *optional*): selection samples drawn per image
            (sequential certification: at most `n0`); `None` for fixed-n CERTIFY (`n0` for every image).
    """

    predictions: torch.Tensor
    radii: torch.Tensor
    p_lower: torch.Tensor
    counts: torch.Tensor
    samples: torch.Tensor | None = None
    selection: torch.Tensor | None = None


class RRCMPipeline(DiffusionPipeline):
    r"""
    Randomized smoothing with an rRCM classifier: one forward pass per noise sample.

    Noise N(0, σ²) is added in [0, 1] pixel space; the model sees 2(x + δ) − 1, i.e. noise of
    std 2σ in its [-1, 1] space, and is conditioned on the grid level of `scheduler` nearest
    to 2σ. The certificate holds whatever conditioning is used: only the noise actually added
    enters the guarantee.

    Args:
        model ([`RRCMModel`]): a fine-tuned model with a classifier head.
        scheduler ([`CMStochasticIterativeScheduler`], *optional*): the Karras grid; it must be the
            grid the model was fine-tuned on (``model.config.num_scales`` points, σ_min 0.002,
            σ_max 80, ρ 7), which is the default. Another grid would silently move the
            conditioning level (σ = 0.5: 0.9654 on 81 points, 1.0717 on 40), so it is refused.
    """

    model_cpu_offload_seq = "model"
    _optional_components: ClassVar[list[str]] = [
        "scheduler"
    ]  # a component (saved, loaded) that may be omitted: the model's grid

    def __init__(self, model: RRCMModel, scheduler: CMStochasticIterativeScheduler | None = None) -> None:
        super().__init__()
        expected = grid_scheduler(model.config.get("num_scales", CERTIFY_NUM_SCALES))
        if scheduler is None:
            scheduler = expected
        keys = ("num_train_timesteps", "sigma_min", "sigma_max", "rho")
        got = {k: scheduler.config.get(k) for k in keys}
        if got != {k: expected.config[k] for k in keys}:
            raise ValueError(
                f"scheduler grid {got} is not the grid the model was fine-tuned on "
                f"(num_train_timesteps={expected.config.num_train_timesteps}, sigma_min={SIGMA_MIN}, "
                f"sigma_max={SIGMA_MAX}, rho={RHO}): it would condition the model on other noise levels. "
                "Omit `scheduler` (the default is the model's grid) or pass "
                f"rrcm_diffusers.grid_scheduler({expected.config.num_train_timesteps})"
            )
        self.register_modules(model=model, scheduler=scheduler)

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            make_loadable_by_diffusers(save_directory, type(self).__name__)

    @classmethod
    def load_config(cls, *args, **kwargs):
        return own_class_config(super().load_config(*args, **kwargs), cls.__name__)

    def base_classifier(self, sigma: float, autocast_dtype: torch.dtype | None = None):
        """The base classifier f(x) for noisy images x in [0, 1] pixel space → logits (B, K);
        the same name and contract as `DDSPipeline.base_classifier`. With ``autocast_dtype``
        (``torch.bfloat16``) it runs under autocast; see `certification.with_autocast`."""
        if self.model.classifier is None:
            raise ValueError("the pipeline's model has no classifier head; fine-tune it first")
        level = noise_level_for_sigma(sigma, self.scheduler.config.num_train_timesteps)
        model = self.model.eval()

        def f(x: torch.Tensor) -> torch.Tensor:
            return model(x.mul(2.0).sub_(1.0), level).logits  # (B, K); one temporary, x is left intact

        return with_autocast(f, autocast_dtype)

    def classifier(self, sigma: float):
        """Deprecated name of `base_classifier` (0.1.0)."""
        warnings.warn(
            "RRCMPipeline.classifier(sigma) is deprecated; use base_classifier(sigma), as on DDSPipeline",
            FutureWarning,
            stacklevel=2,
        )
        return self.base_classifier(sigma)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor in [0, 1], got {type(images).__name__}")
        cfg = self.model.config
        shape = tuple(images.shape[-3:]) if images.dim() >= 3 else tuple(images.shape)
        if images.dim() not in (3, 4) or shape != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images must have shape (N, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), "
                f"got {tuple(images.shape)}"
            )
        return images.to(self.device, self.model.dtype)

    @torch.inference_mode()
    def __call__(
        self,
        images: torch.Tensor,
        sigma: float = 0.5,
        num_samples: int = 1000,
        alpha: float = 0.001,
        batch_size: int = DEFAULT_BATCH_SIZE,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        autocast_dtype: torch.dtype | None = None,
    ) -> RRCMPipelineOutput | tuple:
        r"""
        Smoothed prediction with abstention (Cohen's PREDICT).

        Args:
            images (`torch.Tensor` of shape `(N, C, H, W)`): clean images in [0, 1].
            sigma (`float`): smoothing noise std in [0, 1] pixel space.
            num_samples (`int`): noise samples per image.
            alpha (`float`): test level; abstain unless the top class wins at this level.
            batch_size (`int`): noisy copies per forward pass (256: fast on a CPU; raise it on a GPU).
            generator (`torch.Generator`, *optional*): for reproducible noise.
            return_dict (`bool`): return an [`RRCMPipelineOutput`] instead of a tuple.
            autocast_dtype (`torch.dtype`, *optional*): run the base classifier under autocast
                (`torch.bfloat16`); off by default. Sound for any dtype: see `certification.with_autocast`.
        """
        x = self._prepare(images)
        out = predict(
            self.base_classifier(sigma, autocast_dtype),
            x,
            sigma,
            num_samples=num_samples,
            alpha=alpha,
            batch_size=batch_size,
            generator=generator,
            progress=not self._progress_disabled(),
        )
        if not return_dict:
            return (out.predictions, out.counts, out.p_values)
        return RRCMPipelineOutput(predictions=out.predictions, counts=out.counts, p_values=out.p_values)

    @torch.inference_mode()
    def certify(
        self,
        images: torch.Tensor,
        sigma: float = 0.5,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        batch_size: int = DEFAULT_BATCH_SIZE,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        autocast_dtype: torch.dtype | None = None,
        radii: list[float] | None = None,
        futility: float | None = None,
    ) -> RRCMCertifyOutput | tuple:
        r"""
        Certified L2 radius per image (Cohen's CERTIFY; with `radii`, its sequential form).

        Args:
            images (`torch.Tensor` of shape `(N, C, H, W)`): clean images in [0, 1].
            sigma (`float`): smoothing noise std in [0, 1] pixel space.
            n0 (`int`): samples to select the class.
            n (`int`): samples to estimate its probability.
            alpha (`float`): failure probability of the certificate.
            batch_size (`int`): noisy copies per forward pass (256: fast on a CPU; raise it on a GPU).
            generator (`torch.Generator`, *optional*): for reproducible noise.
            return_dict (`bool`): return an [`RRCMCertifyOutput`] instead of a tuple.
            autocast_dtype (`torch.dtype`, *optional*): run the base classifier under autocast
                (`torch.bfloat16`); off by default. Sound for any dtype: see `certification.with_autocast`.
            radii (`list[float]`, *optional*): the radii you report. Given, certification is
                sequential (`certification.certify_sequential`): `n` becomes the most samples an image
                may use, and each image stops once its radius on this grid is decided, with the same
                guarantee (P(wrong certificate) <= `alpha` per image). Not given (the default), every
                image draws `n` samples: fixed-n CERTIFY, as published tables use.
            futility (`float`, *optional*): with `radii`, the level of the upper bound that judges a
                radius out of reach (default 0.05): larger stops images sooner and loses more of them
                to the radius below, never the guarantee. Refused without `radii`.
        """
        futility = check_futility(futility, radii)
        x = self._prepare(images)
        settings = dict(alpha=alpha, batch_size=batch_size, generator=generator)
        settings["progress"] = not self._progress_disabled()
        classifier = self.base_classifier(sigma, autocast_dtype)
        if radii is None:
            out = certify(classifier, x, sigma, n0=n0, n=n, **settings)
        else:
            out = certify_sequential(
                classifier, x, sigma, n0=n0, n_max=n, radii=radii, futility=futility, **settings
            )
        if not return_dict:
            return (out.predictions, out.radii, out.p_lower, out.counts)
        return RRCMCertifyOutput(
            predictions=out.predictions,
            radii=out.radii,
            p_lower=out.p_lower,
            counts=out.counts,
            samples=out.samples,
            selection=out.selection,
        )

    def _progress_disabled(self) -> bool:
        return bool(getattr(self, "_progress_bar_config", {}).get("disable", False))


# ----------------------------------------------------------------------------- loading by diffusers
# diffusers' own `DiffusionPipeline.from_pretrained(folder)` finds a pipeline class in the diffusers
# module, or in a custom-pipeline file named by `_class_name: [file, class]` in model_index.json (the
# way community pipelines ship). Each saved folder gets that one-line file, which imports the class
# from the installed package (no code is copied), so the generic loader opens it with
# `trust_remote_code=True`, as diffusers asks of any custom pipeline. Our own classes never go that
# way: `own_class_config` hands diffusers the plain class name, so `RRCMPipeline.from_pretrained`
# imports nothing from the folder and needs no flag (diffusers copies custom files into one shared
# module cache; ranks loading at once raced on it: "module ... has no attribute RRCMPipeline").

_MODULES = {"RRCMPipeline": "rrcm_diffusers.pipeline_rrcm", "DDSPipeline": "rrcm_diffusers.pipeline_dds"}


def hub_module(class_name: str) -> str:
    """The custom-pipeline file's name: one per class, as diffusers caches files by name."""
    return f"{class_name.lower()}_rrcm_diffusers"


def _stub(class_name: str) -> str:
    return f"from {_MODULES[class_name]} import {class_name}  # noqa: F401  (the class diffusers loads)\n"


def make_loadable_by_diffusers(folder: str | Path, class_name: str) -> None:
    """Write the custom-pipeline file and point ``_class_name`` at it (see the comment above)."""
    if class_name not in _MODULES:  # a subclass of the user's: its own module is theirs to ship
        return
    folder = Path(folder)
    index = folder / "model_index.json"
    config = json.loads(index.read_text())
    write_text_atomic(folder / f"{hub_module(class_name)}.py", _stub(class_name))
    config["_class_name"] = [hub_module(class_name), class_name]
    write_text_atomic(index, json.dumps(config, indent=2, sort_keys=True) + "\n")


def own_class_config(config: Any, class_name: str) -> Any:
    """``load_config``'s result with ``_class_name: [file, class_name]`` replaced by ``class_name``
    (the config may come alone or first in a tuple). Another class's name is left as it is, and
    diffusers then loads or refuses it as usual."""
    values = config[0] if isinstance(config, tuple) else config
    name = values.get("_class_name") if isinstance(values, dict) else None
    if isinstance(name, list) and len(name) == 2 and name[1] == class_name:
        values["_class_name"] = class_name
    return config


def write_model_card(
    folder: str | Path,
    *,
    sigma: float,
    data: str,
    steps: dict[str, int],
    certified: dict[str, float] | None = None,
) -> Path:
    """A diffusers-style model card (``README.md``) for a saved :class:`RRCMPipeline` folder.

    States the smoothing σ, the training data, the training steps and, when known, certified
    accuracy (e.g. ``{"r=0.5": 0.68}``).
    """
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in (certified or {}).items())
    table = f"| radius | certified accuracy |\n|---|---|\n{rows}" if rows else "Not measured yet."
    steps_text = ", ".join(f"{name}: {n}" for name, n in steps.items())
    content = f"""---
library_name: diffusers
tags:
- rrcm
- randomized-smoothing
- certified-robustness
---

# rRCM certifiably robust classifier (σ = {sigma})

An `RRCMPipeline` (rrcm-diffusers): a noise-conditioned encoder pretrained along diffusion noise
trajectories and fine-tuned with a linear head, certified with randomized smoothing.

- Smoothing noise σ = {sigma} (in [0, 1] pixel space)
- Training data: {data}
- Training steps: {steps_text}

## Certified accuracy

{table}

## Usage

```python
from rrcm_diffusers import RRCMPipeline

pipe = RRCMPipeline.from_pretrained("path/to/this/folder")
# or, with diffusers' generic loader (the folder names its class in a one-line file):
# pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)
out = pipe.certify(images, sigma={sigma}, n0=100, n=100_000, alpha=0.001)
```

## Citation

```bibtex
{CITATION}
```
"""
    path = Path(folder) / "README.md"
    ModelCard(content).save(path)
    return path
