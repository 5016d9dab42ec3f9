"""Shared fixtures: tiny local raw data and the real params shrunk to tiny, all under tmp dirs."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from transfusion import env

env.apply()
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]
TINY_PRESET = REPO / "pipelines" / "cpu-tiny.yaml"


def _glyph(digit: int, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 stand-in for an MNIST digit: a bright bar pattern that depends on the digit."""
    img = np.zeros((28, 28), dtype=np.uint8)
    for k in range(digit % 5 + 1):
        r = 6 + 3 * k + int(rng.integers(0, 2))
        img[r : r + 2, 6:22] = 255
    if digit >= 5:
        img[4:24, 12:15] = 200
    return img


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    """An .npz in the documented local format (x_train, y_train, x_test, y_test)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("mnist") / "mnist.npz"

    def make(n: int):
        y = np.arange(n) % 10
        return np.stack([_glyph(int(d), rng) for d in y]), y

    x_train, y_train = make(600)
    x_test, y_test = make(120)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture(scope="session")
def tiny_texts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("texts")
    words = "to be or not that is the question whether tis nobler in the mind suffer slings arrows".split()
    rng = np.random.default_rng(1)
    for i in range(8):
        lines = [" ".join(rng.choice(words, size=9)) for _ in range(40)]
        (folder / f"work_{i}.txt").write_text("\n".join(lines) + "\n")
    return folder


def tiny_overrides(root: Path, mnist: Path, texts: Path) -> dict:
    """The tiny preset, with every path under ``root`` and local raw data."""
    preset = yaml.safe_load(TINY_PRESET.read_text())
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    paths = {k: str(root / v) for k, v in base["paths"].items()}
    preset["paths"] = paths
    preset["tracking"] = {
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "artifact_location": str(root / "mlartifacts"),
    }
    preset["data"]["mnist"] = {"local_path": str(mnist)}
    preset["data"]["text"] = {"local_dir": str(texts), "n_val_works": 1, "n_test_works": 1}
    return preset


def write_tiny_params(root: Path, mnist: Path, texts: Path) -> Path:
    """params.yaml + pipelines/cpu-tiny.yaml + local data, written as one file under ``root``."""
    from transfusion.config import load_params

    root.mkdir(parents=True, exist_ok=True)
    overlay = root / "overlay.yaml"
    overlay.write_text(yaml.safe_dump(tiny_overrides(root, mnist, texts)))
    params = load_params([REPO / "params.yaml", overlay])
    out = root / "params.yaml"
    out.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return out


@pytest.fixture
def tiny_params(tmp_path, tiny_mnist, tiny_texts):
    from transfusion.config import load_params

    return load_params(write_tiny_params(tmp_path, tiny_mnist, tiny_texts))


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_mnist, tiny_texts):
    """The tiny params after data, tokenizer, vae and latents ran once (in process)."""
    from stages import data, latents, tokenizer, vae
    from transfusion.config import load_params

    params = load_params(write_tiny_params(tmp_path_factory.mktemp("pipeline"), tiny_mnist, tiny_texts))
    for stage in (data, tokenizer, vae, latents):
        stage.run(params)
    return params


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------
# tiny random models
# ---------------------------------------------------------------------------------------------
LATENT = (4, 8, 8)
MODEL_CORPUS = ["a red 4 and a blue 3 to the left of a 7", "to be or not to be that is the question"] * 50


@pytest.fixture(scope="session")
def text_tokenizer():
    from transfusion.data.tokenizer import train_bpe

    return train_bpe(MODEL_CORPUS, vocab_size=300)


@functools.cache
def _defaults():
    from transfusion.config import load_params

    return load_params(REPO / "params.yaml")


def section(name: str, **changes):
    """The ``name`` section of params.yaml (the one place defaults are written) with ``changes``,
    validated: ``section("vae", steps=40)``."""
    current = getattr(_defaults(), name)
    return type(current).model_validate({**current.model_dump(), **changes})


def attention_twins(tok, patch_encoder: str = "linear", device: str = "cpu"):
    """A default-params model with ``attention: sdpa`` and its twin with ``attention: flex``, the
    same weights, both in eval mode on ``device``."""
    from transfusion.model import TransfusionModel

    patch = section("model").patch_size  # the default layout; output layers random, so predictions are not 0
    dense = build_tiny_model(tok, diffusion=section("diffusion"), patch_size=patch, patch_encoder=patch_encoder)
    dense = dense.to(device)
    flex = TransfusionModel(dense.config.model_copy(update={"attention": "flex"})).to(device)
    flex.load_state_dict(dense.state_dict())
    return dense.eval(), flex.eval()


def mixed_rows(tok, model, max_length: int, seed: int = 0):
    """Packed rows of at most ``max_length`` tokens: caption->image, a document with two images,
    image->caption, text and caption->image (several documents to a row when they fit)."""
    import torch

    from transfusion.data.collate import Collator, Example, caption_to_image, image_to_caption, text_example

    ids = tok("a red 4", add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(seed)
    z = lambda: torch.randn(LATENT, generator=g)  # noqa: E731
    examples = [
        caption_to_image(ids, z()),
        Example([ids, z(), ids, z()]),
        image_to_caption(z(), ids),
        text_example(ids * 3),
        caption_to_image(ids, z()),
    ]
    return Collator(model.special, model.config.patches_per_image, max_length)(examples)


def assert_twins_agree(dense, flex, batch, tol: float) -> None:
    """Hidden states (real tokens) and image predictions of the twins equal within ``tol``."""
    import torch

    x = torch.randn(batch.images.shape, device=batch.valid.device)
    t = torch.rand(len(x), device=batch.valid.device) * 999
    with torch.no_grad():
        hd, pd = dense(batch, x, t)
        hf, pf = flex(batch, x, t)
    torch.testing.assert_close(hf[batch.valid], hd[batch.valid], rtol=tol, atol=tol)
    torch.testing.assert_close(pf, pd, rtol=tol, atol=tol)


def diffusion_config(objective: str, **kw):
    """The diffusion section for ``objective``."""
    return section("diffusion", objective=objective, **kw)


def sampling_config(objective: str, **kw):
    """The sampling section with ``objective``'s own sampler (flow_euler or ddpm)."""
    return section("sampling", sampler="flow_euler" if objective == "flow" else "ddpm", **kw)


