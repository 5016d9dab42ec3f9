"""Real data at scale: WebDataset and Parquet sources streamed into splits by key hash, bad
records counted, sources and latent shards on S3 (moto on loopback), a team's pretrained VAE, and
latents encoded on Ray Data actors (equal to one process, resumable)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from streamed_data import encoded, make_parquet, make_webdataset, picture, save_pretrained_vae

from transfusion.config import Params
from transfusion.data.latents import (
    KEY,
    LatentReader,
    check_latents,
    encode_here,
    fingerprint,
    load_meta,
    shard_tasks,
    work_location,
)
from transfusion.data.prepare import load_image_split
from transfusion.data.shards import shard_name
from transfusion.data.streams import Record, decode_record, split_of
from transfusion.errors import BadInput, DataError
from transfusion.storage import Store

REPO = Path(__file__).resolve().parents[1]


def variant(params: Params, **changes) -> Params:
    """``params`` with dotted keys changed (``**{"data.source": "parquet"}``), validated."""
    data = params.model_dump(mode="json")
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value
    return Params.model_validate(data)


def streamed(params: Params, root: Path, source: str, urls: list[str], **changes) -> Params:
    """Params reading ``urls`` as ``source`` with every output under ``root``."""
    paths = params.paths.model_dump(mode="json")
    paths = {k: v if k == "cache" else str(root / Path(v).name) for k, v in paths.items()}
    return variant(
        params,
        paths=paths,
        **{"data.source": source, "data.stream.urls": urls, "data.val_fraction": 0.15, "data.test_fraction": 0.2},
        **{"data.stream.caption_key": "txt" if source == "webdataset" else "text", "data.scenes.shard_size": 40},
        **changes,
    )


def _make(source: str, folder: Path, n: int, bad: tuple[int, ...] = (), per: int = 50) -> Path:
    if source == "webdataset":
        return make_webdataset(folder, n, size=48, per_shard=per, bad=bad)
    return make_parquet(folder, n, size=48, per_file=per, bad=bad)


def _splits(params: Params) -> dict[str, list[str]]:
    splits = ("train", "val", "test")
    return {s: [r["source"] for r in load_image_split(params.paths.scenes, s).records] for s in splits}


@pytest.mark.parametrize("source", ["webdataset", "parquet"])
def test_a_stream_lands_in_key_hash_splits_with_bad_records_counted(tiny_params, tmp_path, source):
    from stages import data

    shards = _make(source, tmp_path / "src", 150, bad=(5, 8))
    p = streamed(tiny_params, tmp_path / "out", source, [str(shards)], **{"data.max_bad_fraction": 0.05})
    metrics = data.run(p)

    assert metrics["records_read"] == 150 and metrics["bad_records"] == 2
    written = json.loads(p.paths.data_metrics.read_text())
    key = (lambda i: f"sample{i:07d}") if source == "webdataset" else (lambda i: f"train-00000/{i:08d}")
    assert [w.split(":")[0] for w in written["bad_records_first"]] == [key(5), key(8)]
    assert "no caption" in written["bad_records_first"][0] and "cannot read image" in written["bad_records_first"][1]
    splits = _splits(p)
    assert sum(len(v) for v in splits.values()) == 148 == sum(metrics[f"{s}_images"] for s in splits)
    for split, keys in splits.items():  # each record where its key's hash puts it
        assert keys and all(split_of(k, 0.15, 0.2) == split for k in keys)
    # the pixels: centre-cropped and resized to the canvas, captions as written
    test = load_image_split(p.paths.scenes, "test")
    i = next(j for j in range(150) if key(j) == test.records[0]["source"])
    img, caption = picture(i, 48)
    np.testing.assert_array_equal(test.images[0], decode_record(Record(key(i), encoded(img), caption), 32))
    assert test.records[0]["caption"] == caption and test.images.shape[1:] == (32, 32, 3)


def test_key_hash_splits_do_not_depend_on_shard_layout_or_order(tiny_params, tmp_path):
    from stages import data

    a = streamed(tiny_params, tmp_path / "a", "webdataset", [str(make_webdataset(tmp_path / "s50", 120, 48, 50))])
    data.run(a)
    folder = make_webdataset(tmp_path / "s30", 120, 48, 30)
    urls = [str(folder / f"shard-{s:05d}.tar") for s in (3, 1, 0, 2)]  # other shards, other order
    b = streamed(tiny_params, tmp_path / "b", "webdataset", urls)
    data.run(b)
    assert {k: sorted(v) for k, v in _splits(a).items()} == {k: sorted(v) for k, v in _splits(b).items()}


def test_too_many_bad_records_stop_the_stage_in_one_line_writing_nothing(tiny_params, tmp_path):
    shards = make_parquet(tmp_path / "src", 60, 48, bad=(1, 2, 3))  # 5% bad
    p = streamed(tiny_params, tmp_path / "out", "parquet", [str(shards)], **{"data.max_bad_fraction": 0.02})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p.model_dump(mode="json")))
    proc = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "data", "-p", str(tmp_path / "params.yaml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "3 of 60 records are bad, more than data.max_bad_fraction (0.02)" in last
    assert "train-00000/00000001: no caption" in last
    assert not p.paths.scenes.exists() and not p.paths.data_metrics.exists()


def test_a_url_that_names_nothing_is_one_line(tiny_params, tmp_path):
    from stages import data

    p = streamed(tiny_params, tmp_path / "out", "webdataset", [str(tmp_path / "no-such-{0..1}.tar")])
    with pytest.raises(DataError, match=r"data.stream.urls: .*no-such-0.tar is neither a .tar file nor a folder"):
        data.run(p)


@pytest.mark.parametrize("source", ["webdataset", "parquet"])
def test_sources_stream_from_s3_as_from_a_local_folder(tiny_params, tmp_path, s3_server, source):
    from stages import data

    shards = _make(source, tmp_path / "src", 90, bad=(4,))
    Store(s3_server.format(name="sources")).put(shards, source)
    uri = s3_server.format(name=f"sources/{source}")
    local = streamed(tiny_params, tmp_path / "local", source, [str(shards)], **{"data.max_bad_fraction": 0.05})
    remote = streamed(tiny_params, tmp_path / "s3", source, [uri], **{"data.max_bad_fraction": 0.05})
    assert data.run(remote)["bad_records"] == 1
    data.run(local)
    missing = streamed(tiny_params, tmp_path / "gone", source, [s3_server.format(name="sources/none")])
    with pytest.raises(DataError, match=r"^data.stream.urls: s3://runs/sources/none\?.* is neither") as err:
        data.run(missing)
    assert "testing" not in str(err.value)  # the credentials in the URI are not shown
    for split in ("train", "val", "test"):
        a, b = load_image_split(local.paths.scenes, split), load_image_split(remote.paths.scenes, split)
        np.testing.assert_array_equal(a.images, b.images)
        assert a.records == b.records


# ---------------------------------------------------------------------------------------------
# a pretrained VAE
# ---------------------------------------------------------------------------------------------
def test_a_pretrained_vae_is_used_as_it_is_and_measured(tiny_pipeline, tmp_path):
    from stages import vae as vae_stage
    from transfusion.vae import load_vae, psnr, reconstruct

    folder = save_pretrained_vae(tmp_path / "team-vae", scaling_factor=0.5)
    paths = {"vae": str(tmp_path / "vae"), "vae_metrics": str(tmp_path / "vae.json")}
    paths |= {"vae_loss_plot": str(tmp_path / "loss.csv"), "vae_reconstructions": str(tmp_path / "recon.png")}
    p = variant(tiny_pipeline, **{f"paths.{k}": v for k, v in paths.items()}, **{"vae.pretrained": str(folder)})
    metrics = vae_stage.run(p)

    team = load_vae(folder)
    test = load_image_split(p.paths.scenes, "test").images
    assert metrics["pretrained"] == 1.0 and metrics["scaling_factor_config"] == 0.5
    assert metrics["test_psnr"] == pytest.approx(psnr(test, reconstruct(team, test)), abs=1e-6)
    assert "final_loss" not in metrics and p.paths.vae_loss_plot.read_text() == "step,loss,mse,kl\n"
    saved = load_vae(p.paths.vae).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in team.state_dict().items())  # not trained


def test_a_pretrained_vae_that_downsamples_otherwise_is_one_line(tiny_pipeline, tmp_path):
    from transfusion.vae import load_pretrained

    folder = save_pretrained_vae(tmp_path / "team-vae")
    p = variant(
        tiny_pipeline, **{"vae.pretrained": str(folder), "vae.downsample": 8, "latents.size": 4, "model.patch_size": 2}
    )
    with pytest.raises(BadInput, match=r"team-vae downsamples by 4 \(3 blocks\), but vae.downsample is 8"):
        load_pretrained(p.vae, p.data.scenes.canvas)


# ---------------------------------------------------------------------------------------------
# latents on Ray Data
# ---------------------------------------------------------------------------------------------
def _latent_variant(p: Params, root: Path, **changes) -> Params:
    moved = {f"paths.{k}": str(root / k) for k in ("latents", "latents_metrics", "runs")}
    return variant(p, **moved, **{"latents.workers": 2, "latents.cpus_per_worker": 1}, **changes)


def test_two_ray_workers_write_what_one_process_writes_and_a_rerun_resumes(tiny_pipeline, tmp_path, ray_local):
    from stages import latents

    p = _latent_variant(tiny_pipeline, tmp_path)
    tasks = shard_tasks(p.paths.scenes)
    assert len(tasks) >= 4
    # a run that stopped after two shards: they are in the work folder, the rest is not
    work = work_location(None, p.paths.runs.resolve(), fingerprint(p.paths.scenes, p.paths.vae))
    encode_here(p.paths.vae, p.paths.scenes, Store(work), 64, tasks[:2])
    metrics = latents.run(p)
    assert metrics["workers"] == 2 and metrics["shards_resumed"] == 2
    assert metrics["shards_encoded"] == len(tasks) - 2 and not Path(work).exists()

    from safetensors.numpy import load, load_file

    single = Store(tmp_path / "single")
    encode_here(p.paths.vae, p.paths.scenes, single, 64, tasks)
    for split, shard in tasks:
        name = f"{split}/{shard_name(KEY, shard)}"
        np.testing.assert_allclose(load_file(str(p.paths.latents / name))[KEY], load(single.read(name))[KEY], atol=1e-5)
    ref = load_meta(tiny_pipeline.paths.latents)
    assert load_meta(p.paths.latents)["scaling_factor"] == pytest.approx(ref["scaling_factor"], rel=1e-5)


def test_latent_shards_at_a_storage_uri_stream_to_each_worker(tiny_pipeline, tmp_path, s3_server, ray_local):
    from stages import latents

    p = _latent_variant(tiny_pipeline, tmp_path, **{"latents.storage": s3_server.format(name="latents")})
    latents.run(p)
    assert not list(p.paths.latents.rglob("*.safetensors"))  # only meta.json and the indexes here
    check_latents(p.paths.latents)
    local = [z for z, _ in LatentReader(tiny_pipeline.paths.latents, "train")]
    remote = [z for z, _ in LatentReader(p.paths.latents, "train")]
    np.testing.assert_allclose(torch.stack(remote), torch.stack(local), atol=1e-4)
    # two data-parallel workers: whole shards each, disjoint, together everything
    parts = [LatentReader(p.paths.latents, "train", rank=k, world_size=2) for k in range(2)]
    assert all(r.by_shard for r in parts) and set(parts[0].shards).isdisjoint(parts[1].shards)
    rows = [sorted((r["shard"], r["row"]) for _, r in part) for part in parts]
    everything = sorted((r["shard"], r["row"]) for _, r in LatentReader(p.paths.latents, "train"))
    assert sorted(rows[0] + rows[1]) == everything
    assert {s for s, _ in rows[0]} == set(parts[0].shards) and len(rows[0]) == len(parts[0])
    # a truncated shard in the bucket is named before training starts
    store = Store(load_meta(p.paths.latents)["location"])
    name = f"train/{shard_name(KEY, 1)}"
    store.write(name, store.read(name)[:-100])
    with pytest.raises(DataError, match=r"latents-00001.safetensors: .*bytes, its header says"):
        check_latents(p.paths.latents)


def test_key_hash_splits_take_their_fractions():
    keys = [f"img/{i:06d}" for i in range(20000)]
    splits = [split_of(k, 0.05, 0.1) for k in keys]
    for split, share in (("test", 0.1), ("val", 0.05), ("train", 0.85)):
        se = (share * (1 - share) / len(keys)) ** 0.5
        assert abs(splits.count(split) / len(keys) - share) < 4 * se, split
    assert splits == [split_of(k, 0.05, 0.1) for k in keys]  # a function of the key alone
