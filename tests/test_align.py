"""Post-training pieces (Flow-GRPO): SDE trajectories and their log-probabilities."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_tiny_model, diffusion_config, section

FLOW = diffusion_config("flow")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_the_ode_end_of_the_sde_sampler_is_the_flow_sampler(text_tokenizer):
    """At noise level 0 the SDE trajectory ends where the flow-Euler sampler does (same seed)."""
    from transfusion.align import sample_trajectories
    from transfusion.diffusion import build_scheduler
    from transfusion.sampling import sample_latents

    model = build_tiny_model(text_tokenizer, diffusion=FLOW)
    caps = [ids(text_tokenizer, "a red 4"), ids(text_tokenizer, "a 2 to the left of a 9")]
    traj = sample_trajectories(model, caps, 8, 3.0, noise_level=0.0, seed=4)
    ode = sample_latents(model, caps, build_scheduler(model.config.diffusion, "flow_euler"), 8, 3.0, seed=4)
    assert traj.latents.shape == (9, 2, 4, 8, 8) and traj.logprobs.shape == (8, 2)
    torch.testing.assert_close(traj.latents[-1], ode, rtol=0, atol=1e-4)
    noisy = sample_trajectories(model, caps, 8, 3.0, noise_level=0.7, seed=4)
    assert (noisy.latents[-1] - ode).abs().max() > 1e-2  # the SDE explores around it
    torch.testing.assert_close(noisy.latents[0], traj.latents[0])  # from the same starting noise


def test_rescored_steps_have_the_sampling_log_probabilities_and_gradients(text_tokenizer):
    """Re-scoring a recorded trajectory under the weights that sampled it gives its log-
    probabilities back (the GRPO ratio starts at 1), with gradients to the image decoder; other
    weights score it differently."""
    from transfusion.align import sample_trajectories, step_logprobs, step_moments

    model = build_tiny_model(text_tokenizer, diffusion=FLOW)
    caps = [ids(text_tokenizer, "a 7"), ids(text_tokenizer, "three 5s")]
    traj = sample_trajectories(model, caps, 6, 2.0, noise_level=0.7, seed=1, use_cache=False)
    again = step_logprobs(traj, *step_moments(model, traj, 2.0, 0.7, steps=[0, 2, 5]), steps=[0, 2, 5])
    torch.testing.assert_close(again.detach(), traj.logprobs[[0, 2, 5]], rtol=0, atol=1e-5)
    again.sum().backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.patch_out.parameters())
    other = build_tiny_model(text_tokenizer, seed=1, diffusion=FLOW)
    with torch.no_grad():
        assert (step_logprobs(traj, *step_moments(other, traj, 2.0, 0.7)) - traj.logprobs).abs().max() > 1e-3


def test_ddpm_models_are_refused_with_one_line(text_tokenizer):
    from transfusion.align import sample_trajectories
    from transfusion.errors import BadInput

    model = build_tiny_model(text_tokenizer, diffusion=section("diffusion", objective="ddpm"))
    with pytest.raises(BadInput, match="Flow-GRPO samples flow models; this one is trained with 'ddpm'"):
        sample_trajectories(model, [[]], 4, 1.0, noise_level=0.7)


def test_group_advantages_are_normalised_within_each_prompt():
    from transfusion.align import group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, 4).view(3, 4)
    torch.testing.assert_close(adv.mean(1), torch.zeros(3), rtol=0, atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4))  # all passed: nothing to learn from this prompt
    assert adv[0, 0] > 0 > adv[0, 1] and adv[0, 0] == pytest.approx(3**0.5, rel=1e-3)  # 1 of 4: +sqrt(3)
    torch.testing.assert_close(adv[2].abs(), torch.ones(4), rtol=1e-3, atol=0)  # 2 of 4: +-1


def test_grpo_loss_clips_the_ratio_and_weighs_the_kl():
    from transfusion.align import grpo_loss

    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0, 2.0])
    same, stats = grpo_loss(old.clone(), old, adv, clip=0.2)
    assert float(same) == pytest.approx(-float(adv.mean())) and stats["clip_fraction"] == 0.0
    # a ratio of e^1 on every step: clipped at 1.2 for positive advantages, not for negative ones
    up, stats = grpo_loss(old + 1.0, old, adv, clip=0.2)
    assert float(up) == pytest.approx(float((-(1.2 * 1.0) + math.e * 1.0 - 1.2 * 2.0) / 3), rel=1e-5)
    assert stats["clip_fraction"] == 1.0
    kl = torch.full((2, 3), 0.5)
    with_kl, stats = grpo_loss(old.clone(), old, adv, clip=0.2, kl=kl, kl_weight=0.1)
    assert float(with_kl) == pytest.approx(float(same) + 0.05) and stats["kl"] == pytest.approx(0.5)
    # the gradient pushes the log-probability of positive-advantage steps up, negative down
    logp = old.clone().requires_grad_(True)
    grpo_loss(logp, old, adv, clip=0.2)[0].backward()
    assert (logp.grad[:, adv > 0] < 0).all() and (logp.grad[:, adv < 0] > 0).all()


def test_kl_to_itself_is_zero_and_grows_with_the_mean_gap(text_tokenizer):
    from transfusion.align import sample_trajectories, step_kl, step_moments

    model = build_tiny_model(text_tokenizer, diffusion=FLOW)
    other = build_tiny_model(text_tokenizer, seed=1, diffusion=FLOW)
    traj = sample_trajectories(model, [ids(text_tokenizer, "a 7")], 4, 1.0, noise_level=0.7, use_cache=False)
    with torch.no_grad():
        means, stds = step_moments(model, traj, 1.0, 0.7)
        assert torch.equal(step_kl(means, means, stds), torch.zeros(4, 1))
        far, _ = step_moments(other, traj, 1.0, 0.7)
        kl = step_kl(means, far, stds)
    want = (means - far).pow(2).flatten(2).mean(2) / (2 * torch.tensor(stds).view(-1, 1) ** 2)
    torch.testing.assert_close(kl, want)
    assert (kl > 0).all()


def test_grpo_raises_a_reward_on_a_tiny_model(text_tokenizer):
    """Flow-GRPO iterations on a tiny flow model raise a toy reward (the mean of the sampled
    latent), judged on fresh ODE samples before and after; the KL to the reference grows from 0."""
    import copy

    from transfusion.align import grpo_step, sample_trajectories

    model = build_tiny_model(text_tokenizer, diffusion=FLOW)
    reference = copy.deepcopy(model).requires_grad_(False)
    caps = [ids(text_tokenizer, "a red 4"), ids(text_tokenizer, "a 7")]

    def reward(latents, rows):
        return latents.mean(dim=(1, 2, 3))

    def held_out_reward() -> float:
        return float(reward(sample_trajectories(model, caps * 4, 6, 1.0, 0.0, seed=100).latents[-1], None).mean())

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    before = held_out_reward()
    kw = dict(group_size=4, steps=6, noise_level=0.7, cfg_scale=1.0, clip=0.2, kl_weight=0.01)
    stats = [grpo_step(model, reference, optimizer, caps, reward, seed=10 * i, **kw) for i in range(8)]
    assert held_out_reward() > before + 0.5, (before, [s["reward"] for s in stats])
    assert stats[0]["kl"] == 0.0 and stats[-1]["kl"] > 0.0
    assert all(s["clip_fraction"] == 0.0 for s in stats)  # one on-policy update per batch: the ratio is 1


def test_raft_keeps_what_passes_and_raises_the_reward(text_tokenizer):
    """RAFT iterations (sample, keep what the reward passes, train on it with the Transfusion
    loss) raise a toy pass/fail reward (the sampled latent's mean above 0) on fresh ODE samples;
    an iteration where nothing passes changes no weight."""
    from transfusion.align import raft_step, sample_trajectories
    from transfusion.data.collate import Collator
    from transfusion.diffusion import build_scheduler

    model = build_tiny_model(text_tokenizer, diffusion=FLOW)
    caps = [ids(text_tokenizer, "a red 4"), ids(text_tokenizer, "a 7")]
    collate = Collator(model.special, model.config.patches_per_image, 64, caption_dropout=0.1, seed=0)

    def passes(latents, rows):
        return (latents.mean(dim=(1, 2, 3)) > 0).float()

    def held_out_pass_rate() -> float:
        return float(passes(sample_trajectories(model, caps * 8, 6, 1.0, 0.0, seed=100).latents[-1], None).mean())

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    kw = dict(group_size=4, steps=6, cfg_scale=1.0, updates=2, batch_size=4, loss_weight=5.0, noise_limit=0.5)
    weights = [p.detach().clone() for p in model.parameters()]
    euler = build_scheduler(model.config.diffusion, "flow_euler")
    none = raft_step(model, optimizer, caps, lambda lat, rows: torch.zeros(len(rows)), collate, euler, seed=0, **kw)
    assert none["kept"] == 0.0 and math.isnan(none["loss"])
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    before = held_out_pass_rate()
    stats = [raft_step(model, optimizer, caps, passes, collate, euler, seed=1000 * i, **kw) for i in range(16)]
    assert 0.0 < stats[0]["kept"] < 1.0 and stats[0]["reward"] == stats[0]["kept"]
    assert held_out_pass_rate() > before + 0.3, (before, [s["reward"] for s in stats])


def test_held_out_combinations_are_fixed_and_never_drawn_by_align():
    """The held-out set is a fixed share of every category's combinations, the same whatever
    the seed; align's prompt pool excludes exactly it; the split scores add up."""
    from transfusion.align_loop import iteration_prompts, prompt_pool
    from transfusion.config import CATEGORIES
    from transfusion.eval import geneval

    palette = ["red", "green", "blue", "yellow", "magenta", "cyan", "white"]
    hidden = geneval.held_out(palette, 2, 0.2)
    assert hidden == geneval.held_out(list(reversed(palette)), 2, 0.2)  # order of the palette: no matter
    assert geneval.held_out(palette, 2, 0.0) == set()
    cfg = section("align", held_out_fraction=0.2)
    pool = prompt_pool(cfg, palette, 2)
    for category in CATEGORIES:
        space = {p.text() for p in geneval.prompt_space(category, palette, 2)}
        held = space & hidden
        assert 1 <= len(held) and abs(len(held) - 0.2 * len(space)) <= 1
        assert {p.text() for p in pool[category]} == space - held
    drawn = {p.text() for it in range(50) for p in iteration_prompts(pool, 8, 0, it)}
    assert not drawn & hidden and len(drawn) > 200
    assert [p.text() for p in iteration_prompts(pool, 8, 0, 3)] == [p.text() for p in iteration_prompts(pool, 8, 0, 3)]
    # split scores: seen and held-out images scored apart; a prompt counts on one side only
    prompts = geneval.balanced_prompts(8, palette, 0, 2)
    read = [{"objects": []}] * (2 * len(prompts))
    got = geneval.split_scores(read, prompts, 2, hidden)
    assert got["geneval_overall"] == 0.0 and got["seen_geneval_overall"] == 0.0 and "held_out_geneval_overall" in got


# -- the align stage ---------------------------------------------------------------------------
ALIGN_OUTPUTS = {
    "model": "model",
    "aligned_model": "aligned",
    "align_checkpoints": "align-checkpoints",
    "align_metrics": "align.json",
    "align_plot": "align.csv",
    "align_grid": "align.png",
    "judge": "judge",
    "judge_metrics": "judge.json",
}


@pytest.fixture(scope="module")
def align_judge(tiny_pipeline, tmp_path_factory):
    """A judge trained on the tiny scenes (the judge stage), in its own folder."""
    from stages import judge

    root = tmp_path_factory.mktemp("align-judge")
    paths = tiny_pipeline.paths.model_copy(update={"judge": root / "judge", "judge_metrics": root / "judge.json"})
    judge.run(tiny_pipeline.model_copy(update={"paths": paths}))
    return paths.judge


def align_params(tiny_pipeline, align_judge, tmp_path, text_tokenizer, **align):
    """The tiny params with a tiny flow model exported where ``align`` reads it, the module's
    judge, every output under ``tmp_path``, and ``align`` changed as given (in this process
    unless ``use_ray`` says otherwise)."""
    from conftest import pipeline_around, sampling_config

    paths = {k: tmp_path / v for k, v in ALIGN_OUTPUTS.items()} | {"judge": align_judge}
    paths["judge_metrics"] = align_judge.parent / "judge.json"
    if not paths["model"].exists():
        model = build_tiny_model(text_tokenizer, diffusion=FLOW, sampling=sampling_config("flow"))
        pipeline_around(model, text_tokenizer).save_pretrained(paths["model"])
    tracking = tiny_pipeline.tracking.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    return tiny_pipeline.model_copy(
        update={
            "paths": tiny_pipeline.paths.model_copy(update=paths),
            "tracking": tracking,
            "align": tiny_pipeline.align.model_copy(update={"use_ray": False} | align),
        }
    )


def _rows(path) -> list[list[str]]:
    """The align curve's rows without the wall-time column."""
    rows = [line.split(",") for line in path.read_text().splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if name != "seconds"]
    return [[row[i] for i in keep] for row in rows]


TINY_ALIGN = dict(categories=["single_object", "counting"], prompts_per_iteration=2, group_size=4, steps=3)


@pytest.mark.parametrize("method", ["grpo", "raft"])
def test_the_align_stage_writes_an_aligned_pipeline_its_curve_and_metrics(
    tiny_pipeline, align_judge, tmp_path, text_tokenizer, method
):
    """The stage reads the exported model and writes a pipeline of the same format with other
    weights, a row per iteration (reward, KL / kept share, learning rate), the before / after grid
    and metrics; the MLflow run holds every iteration's reward."""
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from stages import align
    from transfusion.pipeline import TransfusionPipeline

    p = align_params(
        tiny_pipeline, align_judge, tmp_path, text_tokenizer, method=method, iterations=3, quick_prompts=4, **TINY_ALIGN
    )
    metrics = align.run(p)
    aligned = TransfusionPipeline.from_pretrained(p.paths.aligned_model)
    assert aligned.model.config == TransfusionPipeline.from_pretrained(p.paths.model).model.config
    before, after = (load_file(str(f / "model.safetensors")) for f in (p.paths.model, p.paths.aligned_model))
    assert before.keys() == after.keys()
    rows = _rows(p.paths.align_plot)
    assert len(rows) == 4 and rows[0][:2] == ["iteration", "lr"] and "reward" in rows[0]
    assert ("kl" if method == "grpo" else "kept") in rows[0]
    assert metrics["enabled"] == 1.0 and metrics["iterations"] == 3.0
    assert {"before_geneval_overall", "after_seen_geneval_overall", "after_held_out_geneval_overall"} <= set(metrics)
    assert json.loads(p.paths.align_metrics.read_text())["iterations"] == 3.0
    assert p.paths.align_grid.stat().st_size > 0
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(metrics["mlflow_run_id"], "reward")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert [f"{m.value:.6g}" for m in sorted(history, key=lambda m: m.step)] == [
        row[rows[0].index("reward")] for row in rows[1:]
    ]
    # the weights move exactly when an iteration had something to learn from
    signal = rows[0].index("grad_norm" if method == "grpo" else "kept")
    learned = any(float(row[signal]) > 0 for row in rows[1:])
    assert learned == any(not torch.equal(before[k], after[k]) for k in before)


def test_align_disabled_passes_the_trained_model_through(tiny_pipeline, align_judge, tmp_path, text_tokenizer):
    from stages import align

    p = align_params(tiny_pipeline, align_judge, tmp_path, text_tokenizer, enabled=False)
    metrics = align.run(p)
    assert metrics["enabled"] == 0.0 and "before_geneval_overall" in metrics
    for f in p.paths.model.rglob("*"):
        if f.is_file():
            assert (p.paths.aligned_model / f.relative_to(p.paths.model)).read_bytes() == f.read_bytes(), f
    assert p.paths.align_plot.read_text().splitlines() == ["iteration,reward,kl,clip_fraction,lr"]


@pytest.mark.parametrize(
    "stop, code, line",
    [
        # a scheduler's stop, to the process alone: align.preempt_checkpoint saves the iteration in flight
        ("SIGTERM", 143, r"terminated by SIGTERM after saving the checkpoint of iteration (\d+)"),
        pytest.param("SIGINT", 130, "interrupted", marks=pytest.mark.slow),  # Ctrl-C, to the process group
    ],
)
def test_a_stop_then_resume_repeats_the_uninterrupted_align_rewards(
    tiny_pipeline, align_judge, tmp_path, text_tokenizer, stop, code, line
):
    """SIGTERM or Ctrl-C in `transfusion align`: exit 143 or 130, one line, the MLflow run
    KILLED, nothing exported; `--resume` continues in the same run from the newest checkpoint
    (after SIGTERM: the iteration in flight, off the checkpoint_every schedule), and its rows
    (reward, KL, clip fraction, gradient norm) equal the uninterrupted run's."""
    import os
    import re
    import signal

    import yaml
    from test_faults import _start, _wait_for

    from stages import align
    from transfusion.tracking import find_runs

    # after SIGTERM the only checkpoint is the one the stop saved (every 60: the last iteration alone)
    settings = dict(TINY_ALIGN, method="raft", iterations=60, checkpoint_every=60 if stop == "SIGTERM" else 2)
    whole = align_params(tiny_pipeline, align_judge, tmp_path / "whole", text_tokenizer, **settings)
    align.run(whole)
    rows = _rows(whole.paths.align_plot)
    assert sum(float(row[rows[0].index("kept")]) > 0 for row in rows[1:]) > 5  # it trains: resuming is tested

    cut = align_params(tiny_pipeline, align_judge, tmp_path / "cut", text_tokenizer, **settings)
    params_file = tmp_path / "cut.yaml"
    params_file.write_text(yaml.safe_dump(cut.model_dump(mode="json")))
    log = tmp_path / "align.log"
    proc = _start(params_file, log=log, command="align")
    _wait_for(log, "[align] iteration 5/60", proc)
    if stop == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == code, log.read_text()[-2000:]
    (said,) = [x for x in log.read_text().splitlines() if x.startswith("error:")]
    stopped = re.fullmatch(f"error: {line} \\(an align run continues with `transfusion align --resume`\\)", said)
    assert stopped, said
    newest = sorted(c.name for c in cut.paths.align_checkpoints.iterdir() if c.name.startswith("step-"))[-1]
    if stop == "SIGTERM":  # the checkpoint of the iteration it stopped at
        assert newest == f"step-{int(stopped.group(1)):08d}" and 5 <= int(stopped.group(1)) < 60
    (run,) = find_runs(cut.tracking, "align")
    assert run["status"] == "KILLED" and not cut.paths.aligned_model.exists()
    metrics = align.run(cut, resume=True)
    assert metrics["mlflow_run_id"] == run["run_id"]
    assert _rows(cut.paths.align_plot) == rows
    (run,) = find_runs(cut.tracking, "align")
    assert run["status"] == "FINISHED"
    from mlflow import MlflowClient

    history = MlflowClient(f"sqlite:///{tmp_path / 'cut' / 'mlflow.db'}").get_metric_history(run["run_id"], "reward")
    assert sorted(m.step for m in history) == list(range(1, 61))  # each iteration logged once


def test_align_on_a_ray_worker_repeats_the_in_process_run(
    tiny_pipeline, align_judge, tmp_path, text_tokenizer, ray_local, monkeypatch
):
    """The same align run on a Ray Train worker (checkpoints reported through Ray into the
    store) and in this process: the same rows (to the 6 digits written) and the same aligned
    weights (up to float rounding: the worker runs one thread)."""
    import builtins

    from safetensors.torch import load_file

    from stages import align

    monkeypatch.setattr(builtins, "print", builtins.print)  # Ray Train swaps the driver's print: restored after
    settings = dict(TINY_ALIGN, method="raft", iterations=6, checkpoint_every=2)
    here = align_params(tiny_pipeline, align_judge, tmp_path / "here", text_tokenizer, **settings)
    on_ray = align_params(
        tiny_pipeline, align_judge, tmp_path / "ray", text_tokenizer, use_ray=True, cpus_per_worker=1, **settings
    )
    align.run(here)
    align.run(on_ray)
    assert _rows(on_ray.paths.align_plot) == _rows(here.paths.align_plot)
    a, b = (load_file(str(p.paths.aligned_model / "model.safetensors")) for p in (here, on_ray))
    for k in a:  # one worker thread there, two here: equal up to float summation order
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert sorted(x.name for x in on_ray.paths.align_checkpoints.iterdir() if x.name.startswith("step-")) == [
        "step-00000004",
        "step-00000006",
    ]