def build_tiny_model(tokenizer, seed=0, diffusion=None, sampling=None, **model_kw):
    """A tiny model whose zero-initialised output layers are made random, so that image
    predictions depend on their inputs (property tests would pass vacuously otherwise)."""
    import torch

    from transfusion.model import TransfusionModel

    torch.manual_seed(seed)
    # the paper's layout (patch 2: 16 patches, DDPM) unless a test asks otherwise
    diffusion = diffusion or diffusion_config("ddpm")
    sampling = sampling or sampling_config(diffusion.objective)
    model = TransfusionModel.from_params(
        section("model", **{"patch_size": 2, **model_kw}), diffusion, sampling, tokenizer, LATENT
    )
    with torch.no_grad():
        for p in model.patch_out.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model.eval()


def pipeline_around(model, tokenizer):
    """``model`` in a pipeline with a tiny random VAE (8x8 latents <-> 32x32 images)."""
    from transfusion.pipeline import TransfusionPipeline
    from transfusion.vae import build_vae

    vae = build_vae(section("vae", block_out_channels=[8, 16, 16], norm_num_groups=8), image_size=32)
    return TransfusionPipeline(model, tokenizer, vae, 0.5)


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory, text_tokenizer):
    """A folder as the training stage exports it (random weights, tiny VAE), saved by the pipeline."""
    folder = tmp_path_factory.mktemp("export") / "model"
    pipeline_around(build_tiny_model(text_tokenizer), text_tokenizer).save_pretrained(folder)
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(port: int, path: str, proc, log: Path, what: str, timeout: float = 240) -> None:
    """Until GET ``path`` on loopback ``port`` answers below 500 (a plain connection: no proxy
    settings or global URL openers in the way); fails with ``log``'s tail if ``proc`` dies."""
    import http.client
    import time

    deadline, error = time.monotonic() + timeout, None
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status < 500:
                return
        except OSError as err:
            error = err
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start ({error!r}): " + log.read_text()[-1000:])
        time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for every test that trains on it (starting Ray costs ~30 s)."""
    import ray

    from transfusion.ray_session import ensure_ray

    ensure_ray(None, tmp_path_factory.mktemp("ray"), num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server on loopback (moto's server mode) with one bucket; yields the
    ``train.storage`` URI prefix for a folder in it, credentials in the URI (pyarrow's form)."""
    import subprocess
    import sys

    import pyarrow.fs as pafs

    port, log_path = free_port(), tmp_path_factory.mktemp("s3") / "moto.log"
    log = log_path.open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    try:
        wait_for_http(port, "/", server, log_path, "moto S3 server")
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs, _ = pafs.FileSystem.from_uri(f"s3://testing:testing@runs?{query}&allow_bucket_creation=true")
        fs.create_dir("runs")
        yield f"s3://testing:testing@runs/{{name}}?{query}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a few bytes of pixel data at most)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def descendants(pid: int) -> set[int]:
    """Every live process started (directly or not) by ``pid``, by walking /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """``pids`` still running (zombies awaiting their parent's wait count as gone)."""
    alive = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(pid)
        except OSError:
            pass
    return alive
