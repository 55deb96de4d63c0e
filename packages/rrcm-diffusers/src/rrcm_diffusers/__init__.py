"""rrcm-diffusers: rRCM (Lei et al., ICLR 2025) for diffusers.

A noise-conditioned encoder trained along diffusion noise trajectories
(:class:`RRCMModel`, :class:`RRCMPretrainingLoss`), fine-tuned with a linear head on
noisy inputs (:class:`RRCMFinetuningLoss`), and certified with randomized smoothing
(:class:`RRCMPipeline`, :func:`certify`; a whole test set across processes: :func:`certify_dataset`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Names are imported on first use, as diffusers does: `import rrcm_diffusers` (and so a console
# script's --help) costs no torch/diffusers import, and `python -m rrcm_diffusers.dataset_certification`
# does not find its module half-imported by this package (runpy's RuntimeWarning).
_LAZY = {
    "certification": ["CertifyResult", "PredictResult", "certify", "certify_sequential", "predict"],
    "dataset_certification": ["certify_dataset"],
    "losses": ["RRCMFinetuningLoss", "RRCMPretrainingLoss", "ema_rate", "update_ema"],
    "modeling_rrcm": ["GatheredBatchNorm1d", "RRCMModel", "RRCMModelOutput", "info_nce"],
    "pipeline_rrcm": [
        "CITATION",
        "RRCMCertifyOutput",
        "RRCMPipeline",
        "RRCMPipelineOutput",
        "write_model_card",
    ],
    "trajectory": [
        "add_smoothing_noise",
        "grid_index_for_sigma",
        "grid_scheduler",
        "grid_sigma_for_sigma",
        "icm_num_scales",
        "icm_stage_length",
        "karras_sigmas",
        "noise_level_for_sigma",
        "sample_grid_index",
    ],
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .certification import CertifyResult, PredictResult, certify, certify_sequential, predict
    from .dataset_certification import certify_dataset
    from .losses import RRCMFinetuningLoss, RRCMPretrainingLoss, ema_rate, update_ema
    from .modeling_rrcm import GatheredBatchNorm1d, RRCMModel, RRCMModelOutput, info_nce
    from .pipeline_rrcm import CITATION, RRCMCertifyOutput, RRCMPipeline, RRCMPipelineOutput, write_model_card
    from .trajectory import (
        add_smoothing_noise,
        grid_index_for_sigma,
        grid_scheduler,
        grid_sigma_for_sigma,
        icm_num_scales,
        icm_stage_length,
        karras_sigmas,
        noise_level_for_sigma,
        sample_grid_index,
    )

__all__ = [
    "CITATION",
    "CertifyResult",
    "GatheredBatchNorm1d",
    "PredictResult",
    "RRCMCertifyOutput",
    "RRCMFinetuningLoss",
    "RRCMModel",
    "RRCMModelOutput",
    "RRCMPipeline",
    "RRCMPipelineOutput",
    "RRCMPretrainingLoss",
    "add_smoothing_noise",
    "certify",
    "certify_dataset",
    "certify_sequential",
    "ema_rate",
    "grid_index_for_sigma",
    "grid_scheduler",
    "grid_sigma_for_sigma",
    "icm_num_scales",
    "icm_stage_length",
    "info_nce",
    "karras_sigmas",
    "noise_level_for_sigma",
    "predict",
    "sample_grid_index",
    "update_ema",
    "write_model_card",
]
