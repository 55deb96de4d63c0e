"""rrcm-diffusers: rRCM (Lei et al., ICLR 2025) for diffusers.

A noise-conditioned encoder trained along diffusion noise trajectories
(:class:`RRCMModel`, :class:`RRCMPretrainingLoss`), fine-tuned with a linear head on
noisy inputs (:class:`RRCMFinetuningLoss`), and certified with randomized smoothing
(:class:`RRCMPipeline`, :func:`certify`; a whole test set across processes: :func:`certify_dataset`).
"""

from __future__ import annotations

from .certification import CertifyResult, PredictResult, certify, certify_sequential, predict
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

__version__ = "0.1.0"


def __getattr__(name: str):
    # imported on first use: `python -m rrcm_diffusers.dataset_certification` would otherwise find the
    # module already imported by this package and warn (RuntimeWarning from runpy) on every run
    if name == "certify_dataset":
        from .dataset_certification import certify_dataset

        return certify_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
