"""One training run as one object: ``TrainRun``.

What the training stage, the Ray wrapper and every worker's loop share about a run: its params
sections (paths made absolute here, once: workers run in other folders), the MLflow run it logs
into, the checkpoint to resume from, its checkpoint store and how its checkpoints and sample
grids are named and drawn. It travels to Ray workers as JSON (``model_dump``).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from transfusion.config import (
    RGB,
    DiffusionConfig,
    MixtureConfig,
    ModelConfig,
    Params,
    PathsConfig,
    SamplingConfig,
    TrainConfig,
)


class TrainRun(BaseModel):
    """One training run: its params sections with absolute paths, the MLflow run to log into,
    where its checkpoints live and how they and its sample grids are named."""

    model_config = ConfigDict(extra="forbid")

    paths: PathsConfig
    model: ModelConfig
    diffusion: DiffusionConfig
    sampling: SamplingConfig  # what the model keeps as its defaults
    probe_sampling: SamplingConfig  # the probes' quick evaluation (train.probe.sampling applied)
    grid_sampling: SamplingConfig  # the sample grids (train.sampling applied)
    mixture: MixtureConfig
    train: TrainConfig
    palette: dict[str, RGB]  # the scene colours (the probes score captions)
    tracking_uri: str | None = None
    run_id: str | None = None
    resume_from: str | None = None  # a checkpoint name in the store (``--resume``), None: fresh

    @classmethod
    def from_params(cls, params: Params) -> TrainRun:
        """The run of ``params`` (every path made absolute: workers run in other folders); the
        stage adds the MLflow run and the checkpoint to resume from (``model_copy``)."""
        p = params.with_absolute_paths()
        return cls(
            paths=p.paths,
            model=p.model,
            diffusion=p.diffusion,
            sampling=p.sampling,
            probe_sampling=p.sampling_for("train.probe.sampling"),
            grid_sampling=p.sampling_for("train.sampling"),
            mixture=p.mixture,
            train=p.train,
            palette=dict(p.data.scenes.palette),
        )

    @cached_property
    def store(self):
        """The run's :class:`~transfusion.train.checkpoint.CheckpointStore`."""
        from transfusion.train.checkpoint import CheckpointStore

        return CheckpointStore.of(self.paths, self.train)

    @property
    def final_checkpoint(self) -> str:
        from transfusion.train.checkpoint import checkpoint_name

        return checkpoint_name(self.train.steps)

    def draw_samples(self, pipe, step: int) -> Path:
        """The ``train.sample_captions`` drawn by ``pipe`` at step ``step``, as a captioned grid
        under ``paths.runs/samples``; returns its path."""
        from transfusion.train.checkpoint import checkpoint_name

        path = self.paths.runs / "samples" / f"{checkpoint_name(step)}.png"
        pipe.sample_grid(self.train.sample_captions, path, self.grid_sampling, self.train.seed)
        return path
