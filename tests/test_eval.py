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
    assert json.loads(tiny_pipeline.paths.judge_metrics.read_text())["scene_exact_match"] == metrics["scene_exact_match"]
    read = judge.read(test.images)
    for content, record in zip(read[:20], test.records[:20]):
        want = sorted((o["digit"], o["color"], o["row"], o["col"]) for o in record["content"]["objects"])
        assert sorted((o["digit"], o["color"], o["row"], o["col"]) for o in content["objects"]) == want


def test_geneval_score_is_one_on_real_scenes_and_lower_when_shuffled(judged):
    judge, _, test = judged
    prompts = [parse_caption(r["caption"]) for r in test.records]
    read = [[c] for c in judge.read(test.images)]
    real = geneval.score(read, prompts)
    assert real["geneval_overall"] == 1.0
    assert {k for k in real if k != "geneval_overall"} == {f"geneval_{c}" for c in {p.category for p in prompts}}
    shuffled = geneval.score(read, prompts[7:] + prompts[:7])
    assert shuffled["geneval_overall"] < 0.5


def test_overall_is_the_mean_of_categories():
    p1, p2 = parse_caption("a 7"), parse_caption("three 5s")
    c7 = {"objects": [{"digit": 7, "color": "red", "row": 0, "col": 0}]}
    out = geneval.score([[c7, c7, c7, {"objects": []}], [c7]], [p1, p2])
    assert out["geneval_single_object"] == 0.75 and out["geneval_counting"] == 0.0
    assert out["geneval_overall"] == pytest.approx(0.375)


GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "7", "count": 1}], "prompt": "a 7"},
    {"tag": "two_object", "include": [{"class": "3", "count": 1}, {"class": "7", "count": 1}], "prompt": "a 3 and a 7"},
    {"tag": "counting", "include": [{"class": "5", "count": 3}], "prompt": "three 5s"},
    {"tag": "colors", "include": [{"class": "4", "count": 1, "color": "red"}], "prompt": "a red 4"},
    {"tag": "position", "include": [{"class": "9", "count": 1}, {"class": "2", "count": 1, "position": ["left of", 0]}],
     "prompt": "a 2 to the left of a 9"},
    {"tag": "color_attr", "include": [{"class": "3", "count": 1, "color": "blue"}, {"class": "8", "count": 1, "color": "yellow"}],
     "prompt": "a blue 3 and a yellow 8"},
]


def test_geneval_prompt_file_and_folder_layout(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in GENEVAL_LINES) + "\n")
    prompts = geneval.read_prompt_file(path)
    assert [p.caption() for p in prompts] == [line["prompt"] for line in GENEVAL_LINES]
    assert [geneval.TAGS[p.category] for p in prompts] == [line["tag"] for line in GENEVAL_LINES]
    assert [geneval.metadata(p)["include"] for p in prompts[:4]] == [line["include"] for line in GENEVAL_LINES[:4]]
    assert geneval.metadata(prompts[5])["include"] == GENEVAL_LINES[5]["include"]

    images = [np.full((3, 32, 32, 3), i, np.uint8) for i in range(len(prompts))]
    geneval.write_layout(tmp_path / "out", prompts, images)
    folders = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert folders == [f"{i:05d}" for i in range(6)]
    meta = json.loads((tmp_path / "out" / "00003" / "metadata.jsonl").read_text())
    assert meta == {**GENEVAL_LINES[3]}
    assert sorted(p.name for p in (tmp_path / "out" / "00000" / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GENEVAL_LINES[0]) + "\n" + json.dumps({"tag": "colors", "prompt": "a photo of a cat"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: prompt 'a photo of a cat' fits no MNIST-scene template"):
        geneval.read_prompt_file(bad)


def test_fid_of_a_set_against_itself_is_zero_and_shifted_is_not(judged, tiny_pipeline):
    from transfusion.eval.fid import fid_kid

    _, _, test = judged
    same = fid_kid(test.images, test.images, "judge", tiny_pipeline.paths.judge)
    assert abs(same["fid"]) < 1e-2  # numerically 0 (sqrtm of a rank-deficient covariance); KID's unbiased estimator is not 0 for one set against itself)
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
        {"caption": "a red 4", "content": {"category": "colors", "objects": [{"digit": 4, "color": "red", "row": 0, "col": 0}]}},
        {"caption": "a 2 to the left of a 9", "content": {"category": "position", "relation": "left_of", "objects": [
            {"digit": 2, "color": "blue", "row": 1, "col": 0}, {"digit": 9, "color": "red", "row": 1, "col": 1}]}},
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
