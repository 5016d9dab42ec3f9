"""The evaluation stage's function: ``evaluate(pipe, cfg, sampling, inputs)`` scores an exported pipeline.

1. **GenEval-style**: ``images_per_prompt`` images for each of ``prompts_per_category``
   prompts per category (drawn to cover digits, colours, relations and counts evenly,
   independently of the data; or a GenEval prompt file), read by the judge, scored by GenEval's
   rule (``geneval_*``) and the exact-scene rule (``scene_match_*``), each with a standard error
   (``*_se``), and the share of empty canvases (``blank_rate*``: the judge finds no object); the
   same on ``real_scenes`` real test scenes (what a perfect generator would score with this
   judge); a guidance sweep (``cfg_sweep``: the same prompts, images per prompt and noise at
   each scale, ``sweep_sample_steps`` steps, so that scales differ by guidance alone; the
   headline's own scale and steps are not sampled twice).
   **Binding** (``transfusion.eval.binding``): on ``binding_scenes`` real test scenes per
   compositional category, is the true caption ranked above its relation-flipped or
   colour-swapped twin, reading (caption NLL) and writing (diffusion loss per noise level)?
2. **FID / KID** (torch-fidelity) of ``fid_samples`` images drawn from test captions against the
   real test scenes, with real train vs real test at the same N as the floor.
3. **Captioning** of ``caption_samples`` real test scenes (exact, digit, count, colour, position).
4. **Text**: bits per byte and perplexity on the held-out works, in chunks of the training length.

Judge-based scores need a judge that met ``judge.min_accuracy`` (``judge_ok``); without one they
are left out. Data without scene content (a caption folder) have no GenEval prompts (unless
``eval.prompt_file`` gives some) and no judge: their evaluation is FID/KID on Inception
features, captions compared as text, and text bits per byte. :func:`write_outputs` writes
what the stage keeps: metrics, GenEval's folder layout, the per-category and sweep CSVs, image
grids, caption examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transfusion.config import EvalConfig, PathsConfig, SamplingConfig

# Independent random streams of one evaluation: each draw starts from cfg.seed + its offset.
SEED_GENEVAL, SEED_FID, SEED_BINDING = 0, 100_000, 300_000
MAX_TEST_IMAGES = 20_000  # the test images read (a streamed test split can hold millions)
SWEEP_COLUMNS = [
    "cfg_scale",
    "geneval_overall",
    "geneval_overall_se",
    "scene_match_overall",
    "blank_rate",
    "blank_rate_se",
    "geneval_position",
    "geneval_color_attr",
]


@dataclass
class EvalInputs:
    """What the evaluation reads besides the pipeline (all from the training pipeline's outputs)."""

    judge_path: Path
    judge_accuracy: float  # the judge's whole-scene exact match on real test scenes
    judge_min_accuracy: float
    scenes: Path
    text: Path
    palette: dict
    text_length: int  # tokens per scored chunk: the training text length
    grid: int = 2  # cells per side of the scenes (how many objects a counting prompt may ask)
    reader_path: Path | None = None  # a second reader (no weights shared with the judge)
    held_out: set[str] = field(default_factory=set)  # prompt texts post-training never saw


@dataclass
class EvalResult:
    metrics: dict[str, float]
    prompts: list = field(default_factory=list)  # GenEval prompts
    images: list[np.ndarray] = field(default_factory=list)  # per prompt: (images_per_prompt, H, W, 3)
    passed: list[bool] = field(default_factory=list)  # per image: GenEval's verdict (judge_ok only)
    sweep: list[dict] = field(default_factory=list)  # per guidance scale: overall scores, errors, blanks
    captions: list[tuple[str, str]] = field(default_factory=list)  # (truth, generated) per captioned scene


def evaluate(pipe, cfg: EvalConfig, sampling: SamplingConfig, inputs: EvalInputs, progress=None) -> EvalResult:
    """Score ``pipe`` (a TransfusionPipeline) as the module docstring says, sampling as
    ``sampling`` says (``params.sampling_for("eval.sampling")``)."""
    from transfusion.data.prepare import load_image_split
    from transfusion.eval.judge import Judge

    bar = progress or (lambda it, desc: it)
    judge_ok = inputs.judge_accuracy >= inputs.judge_min_accuracy
    judge = Judge.load(inputs.judge_path) if judge_ok else None
    test = load_image_split(inputs.scenes, "test", MAX_TEST_IMAGES)
    has_content = all(r.get("content") for r in test.records)
    metrics: dict[str, float] = {"judge_scene_exact_match": inputs.judge_accuracy, "judge_ok": float(judge_ok)}

    def sample(captions: list[str], seed: int, **changes) -> np.ndarray:
        how = sampling.model_copy(update=changes)  # the sweep changes the scale and the steps
        return sample_many(pipe, captions, seed, how, batch_size=cfg.batch_size, progress=bar)

    # 1. GenEval-style: N images per prompt, judged; real scenes; the guidance sweep; binding
    result = _geneval(cfg, sampling, inputs, test, judge, sample, metrics)
    if has_content:  # teacher-forced on real scenes: no judge needed
        metrics |= _binding(pipe, cfg, test)
    # 2. FID / KID against real test scenes; real train vs real test as the floor
    metrics |= _fid(cfg, inputs, test, judge_ok, lambda captions: sample(captions, cfg.seed + SEED_FID))
    # 3. captioning real test scenes
    metrics |= _captioning(pipe, cfg, inputs, test, has_content, result, bar)
    # 4. text: bits per byte and perplexity on the held-out works
    metrics |= _text(pipe, cfg, inputs)
    return result


def _geneval(cfg: EvalConfig, sampling, inputs: EvalInputs, test, judge, sample, metrics: dict) -> EvalResult:
    """Images for the GenEval-style prompts, judged into ``metrics``; real test scenes judged as
    prompts; the guidance sweep (the same prompts and noise at each scale)."""
    from transfusion.eval import geneval

    k = cfg.images_per_prompt
    has_content = all(r.get("content") for r in test.records)
    if cfg.prompt_file:
        prompts = geneval.read_prompt_file(cfg.prompt_file, inputs.palette)
    elif has_content:
        prompts = geneval.balanced_prompts(cfg.prompts_per_category, list(inputs.palette), cfg.seed, inputs.grid)
    else:
        prompts = []  # free-form captions: no GenEval prompts to draw
    captions = [p.text() for p in prompts for _ in range(k)]  # k images per prompt
    images = sample(captions, cfg.seed + SEED_GENEVAL)
    result = EvalResult(metrics, prompts, [images[i * k : (i + 1) * k] for i in range(len(prompts))])
    if judge is None or not has_content:
        return result
    read = judge.read(images)
    metrics |= judged(read, prompts, k)
    metrics |= _seen_and_second_reader(read, images, prompts, k, inputs, metrics)
    result.passed = [geneval.geneval_correct(c, geneval.metadata(prompts[i // k])) for i, c in enumerate(read)]
    n_real = min(cfg.real_scenes, len(test.images))
    real = judged(judge.read(test.images[:n_real]), [_prompt(r) for r in test.records[:n_real]], 1)
    metrics["geneval_real_test_scenes"] = real["geneval_overall"]
    metrics["scene_match_real_test_scenes"] = real["scene_match_overall"]
    for scale in cfg.cfg_sweep:
        if (scale, cfg.sweep_sample_steps) == (sampling.cfg_scale, sampling.steps):
            got = metrics  # the headline run: same prompts, noise, scale and steps
        else:
            swept = sample(captions, cfg.seed + SEED_GENEVAL, cfg_scale=scale, steps=cfg.sweep_sample_steps)
            got = judged(judge.read(swept), prompts, k)
        result.sweep.append({"cfg_scale": scale} | {key: got[key] for key in SWEEP_COLUMNS[1:]})
    return result


def _seen_and_second_reader(read, images, prompts, k: int, inputs: EvalInputs, metrics: dict) -> dict:
    """GenEval-style on the combinations post-training saw and held out apart, and the second
    reader's GenEval-style scores of the same images (``reader_*``) with its gap to the judge's."""
    from transfusion.eval import geneval
    from transfusion.eval.judge import Judge

    split = geneval.split_scores(read, prompts, k, inputs.held_out)
    out = {key: v for key, v in split.items() if key.startswith(("seen_", "held_out_"))}
    if inputs.reader_path is not None and not (inputs.reader_path / "no-judge.json").is_file():
        second = judged(Judge.load(inputs.reader_path).read(images), prompts, k)
        out |= {f"reader_{key}": v for key, v in second.items() if key.startswith("geneval_")}
        out["reader_gap_overall"] = abs(second["geneval_overall"] - metrics["geneval_overall"])
    return out


def _captioning(pipe, cfg: EvalConfig, inputs: EvalInputs, test, has_content: bool, result, bar) -> dict:
    """Greedy captions of ``caption_samples`` real test scenes, scored (kept in ``result``)."""
    from transfusion.eval.captioning import caption_scores, text_caption_scores

    n = min(cfg.caption_samples, len(test.images))
    texts: list[str] = []
    for start in bar(range(0, n, cfg.batch_size), "captioning"):
        texts += pipe.caption(test.images[start : min(n, start + cfg.batch_size)])
    truths = [r["caption"] for r in test.records[:n]]
    result.captions = [(r["caption"], t) for r, t in zip(test.records[:n], texts)]
    scores = caption_scores(test.records[:n], texts, inputs.palette) if has_content else {}
    return scores | text_caption_scores(truths, texts)


def _text(pipe, cfg: EvalConfig, inputs: EvalInputs) -> dict:
    """Bits per byte and perplexity of the held-out works, in chunks of the training length."""
    from transfusion.data.mixture import tokenize_corpus
    from transfusion.data.prepare import read_text_split
    from transfusion.eval.text import bits_per_byte

    ids = tokenize_corpus(pipe.tokenizer, read_text_split(inputs.text, "test"))[: cfg.text_max_tokens].tolist()
    n_bytes = len(pipe.tokenizer.decode(ids).encode("utf-8"))
    return bits_per_byte(pipe.model, ids, n_bytes, inputs.text_length)


def sample_many(pipe, captions: list[str], seed: int, sampling, batch_size: int, progress=None) -> np.ndarray:
    """One image per caption (N, H, W, 3) uint8, sampled as ``sampling`` (a ``SamplingConfig``)
    says, in batches; image i is drawn from ``seed + i`` whatever the batch size."""
    from transfusion.pipeline import sampling_kwargs

    bar = progress or (lambda it, desc: it)
    out = [np.zeros((0, pipe.image_size, pipe.image_size, 3), np.uint8)]
    for start in bar(range(0, len(captions), batch_size), "sampling"):
        batch = captions[start : start + batch_size]
        out.append(pipe.sample_images(batch, seed=seed + start, **sampling_kwargs(sampling)))
    return np.concatenate(out)


def judged(read: list[dict], prompts: list, k: int) -> dict[str, float]:
    """GenEval-style scores of ``k`` judged images per prompt, in prompt order."""
    from transfusion.eval import geneval

    return geneval.score([read[i * k : (i + 1) * k] for i in range(len(prompts))], prompts)


def _binding(pipe, cfg: EvalConfig, test) -> dict[str, float]:
    """Binding rankings on real test scenes (their latents through the pipeline's VAE)."""
    from transfusion.eval.binding import binding_scores, pairs

    wanted = sorted({i for rows in pairs(test.records, cfg.binding_scenes).values() for i, _, _ in rows})
    if not wanted:
        return {}
    latents = pipe.encode_images(test.images[wanted])
    records = [test.records[i] for i in wanted]
    return binding_scores(pipe.model, pipe.tokenizer, latents, records, cfg.binding_scenes, cfg.seed + SEED_BINDING)


def _fid(cfg: EvalConfig, inputs: EvalInputs, test, judge_ok: bool, sample) -> dict[str, float]:
    from transfusion.data.prepare import load_image_split
    from transfusion.eval.fid import fid_kid

    name = "judge" if cfg.feature_extractor == "judge" else "inception"
    if name == "judge" and not judge_ok:
        return {}
    generated = sample([r["caption"] for r in test.records[: cfg.fid_samples]])
    train_images = load_image_split(inputs.scenes, "train", len(generated)).images  # the floor at the same N
    got = fid_kid(generated, test.images, name, inputs.judge_path, cfg.inception_weights)
    floor = fid_kid(train_images, test.images, name, inputs.judge_path, cfg.inception_weights)
    return {
        f"fid_{name}": got["fid"],
        f"kid_{name}": got["kid"],
        f"fid_{name}_real_train_vs_test": floor["fid"],
        f"kid_{name}_real_train_vs_test": floor["kid"],
    }


def write_outputs(result: EvalResult, cfg: EvalConfig, paths: PathsConfig) -> None:
    """Metrics, GenEval's folder layout, the per-category and sweep CSVs (DVC plots), a grid per
    category, the README's picture (first image of ``grid_prompts`` prompts per category with
    GenEval's verdict), and ``caption_examples`` captions beside their truth."""
    from transfusion.eval import geneval
    from transfusion.images import render_grid
    from transfusion.io import atomic_file, write_csv, write_json

    k, metrics, prompts = cfg.images_per_prompt, result.metrics, result.prompts
    write_json(paths.eval_metrics, metrics)
    geneval.write_layout(paths.geneval, prompts, result.images)
    write_csv(paths.cfg_sweep_plot, result.sweep, SWEEP_COLUMNS)
    categories = [c for c in geneval.TAGS if f"geneval_{c}" in metrics]
    with atomic_file(paths.geneval_plot) as fh:  # GenEval's rule per category (a bar plot)
        fh.write("category,accuracy,se,blank_rate\n")
        fh.writelines(
            f"{c},{metrics[f'geneval_{c}']:.4f},{metrics[f'geneval_{c}_se']:.4f},{metrics[f'blank_rate_{c}']:.4f}\n"
            for c in categories
        )
    paths.eval_plots.mkdir(parents=True, exist_ok=True)
    for category in {p.category for p in prompts}:
        idx = [i for i, p in enumerate(prompts) if p.category == category][: cfg.grid_prompts]
        render_grid(
            np.concatenate([result.images[i] for i in idx]),
            [prompts[i].text() for i in idx for _ in range(k)],
            paths.eval_plots / f"geneval_{category}.png",
            cols=k,
        )
    if result.passed:
        pick = [
            i for c in geneval.TAGS for i in [j for j, p in enumerate(prompts) if p.category == c][: cfg.grid_prompts]
        ]
        render_grid(
            np.stack([result.images[i][0] for i in pick]),
            [f"{prompts[i].text()} ({'pass' if result.passed[i * k] else 'fail'})" for i in pick],
            paths.eval_plots / "samples_by_category.png",
            cols=cfg.grid_prompts,
        )
    with atomic_file(paths.eval_plots / "captions.csv") as fh:
        fh.write("truth,generated\n")
        fh.writelines(f"{truth},{text.replace(',', ' ')}\n" for truth, text in result.captions[: cfg.caption_examples])


def _prompt(record: dict):
    from transfusion.data.scenes import parse_caption

    return parse_caption(record["caption"])
