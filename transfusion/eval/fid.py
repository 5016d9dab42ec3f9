"""FID and KID through torch-fidelity, with the judge or Inception-v3 as feature extractor.

The judge is registered with torch-fidelity as the feature extractor ``transfusion-judge``
(its per-cell CNN features and mean colours: works offline and fits 32x32 scenes); the standard
``inception-v3-compat`` needs its weights file (``eval.inception_weights``) or internet access.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from transfusion.errors import BadInput

JUDGE_EXTRACTOR = "transfusion-judge"


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)  # (3, H, W) uint8


def _register_judge() -> None:
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if JUDGE_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY:
        return

    class JudgeFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            from transfusion.eval.judge import Judge

            self.judge = Judge.load(Path(kwargs["feature_extractor_weights_path"]))
            self.net = self.judge.net  # registered so .eval()/.cuda() reach it

        def forward(self, x):
            return (self.judge.features(x).to(x.device).double(),)

        @staticmethod
        def get_provided_features_list():
            return ("judge",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "judge"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    register_feature_extractor(JUDGE_EXTRACTOR, JudgeFeatures)


def _check_state_dict(path: Path) -> None:
    """torch-fidelity reads the Inception weights with ``torch.load(weights_only=False)``, which
    would run any code a crafted file carries: read it first with the safe loader (tensors and
    plain containers only), which a genuine state dict passes and anything else fails."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BadInput(f"{path}: no Inception weights file here (eval.inception_weights)") from None
    except Exception as err:
        raise BadInput(f"{path}: not a plain state dict of tensors, refusing to load it ({err})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise BadInput(f"{path}: expected a state dict of tensors (eval.inception_weights)")


def fid_kid(
    a: np.ndarray,
    b: np.ndarray,
    extractor: str,
    judge_dir: Path | None = None,
    inception_weights: Path | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """FID and KID between two uint8 (N, H, W, 3) image sets."""
    import torch_fidelity

    if extractor == "judge":
        _register_judge()
        kwargs = {"feature_extractor": JUDGE_EXTRACTOR, "feature_extractor_weights_path": str(judge_dir)}
    elif extractor == "inception":
        kwargs = {"feature_extractor": "inception-v3-compat"}
        if inception_weights is not None:
            _check_state_dict(Path(inception_weights))
            kwargs["feature_extractor_weights_path"] = str(inception_weights)
    else:
        raise ValueError(f"unknown feature extractor {extractor!r}")
    try:
        m = torch_fidelity.calculate_metrics(
            input1=_Images(a),
            input2=_Images(b),
            fid=True,
            kid=True,
            kid_subset_size=min(1000, len(a), len(b)),
            kid_subsets=50,
            batch_size=batch_size,
            cuda=torch.cuda.is_available(),
            cache=False,
            save_cpu_ram=True,
            verbose=False,
            **kwargs,
        )
    except Exception as err:
        if extractor == "inception" and inception_weights is None:
            raise BadInput(
                "FID with inception-v3-compat needs its weights: set eval.inception_weights to the "
                f"pt_inception-2015-12-05 file, or use eval.feature_extractor: judge ({str(err).splitlines()[0]})"
            ) from None
        raise
    return {"fid": float(m["frechet_inception_distance"]), "kid": float(m["kernel_inception_distance_mean"])}
