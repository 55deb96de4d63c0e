"""RRCMModel: the noise-conditioned encoder of rRCM as a diffusers model."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

import shared_dist

from ._atomic import write_text_atomic
from .hooks import build_backbone
from .trajectory import CERTIFY_NUM_SCALES, c_in, c_noise

CHECKSUMS = "checksums.sha256.json"


class DamagedWeightsError(ValueError):
    """A weights folder whose files are not what was saved: a checksum that does not match, a file
    missing, or tensors of a dtype these models never save. (Non-finite weights are another error:
    a run that diverged, not a damaged file.)"""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def check_floating_weights(folder: str | os.PathLike) -> None:
    """Refuse weight files in ``folder`` that hold a non-floating tensor.

    diffusers casts whatever the file holds to the parameter's dtype: integer tensors load as
    (mostly zero) floats and the model then predicts one class for every input — a certifier
    would certify it. Every weight of these models is floating point (BatchNorm's
    ``num_batches_tracked`` counters aside), so any other dtype is damage.
    """
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            bad = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (not a dict)
        # BatchNorm's step counters are the models' only integer tensors
        bad = {
            k: d for k, d in bad.items() if d not in _FLOAT_DTYPES and not k.endswith("num_batches_tracked")
        }
        if bad:
            first = dict(list(bad.items())[:3])
            raise DamagedWeightsError(
                f"{path} holds non-floating tensors ({len(bad)}, e.g. {first}); the model's weights are "
                "floating point (F16/BF16/F32/F64): refusing to load damaged or foreign weights"
            )


@dataclass
class RRCMModelOutput(BaseOutput):
    """
    Args:
        features (`torch.Tensor` of shape `(batch_size, hidden_size)`): LN(CLS), the representation.
        projection (`torch.Tensor` of shape `(batch_size, projection_dim)`, *optional*):
            projector output, when asked for (pretraining).
        logits (`torch.Tensor` of shape `(batch_size, num_classes)`, *optional*):
            classification head output, when the model has a head.
    """

    features: torch.Tensor
    projection: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class GatheredBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the batch of every rank.

    Like ``nn.SyncBatchNorm`` (which refuses CPU tensors), but the per-rank sums go
    through ``shared_dist.gather``, so it runs on gloo and NCCL, allows uneven batches,
    and its gradients are those of a BatchNorm over the concatenated batch in one process.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and shared_dist.is_distributed()):
            return super().forward(x)
        d = x.shape[1]
        local = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), x.shape[0])])  # (2D+1,)
        total = shared_dist.gather(local.unsqueeze(0)).sum(0)  # (2D+1,)
        count = total[-1]
        mean = total[:d] / count
        var = (total[d : 2 * d] / count - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * unbiased.detach())
                self.num_batches_tracked.add_(1)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def _projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        GatheredBatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim),
        GatheredBatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class RRCMModel(ModelMixin, ConfigMixin):
    r"""
    The rRCM encoder: maps a noisy image x_t = x_0 + s·ε (pixels in [-1, 1]) and its noise
    level s to a representation that is consistent along the noise trajectory.

    The input is scaled by c_in(s) = 1/sqrt(s² + σ_data²); the backbone gets the time
    condition c_noise(s) = 250·ln(s). Heads: a 3-layer projector (pretraining) and a linear
    classifier (fine-tuning, certification).

    Parameters:
        image_size (`int`): height = width of the input.
        in_channels (`int`): channels of the input.
        patch_size (`int`): patch side of the built-in ViT (4 on 28x28 in a CPU-sized config).
        hidden_size (`int`): ViT width (rRCM-B: 768; a CPU-sized config: 128).
        depth (`int`): ViT blocks (rRCM-B: 12; CPU-sized: 4).
        num_heads (`int`): attention heads (rRCM-B: 12; CPU-sized: 4).
        mlp_ratio (`float`): MLP width / hidden size.
        backbone_type (`str`): name of a registered backbone (see `rrcm_diffusers.hooks`).
        backbone_kwargs (`dict`, *optional*): extra arguments for the backbone factory.
        projection_hidden_dim (`int`): projector hidden size.
        projection_dim (`int`): projector output size; `projection_dim=0` drops the projector.
        num_classes (`int`): classifier outputs; 0 = no classifier.
        sigma_data (`float`): σ_data of the EDM parameterisation.
        num_scales (`int`): N of the Karras grid the model is conditioned on at fine-tuning and
            certification (81); a pipeline refuses a scheduler with another grid.
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 28,
        in_channels: int = 1,
        patch_size: int = 4,
        hidden_size: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        backbone_type: str = "vit",
        backbone_kwargs: dict[str, Any] | None = None,
        projection_hidden_dim: int = 512,
        projection_dim: int = 128,
        num_classes: int = 0,
        sigma_data: float = 0.5,
        num_scales: int = CERTIFY_NUM_SCALES,
    ) -> None:
        super().__init__()
        kwargs = dict(backbone_kwargs or {})
        if backbone_type == "vit":
            kwargs.update(
                patch_size=patch_size,
                hidden_size=hidden_size,
                depth=depth,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
            )
        self.backbone = build_backbone(
            backbone_type, image_size=image_size, in_channels=in_channels, **kwargs
        )
        dim = self.backbone.out_dim
        self.projector = (
            _projector(dim, projection_hidden_dim, projection_dim) if projection_dim > 0 else None
        )
        self.classifier = nn.Linear(dim, num_classes) if num_classes > 0 else None

    # ------------------------------------------------------------------ saving and loading
    # A certifier must not run on damaged weights: diffusers' loader only warns about missing or
    # unused keys (missing ones stay uninitialised) and reads any bytes. Loading here refuses
    # missing/unexpected/mismatched keys and non-finite values, and checks the weight files
    # against the SHA-256 written beside them at save time.

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            folder = Path(save_directory)
            sums = {f.name: _sha256(f) for f in sorted(folder.glob("*.safetensors"))}
            write_text_atomic(folder / CHECKSUMS, json.dumps(sums, indent=2) + "\n")  # never half written

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> RRCMModel:
        return_info = kwargs.pop("output_loading_info", False)
        folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        if (folder / CHECKSUMS).is_file():
            for name, expected in json.loads((folder / CHECKSUMS).read_text()).items():
                if not (folder / name).is_file() or _sha256(folder / name) != expected:
                    raise DamagedWeightsError(
                        f"{folder / name} does not match the checksum written when it was saved "
                        "(damaged or replaced weights); refusing to load"
                    )
        check_floating_weights(folder)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, output_loading_info=True, **kwargs
        )
        problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
        if problems or info.get("error_msgs"):
            raise ValueError(f"the weights at {folder} do not match the model's config: {problems or info}")
        bad = [
            n for n, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()
        ]
        if bad:
            raise ValueError(f"the weights at {folder} hold non-finite values (NaN/inf) in {bad[:5]}")
        return (model, info) if return_info else model

    def _check_inputs(self, sample: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or tuple(sample.shape[1:]) != expected:
            got = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"sample must have shape (batch, {', '.join(map(str, expected))}), got {got}")
        if not torch.isfinite(sample).all():
            raise ValueError("sample contains NaN or infinite values")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(sample.shape[0])
        if sigma.shape != (sample.shape[0],):
            raise ValueError(
                f"sigma must be a scalar or of shape ({sample.shape[0]},), got {tuple(sigma.shape)}"
            )
        if not (sigma > 0).all() or not torch.isfinite(sigma).all():
            raise ValueError(f"sigma (noise level s) must be finite and > 0, got min {sigma.min().item()}")
        return sigma

    def forward(
        self,
        sample: torch.Tensor,
        sigma: torch.Tensor | float,
        output_projection: bool = False,
        return_dict: bool = True,
    ) -> RRCMModelOutput | tuple:
        r"""
        Args:
            sample (`torch.Tensor` of shape `(batch, channels, height, width)`): noisy images,
                pixels in [-1, 1] plus noise of std `sigma`.
            sigma (`float` or `torch.Tensor` of shape `(batch,)`): noise level s > 0 per sample.
            output_projection (`bool`): also run the projector (pretraining).
            return_dict (`bool`): return an `RRCMModelOutput` instead of a tuple.
        """
        s = self._check_inputs(sample, sigma)  # (B,)
        x = sample * c_in(s, self.config.sigma_data).to(sample.dtype)[:, None, None, None]  # (B, C, H, W)
        features = self.backbone(x, c_noise(s))  # (B, D)
        projection = None
        if output_projection:
            if self.projector is None:
                raise ValueError("output_projection=True needs a projector (projection_dim > 0)")
            projection = self.projector(features)  # (B, P)
        logits = self.classifier(features) if self.classifier is not None else None  # (B, K)
        if not return_dict:
            return tuple(v for v in (features, projection, logits) if v is not None)
        return RRCMModelOutput(features=features, projection=projection, logits=logits)

    def for_classification(self, num_classes: int) -> RRCMModel:
        """A copy with the projector dropped and a fresh linear head of ``num_classes`` outputs."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        config.update(num_classes=num_classes, projection_dim=0)
        model = RRCMModel.from_config(config)
        backbone_state = {k: v for k, v in self.state_dict().items() if k.startswith("backbone.")}
        missing, unexpected = model.load_state_dict(backbone_state, strict=False)
        assert not unexpected and all(k.startswith("classifier.") for k in missing), (missing, unexpected)
        return model.to(self.device)

    def get_layer_id(self, name: str) -> int:
        """Layer index of a parameter for layer-wise lr decay (heads are the top layer)."""
        top = getattr(self.backbone, "depth", 0) + 1
        if name.startswith("backbone.") and hasattr(self.backbone, "get_layer_id"):
            return self.backbone.get_layer_id(name[len("backbone.") :])
        return top if not name.startswith("backbone.") else 0

    @property
    def num_layers(self) -> int:
        return getattr(self.backbone, "depth", 0) + 2


def info_nce(query: torch.Tensor, key: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE of local queries against the keys of every rank (positives on the diagonal).

    ``key`` is treated as a target: it is detached before the gather, so only the queries
    receive gradient (the stop-grad branches of rRCM).
    """
    q = F.normalize(query, dim=-1)  # (B, P)
    keys, offsets = shared_dist.gather(F.normalize(key.detach(), dim=-1), return_offsets=True)  # (sum B, P)
    if keys.shape[0] < 2:
        raise ValueError(
            f"the contrastive loss needs a batch of at least 2 across ranks, got {keys.shape[0]}"
        )
    mine = shared_dist.local_slice(offsets)
    labels = torch.arange(mine.start, mine.stop, device=q.device)
    return F.cross_entropy(q @ keys.T / tau, labels)
