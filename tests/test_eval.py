"""Evaluation: the judge, GenEval-style scoring and formats, FID via torch-fidelity, captioning
scores and bits per byte."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from transfusion.data.prepare import load_image_split
from transfusion.data.scenes import parse_caption
from transfusion.eval import geneval


@pytest.fixture(scope="module")
def judged(tiny_pipeline):
    """The judge stage on the tiny pipeline (synthetic digits: easy to read)."""
    from stages import judge
    from transfusion.eval.judge import Judge

    params = tiny_pipeline.model_copy(update={"judge": tiny_pipeline.judge.model_copy(update={"epochs": 15})})
    metrics = judge.run(params)
    return Judge.load(tiny_pipeline.paths.judge), metrics, load_image_split(tiny_pipeline.paths.scenes, "test")


def test_judge_reads_real_test_scenes(judged, tiny_pipeline):
    judge, metrics, test = judged
    assert metrics["scene_exact_match"] >= 0.99 and metrics["meets_minimum"] == 1.0
    assert (
        json.loads(tiny_pipeline.paths.judge_metrics.read_text())["scene_exact_match"] == metrics["scene_exact_match"]
    )
    read = judge.read(test.images)
    for content, record in zip(read[:20], test.records[:20]):
        want = sorted((o["digit"], o["color"], o["row"], o["col"]) for o in record["content"]["objects"])
        assert sorted((o["digit"], o["color"], o["row"], o["col"]) for o in content["objects"]) == want


def test_geneval_score_is_one_on_real_scenes_and_lower_when_shuffled(judged):
    judge, _, test = judged
    prompts = [parse_caption(r["caption"]) for r in test.records]
    read = [[c] for c in judge.read(test.images)]
    real = geneval.score(read, prompts)
    assert real["geneval_overall"] == 1.0 and real["scene_match_overall"] == 1.0
    categories = {p.category for p in prompts}
    assert {k for k in real if not k.endswith("_se") and not k.startswith("blank")} == {
        f"{rule}_{c}" for rule in ("geneval", "scene_match") for c in [*categories, "overall"]
    }
    assert real["blank_rate"] == 0.0 and real["geneval_overall_se"] == 0.0
    shuffled = geneval.score(read, prompts[7:] + prompts[:7])
    assert shuffled["scene_match_overall"] < 0.5
    assert shuffled["scene_match_overall"] <= shuffled["geneval_overall"] < 0.75  # GenEval's rule is the laxer


def test_reward_is_one_for_a_correct_scene_and_zero_for_a_wrong_one(judged):
    """The post-training reward is GenEval's rule on the judge's reading: real test scenes earn
    1 for their own caption and 0 for the caption made false by one swap (relation, colours)."""
    from transfusion.eval.binding import flipped

    judge, _, test = judged
    rows = [(i, parse_caption(r["caption"])) for i, r in enumerate(test.records)]
    rows = [(i, p) for i, p in rows if flipped(p) is not None][:12]
    assert {p.category for _, p in rows} == {"position", "color_attr"}
    read = judge.read(test.images[[i for i, _ in rows]])
    assert [geneval.reward(c, p) for c, (_, p) in zip(read, rows)] == [1.0] * len(rows)
    assert [geneval.reward(c, flipped(p)) for c, (_, p) in zip(read, rows)] == [0.0] * len(rows)
    assert geneval.reward({"objects": []}, parse_caption("a 7")) == 0.0


def _obj(digit, row, col, color="red", score=0.9):
    return {"digit": digit, "color": color, "row": row, "col": col, "score": score}


def test_geneval_rule_follows_genevals_evaluate():
    meta = lambda caption: geneval.metadata(parse_caption(caption))  # noqa: E731
    ok = geneval.geneval_correct
    # single / two objects: the asked objects must be there; others may be too
    assert ok({"objects": [_obj(7, 0, 0), _obj(3, 1, 1)]}, meta("a 7"))
    assert not ok({"objects": [_obj(3, 1, 1)]}, meta("a 7"))
    assert ok({"objects": [_obj(3, 0, 0), _obj(7, 1, 1), _obj(7, 0, 1)]}, meta("a 3 and a 7"))
    # counting: exactly n (exclude n + 1); other classes allowed
    fives = lambda n: [_obj(5, i // 2, i % 2) for i in range(n)]  # noqa: E731
    assert ok({"objects": fives(3)}, meta("three 5s"))
    assert ok({"objects": fives(3)[:2] + [_obj(2, 1, 1)]}, meta("two 5s"))
    assert not ok({"objects": fives(4)}, meta("three 5s"))
    assert not ok({"objects": fives(2)}, meta("three 5s"))
    # colour: judged on the most confident object of the class
    red_low = {"objects": [_obj(4, 0, 0, "red", 0.6), _obj(4, 1, 1, "green", 0.99)]}
    red_high = {"objects": [_obj(4, 0, 0, "red", 0.99), _obj(4, 1, 1, "green", 0.6)]}
    assert not ok(red_low, meta("a red 4")) and ok(red_high, meta("a red 4"))
    assert ok({"objects": [_obj(3, 0, 0, "blue"), _obj(8, 0, 1, "yellow")]}, meta("a blue 3 and a yellow 8"))
    assert not ok({"objects": [_obj(3, 0, 0, "yellow"), _obj(8, 0, 1, "blue")]}, meta("a blue 3 and a yellow 8"))
    # position: GenEval's box geometry (a diagonal neighbour is both left of and above)
    assert ok({"objects": [_obj(2, 0, 0), _obj(9, 0, 1)]}, meta("a 2 to the left of a 9"))
    assert ok({"objects": [_obj(2, 1, 0), _obj(9, 0, 1)]}, meta("a 2 to the left of a 9"))
    assert not ok({"objects": [_obj(2, 0, 1), _obj(9, 0, 0)]}, meta("a 2 to the left of a 9"))
    assert not ok({"objects": [_obj(2, 0, 0), _obj(9, 1, 0)]}, meta("a 2 to the left of a 9"))
    assert ok({"objects": [_obj(0, 0, 1), _obj(1, 1, 1)]}, meta("a 0 above a 1"))
    assert not ok({"objects": [_obj(0, 0, 1)]}, meta("a 0 above a 1"))  # no target


def test_relative_position_of_grid_cells():
    rel = geneval.relative_position
    assert rel(_obj(1, 0, 0), _obj(1, 0, 1)) == {"left of"}
    assert rel(_obj(1, 1, 1), _obj(1, 0, 1)) == {"below"}
    assert rel(_obj(1, 0, 0), _obj(1, 1, 1)) == {"left of", "above"}
    assert rel(_obj(1, 0, 0), _obj(1, 0, 0)) == set()


def test_scene_match_is_strict_where_geneval_is_not():
    extra = {"objects": [_obj(7, 0, 0), _obj(3, 1, 1)]}
    out = geneval.score([[extra]], [parse_caption("a 7")])
    assert out["geneval_single_object"] == 1.0 and out["scene_match_single_object"] == 0.0


def test_quick_eval_is_judged_and_skipped_without_a_judge(judged, tiny_pipeline, tmp_path):
    from transfusion.data.tokenizer import load_tokenizer
    from transfusion.eval.probe import load_probe_data, quick_eval
    from transfusion.model import TransfusionModel
    from transfusion.pipeline import TransfusionPipeline

    p = tiny_pipeline
    tok = load_tokenizer(p.paths.tokenizer)
    data = load_probe_data(p.paths.latents, tok, 12, p.paths.judge, dict(p.data.scenes.palette))
    assert data.judge is not None and len(data.latents) == len(data.records) == 12
    model = TransfusionModel.from_params(p.model, p.diffusion, p.sampling, tok, tuple(data.latents.shape[1:]))
    pipe = TransfusionPipeline.from_parts(model, p.paths.tokenizer, p.paths.vae, p.paths.latents)
    probe = p.train.probe.model_copy(update={"prompts_per_category": 1, "captions": 6})
    sampling = p.sampling.model_copy(update={"steps": 2})
    out = quick_eval(pipe, data, probe, sampling)
    assert {"quick_geneval_overall", "quick_scene_match_overall", "quick_caption_exact"} <= set(out)
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert out["quick_scene_match_overall"] <= out["quick_geneval_overall"]  # the exact scene is the stricter rule
    unjudged = load_probe_data(p.paths.latents, tok, 12, tmp_path / "none", {})
    assert unjudged.judge is None and quick_eval(pipe, unjudged, probe, sampling) == {}


def test_overall_is_the_mean_of_categories():
    p1, p2 = parse_caption("a 7"), parse_caption("three 5s")
    c7 = {"objects": [{"digit": 7, "color": "red", "row": 0, "col": 0}]}
    out = geneval.score([[c7, c7, c7, {"objects": []}], [c7]], [p1, p2])
    for rule in ("geneval", "scene_match"):
        assert out[f"{rule}_single_object"] == 0.75 and out[f"{rule}_counting"] == 0.0
        assert out[f"{rule}_overall"] == pytest.approx(0.375)
    # one empty canvas of four single-object images, none among counting's one
    assert out["blank_rate_single_object"] == 0.25 and out["blank_rate_counting"] == 0.0
    assert out["blank_rate"] == pytest.approx(0.125)


def test_standard_errors_are_those_of_the_prompt_means():
    """Clustered by prompt: the error is the spread of the prompts' means over sqrt(prompts);
    the overall's combines the categories' as independent means of six."""
    prompts = [parse_caption(c) for c in ("a 7", "a 3", "a 1", "a 2")]
    hit = lambda d: {"objects": [{"digit": d, "color": "red", "row": 0, "col": 0}]}  # noqa: E731
    miss = {"objects": []}
    read = [[hit(7)] * 4, [hit(3), hit(3), miss, miss], [miss] * 4, [hit(2), miss, miss, miss]]
    out = geneval.score(read, prompts)
    means = np.array([1.0, 0.5, 0.0, 0.25])
    assert out["geneval_single_object"] == pytest.approx(means.mean())
    assert out["geneval_single_object_se"] == pytest.approx(means.std(ddof=1) / 2)
    assert out["geneval_overall_se"] == pytest.approx(out["geneval_single_object_se"])  # one category
    assert out["blank_rate_single_object"] == pytest.approx(1 - means.mean())
    # images identical within each prompt carry no more information than one image per prompt
    same = geneval.score([[hit(7)] * 4, [miss] * 4], prompts[:1] * 2)
    one = geneval.score([[hit(7)], [miss]], prompts[:1] * 2)
    assert same["geneval_single_object_se"] == pytest.approx(one["geneval_single_object_se"])
    assert geneval.mean_and_se([[1.0, 0.0, 1.0, 1.0]]) == pytest.approx((0.75, (0.75 * 0.25 / 4) ** 0.5))


def test_balanced_prompts_cover_every_factor_evenly_and_are_valid():
    palette = ["red", "green", "blue", "yellow", "magenta", "cyan", "white"]
    prompts = geneval.balanced_prompts(40, palette, seed=3)
    assert prompts == geneval.balanced_prompts(40, palette, seed=3)  # seeded
    assert prompts != geneval.balanced_prompts(40, palette, seed=4)
    by = {c: [p for p in prompts if p.category == c] for c in geneval.TAGS}
    assert all(len(v) == 40 for v in by.values())
    for category, ps in by.items():
        assert all(parse_caption(p.text(), dict.fromkeys(palette)) == p for p in ps)  # templates round-trip
        for slot in range(len(ps[0].digits[:2])):
            counts = np.bincount([p.digits[slot] for p in ps], minlength=10)
            assert counts.max() - counts.min() <= 1, (category, slot, counts)
    relations = np.unique([p.relation for p in by["position"]], return_counts=True)[1]
    assert relations.tolist() == [10, 10, 10, 10]
    assert len(set(by["position"])) == 40 and len(set(by["color_attr"])) == 40  # no repeats while the space lasts
    assert set(by["single_object"]) == set(geneval.prompt_space("single_object", palette))
    colours = np.unique([c for p in by["color_attr"] for c in p.colors], return_counts=True)[1]
    assert len(colours) == 7 and colours.max() - colours.min() <= 2
    assert {len(p.digits) for p in by["counting"]} == {2, 3, 4}


GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "7", "count": 1}], "prompt": "a 7"},
    {"tag": "two_object", "include": [{"class": "3", "count": 1}, {"class": "7", "count": 1}], "prompt": "a 3 and a 7"},
    {
        "tag": "counting",
        "include": [{"class": "5", "count": 3}],
        "exclude": [{"class": "5", "count": 4}],
        "prompt": "three 5s",
    },
    {"tag": "colors", "include": [{"class": "4", "count": 1, "color": "red"}], "prompt": "a red 4"},
    {
        "tag": "position",
        "include": [{"class": "9", "count": 1}, {"class": "2", "count": 1, "position": ["left of", 0]}],
        "prompt": "a 2 to the left of a 9",
    },
    {
        "tag": "color_attr",
        "include": [{"class": "3", "count": 1, "color": "blue"}, {"class": "8", "count": 1, "color": "yellow"}],
        "prompt": "a blue 3 and a yellow 8",
    },
]


def test_geneval_prompt_file_and_folder_layout(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in GENEVAL_LINES) + "\n")
    prompts = geneval.read_prompt_file(path)
    assert [p.text() for p in prompts] == [line["prompt"] for line in GENEVAL_LINES]
    assert [geneval.TAGS[p.category] for p in prompts] == [line["tag"] for line in GENEVAL_LINES]
    assert [geneval.metadata(p) for p in prompts] == GENEVAL_LINES  # GenEval's own metadata, field for field

    images = [np.full((3, 32, 32, 3), i, np.uint8) for i in range(len(prompts))]
    geneval.write_layout(tmp_path / "out", prompts, images)
    folders = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert folders == [f"{i:05d}" for i in range(6)]
    meta = json.loads((tmp_path / "out" / "00003" / "metadata.jsonl").read_text())
    assert meta == {**GENEVAL_LINES[3]}
    assert sorted(p.name for p in (tmp_path / "out" / "00000" / "samples").iterdir()) == [
        "0000.png",
        "0001.png",
        "0002.png",
    ]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(GENEVAL_LINES[0]) + "\n" + json.dumps({"tag": "colors", "prompt": "a photo of a cat"}) + "\n"
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:2: prompt 'a photo of a cat' fits no MNIST-scene template"):
        geneval.read_prompt_file(bad)


def test_fid_of_a_set_against_itself_is_zero_and_shifted_is_not(judged, tiny_pipeline):
    from transfusion.eval.fid import fid_kid

    _, _, test = judged
    same = fid_kid(test.images, test.images, "judge", tiny_pipeline.paths.judge)
    # numerically 0 (sqrtm of a rank-deficient covariance); KID's unbiased estimator is not 0
    # for one set against itself
    assert abs(same["fid"]) < 1e-2
    shifted_images = np.roll(test.images, 8, axis=2)  # digits move across cell borders
    shifted = fid_kid(test.images, shifted_images, "judge", tiny_pipeline.paths.judge)
    assert shifted["fid"] > 1.0 and shifted["kid"] > 0


def test_inception_without_weights_offline_says_what_to_do(tmp_path, monkeypatch):
    from transfusion.eval.fid import fid_kid

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # and no network
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    images = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="needs its weights: set eval.inception_weights"):
        fid_kid(images, images, "inception")


def test_caption_scores():
    from transfusion.eval.captioning import caption_scores

    records = [
        {
            "caption": "a red 4",
            "content": {"category": "colors", "objects": [{"digit": 4, "color": "red", "row": 0, "col": 0}]},
        },
        {
            "caption": "a 2 to the left of a 9",
            "content": {
                "category": "position",
                "relation": "left_of",
                "objects": [
                    {"digit": 2, "color": "blue", "row": 1, "col": 0},
                    {"digit": 9, "color": "red", "row": 1, "col": 1},
                ],
            },
        },
    ]
    perfect = caption_scores(records, [r["caption"] for r in records])
    assert perfect["caption_exact"] == 1.0 and perfect["caption_colour"] == 1.0 and perfect["caption_position"] == 1.0
    wrong = caption_scores(records, ["a blue 4", "a 2 to the right of a 9"])
    assert wrong["caption_exact"] == 0.0 and wrong["caption_digit"] == 1.0 and wrong["caption_count"] == 1.0
    assert wrong["caption_colour"] == 0.0 and wrong["caption_position"] == 0.0
    junk = caption_scores(records, ["hello", ""])
    assert junk["caption_parsed"] == 0.0 and junk["caption_exact"] == 0.0


def test_bits_per_byte_of_a_uniform_model(text_tokenizer):
    from conftest import build_tiny_model
    from transfusion.eval.text import bits_per_byte

    model = build_tiny_model(text_tokenizer)
    with torch.no_grad():
        model.backbone.lm_head.weight.zero_()  # every token equally likely: log2(V) bits each
    text = "To be, or not to be, that is the question."
    ids = text_tokenizer(text, add_special_tokens=False)["input_ids"]
    V = model.backbone.lm_head.weight.shape[0]
    out = bits_per_byte(model, ids, len(text.encode()), chunk=5)
    assert out["text_bits_per_byte"] == pytest.approx(len(ids) * math.log2(V) / len(text.encode()), rel=1e-5)
    assert out["text_perplexity"] == pytest.approx(V, rel=1e-4)
