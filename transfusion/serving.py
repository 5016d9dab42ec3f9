"""The exported pipeline as an MLflow pyfunc model, with no pickle: the registered model's
``MLmodel`` names this module as its ``loader_module`` and the pipeline folder as its data, so
``mlflow.pyfunc.load_model("models:/transfusion@champion")`` calls :func:`_load_pyfunc` on that
folder (checked against its manifest). No MLflow import here: this is the contract pyfunc calls;
``transfusion.tracking`` writes the model and finds the folder in a downloaded one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class PyfuncPipeline:
    """``predict(prompts)``: one image (H, W, 3) uint8 per prompt, drawn with the model's sampling."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    def predict(self, model_input, params: dict | None = None) -> np.ndarray:
        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        return self.pipe.sample_images([str(p) for p in prompts], **(params or {}))


def _load_pyfunc(data_path: str, model_config=None) -> PyfuncPipeline:  # MLflow's loader_module interface
    from transfusion.pipeline import TransfusionPipeline

    return PyfuncPipeline(TransfusionPipeline.from_pretrained(Path(data_path)))
