"""The Transfusion model: HF causal-LM backbone, patch encoders/decoders, hybrid mask, losses."""

from transfusion.model.transfusion import LossOutput, TransfusionConfig, TransfusionModel

__all__ = ["LossOutput", "TransfusionConfig", "TransfusionModel"]
