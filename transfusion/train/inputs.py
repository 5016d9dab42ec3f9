"""The inputs a training worker reads, through ``train.storage`` on a cluster.

``paths.*`` are the pipeline's local files (DVC tracks them; ``dvc push`` shares them). When
``train.storage`` is a URI, the driver publishes what the workers read -- latents, text,
tokenizer, VAE and judge -- to ``<storage>/inputs/<name>`` (skipped when the copy there has the
same manifest), and each worker fetches them into its node's temp folder before training, so a
worker on any node needs neither a shared disk nor the driver's paths.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from transfusion.storage import Store, join

INPUTS = ("latents", "text", "tokenizer", "vae", "judge")
MANIFEST = ".inputs-manifest.json"


def _manifest(folder: Path) -> bytes:
    from transfusion.io import sha256_of

    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    listing = {p.relative_to(folder).as_posix(): [p.stat().st_size, sha256_of(p)] for p in files}
    return json.dumps(listing, sort_keys=True).encode()


def publish(paths, storage: str) -> list[str]:
    """Upload the inputs under ``paths`` that are not already in ``<storage>/inputs``; returns
    the names uploaded."""
    store, sent = Store(join(storage, "inputs")), []
    for name in INPUTS:
        local = Path(getattr(paths, name))
        if not local.is_dir():
            continue  # no judge: the probes run without the quick judged evaluation
        manifest = _manifest(local)
        if store.read(f"{name}/{MANIFEST}") != manifest:
            store.put(local, name, trailer=(MANIFEST, manifest))
            sent.append(name)
    return sent


def fetch(paths, storage: str):
    """``paths`` with the inputs replaced by local copies from ``<storage>/inputs`` (fetched once
    per node and content), and the run's scratch folders (checkpoint staging, samples) in this
    node's temp folder."""
    from filelock import FileLock

    store = Store(join(storage, "inputs"))
    cache = Path(tempfile.gettempdir()) / "transfusion-inputs"
    cache.mkdir(parents=True, exist_ok=True)
    updates = {}
    for name in INPUTS:
        manifest = store.read(f"{name}/{MANIFEST}")
        if manifest is None:
            updates[name] = cache / f"{name}-absent"
            continue
        local = cache / f"{name}-{hashlib.sha256(manifest).hexdigest()[:16]}"
        with FileLock(str(local) + ".lock"):  # two workers on one node fetch it once
            if not local.is_dir():
                store.get(name, local)
        updates[name] = local
    scratch = Path(tempfile.mkdtemp(prefix="transfusion-run-"))
    updates |= {"checkpoints": scratch / "checkpoints", "runs": scratch / "runs"}
    return paths.model_copy(update=updates)
