"""Can the backbone learn *where* things are in an image? A one-minute test on discrete cells.

    python benchmarks/binding_learnability.py [--task read|write] [--steps 3000] [--variants causal,...]

The position task of the MNIST scenes with the pixels taken out: an image is its 4 cells as
discrete tokens (``digit d`` or ``empty``), laid out as Transfusion lays out patches::

    <bos> <boi> c00 c01 c10 c11 <eoi> a 2 to the left of a 9 <eos>

and the tiny LLaMA of the default pipeline learns the captions (loss on caption tokens only).
Every scene is a position scene: two digits in one row or one column. The score is how often
the model puts the true relation word above its flip, teacher-forced, on fresh scenes:
"above" / "below" right after the first digit, "left" / "right" after "... to the". Chance is
0.5. Variants differ only in how the cells are seen, through the library's own code: the
hybrid mask (``image_attention``: cells bidirectional as in Transfusion, or causal as text) and
the patch position table (``model.patch_positions``). A change to either shows here, in a
minute, whether binding a digit to its cell can be learned at all.

``--task write`` asks the other direction, caption -> image: the caption comes first and the 4
cells follow at full noise; each cell slot predicts its own cell, as the denoiser must decide
the layout at the highest noise level. The score is how often the true layout is more likely
than the one with the two digits swapped between their cells.

``--task flow`` is the write task with continuous cells, as the pipeline has them: each cell
content a fixed 64-dimensional vector (a 4 x 4 x 4 latent patch), noised and denoised by the
library's ``FlowMatchingObjective`` (velocity target, ``--shift`` for the training timesteps),
through linear cell adapters and diffusers' timestep embedding. The score is the pipeline's
write ranking: the true image's flow loss (noise levels 0.5, 0.75, 0.95, the same noise) lower
under the true caption than under the caption with the relation word flipped.

Prints one row per variant and evaluation step: left/right and above/below accuracy.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from transfusion.model import backbone as bb
from transfusion.model.mask import hybrid_mask
from transfusion.model.positions import PatchPositions

WORDS = ["<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "a", "to", "the", "left", "right", "of", "above", "below"]
DIGITS = [str(d) for d in range(10)]
CELLS = [f"cell{d}" for d in range(10)] + ["cell_empty", "cell_noise"]
VOCAB = {w: i for i, w in enumerate(WORDS + DIGITS + CELLS)}
CELL_IDS = torch.tensor([VOCAB[c] for c in CELLS[:-1]])  # what a cell can hold (noise excluded)
PHRASES = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
SIDE, P = 2, 4  # 2 x 2 cells
GLYPH_DIM = 64  # a continuous cell: a patch of 4 x 4 latent pixels x 4 channels
# each cell content's fixed "latent" (task flow): unit-variance vectors, one per digit and empty
GLYPHS = torch.randn(len(CELLS) - 1, GLYPH_DIM, generator=torch.Generator().manual_seed(1234))
LEVELS = (0.5, 0.75, 0.95)  # noise levels of the write ranking (task flow)
VARIANTS = {  # name -> (attention over the cells, patch position table)
    "causal": ("causal", "none"),
    "bidirectional": ("bidirectional", "none"),
    "bidirectional+learned": ("bidirectional", "learned"),
    "bidirectional+sincos_2d": ("bidirectional", "sincos_2d"),
    "bidirectional+learned_2d": ("bidirectional", "learned_2d"),
}


def draw_scene(rng: np.random.Generator) -> tuple[str, list[str], list[str], tuple[int, int]]:
    """One position scene -> (relation, its 4 cell tokens, its caption, the two occupied cells)."""
    relation = str(rng.choice(list(PHRASES)))
    first, second = (int(x) for x in rng.choice(10, size=2, replace=False))
    line = int(rng.integers(SIDE))
    a, b = (line, 0), (line, 1)
    if relation in ("above", "below"):
        a, b = (0, line), (1, line)
    if relation in ("right_of", "below"):
        a, b = b, a
    cells = ["cell_empty"] * P
    cells[a[0] * SIDE + a[1]], cells[b[0] * SIDE + b[1]] = f"cell{first}", f"cell{second}"
    caption = ["a", str(first), *PHRASES[relation].split(), "a", str(second)]
    return relation, cells, caption, (a[0] * SIDE + a[1], b[0] * SIDE + b[1])


def _pad(rows: list[list[str]]) -> torch.Tensor:
    ids = torch.full((len(rows), max(len(r) for r in rows)), VOCAB["<pad>"], dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor([VOCAB[w] for w in r])
    return ids


def draw_batch(rng: np.random.Generator, n: int, task: str) -> dict[str, torch.Tensor]:
    """``n`` position scenes laid out for one task, as Transfusion lays out its two directions.

    read  (image -> caption): ``<bos> <boi> c00 c01 c10 c11 <eoi> a 2 to the left of a 9 <eos>``;
          loss on the caption; the decision is the relation word's index.
    write (caption -> image): ``<bos> a 2 to the left of a 9 <boi> n n n n <eoi>``, every cell
          at full noise (``cell_noise``); each cell slot predicts its cell (the denoiser's job
          at the highest noise level); loss on the 4 cells.
    """
    scenes = [draw_scene(rng) for _ in range(n)]
    vertical = torch.tensor([s[0] in ("above", "below") for s in scenes])
    if task == "read":
        ids = _pad([["<bos>", "<boi>", *cells, "<eoi>", *caption, "<eos>"] for _, cells, caption, _ in scenes])
        image_start = torch.full((n,), 2)
        loss_mask = torch.zeros_like(ids, dtype=torch.bool)
        loss_mask[:, 7:] = ids[:, 7:] != VOCAB["<pad>"]
        # the relation word: "above"/"below" right after the first digit, else after "to the"
        decision = torch.where(vertical, 7 + 2, 7 + 4)
        return {
            "ids": ids,
            "image_start": image_start,
            "loss_mask": loss_mask,
            "decision": decision,
            "vertical": vertical,
        }
    rows = [["<bos>", *caption, "<boi>", *["cell_noise"] * P, "<eoi>"] for _, _, caption, _ in scenes]
    ids = _pad(rows)
    if task == "flow":  # the same layout with the relation word flipped: the write ranking's false caption
        swap = {"left": "right", "right": "left", "above": "below", "below": "above"}
        flipped = _pad([[swap.get(w, w) for w in r] for r in rows])
    image_start = torch.tensor([len(caption) + 2 for _, _, caption, _ in scenes])
    targets = torch.tensor([[VOCAB[c] for c in cells] for _, cells, _, _ in scenes])  # (n, P)
    occupied = torch.tensor([occ for *_, occ in scenes])  # (n, 2): the first digit's cell, the second's
    out = {"ids": ids, "image_start": image_start, "targets": targets, "occupied": occupied, "vertical": vertical}
    return out | ({"flipped": flipped} if task == "flow" else {})


class CellModel(torch.nn.Module):
    """The tiny LLaMA over token ids whose 4 cell slots form one image block."""

    def __init__(self, attention: str, positions: str, seed: int) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        torch.manual_seed(seed)
        special = {"bos": VOCAB["<bos>"], "eos": VOCAB["<eos>"], "pad": VOCAB["<pad>"]}
        self.lm = bb.build_backbone("llama", "tiny", len(VOCAB), 64, "sdpa", special)
        D = self.lm.config.hidden_size
        self.positions = PatchPositions(positions, D, SIDE)
        self.attention = attention
        # continuous cells (task flow), as the model's linear patch adapters and time embedding
        self.cell_in, self.cell_out = torch.nn.Linear(GLYPH_DIM, D), torch.nn.Linear(D, GLYPH_DIM)
        self.time_proj, self.time_embed = Timesteps(256, True, 0), TimestepEmbedding(256, D)

    def forward(
        self, ids: torch.Tensor, image_start: torch.Tensor, x_t: torch.Tensor | None = None, time=None
    ) -> torch.Tensor:
        """Logits (B, L, V); with continuous cells ``x_t`` (B, P, G) at ``time`` (B,), the
        hidden states (B, L, D) instead (the cell slots' inputs are the patches)."""
        B, L = ids.shape
        rows = torch.arange(B)[:, None]
        slots = image_start[:, None] + torch.arange(P)  # (B, P) each scene's cell indices
        h = self.lm.get_input_embeddings()(ids)  # (B, L, D)
        if x_t is not None:
            h = h.clone()
            temb = self.time_embed(self.time_proj(time).to(h.dtype))  # (B, D)
            h[rows, slots] = self.cell_in(x_t) + temb[:, None]
        table = self.positions()
        if table is not None:
            h = h.clone()
            h[rows, slots] += table[0].to(h.dtype)
        image_block = torch.full((B, L), -1, dtype=torch.long)
        if self.attention == "bidirectional":
            image_block[rows, slots] = 0
        valid = ids != VOCAB["<pad>"]
        mask = hybrid_mask(torch.zeros_like(ids), image_block, valid)  # (B, 1, L, L)
        out = self.lm.model(inputs_embeds=h, attention_mask=mask, position_ids=torch.arange(L).expand(B, L))
        if x_t is not None:
            return out.last_hidden_state
        return self.lm.lm_head(out.last_hidden_state)  # (B, L, V)

    def velocity(self, ids: torch.Tensor, image_start: torch.Tensor, x_t: torch.Tensor, time) -> torch.Tensor:
        """The flow prediction (B, P, G) at the cell slots."""
        hidden = self(ids, image_start, x_t, time)
        slots = image_start[:, None] + torch.arange(P)
        return self.cell_out(hidden[torch.arange(len(slots))[:, None], slots])

    def cell_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, P, C): each cell slot's prediction of its cell, over the cell tokens."""
        logits = self(batch["ids"], batch["image_start"])
        slots = batch["image_start"][:, None] + torch.arange(P)
        return logits[torch.arange(len(slots))[:, None], slots][..., CELL_IDS]


def flow_mse(model: CellModel, batch: dict, ids: torch.Tensor, objective, t: torch.Tensor, noise) -> torch.Tensor:
    """Per scene flow-matching MSE (B,) of the cells at timestep indices ``t`` (B,)."""
    x0 = GLYPHS[(batch["targets"][..., None] == CELL_IDS).float().argmax(-1)]  # (B, P, G)
    x_t = objective.add_noise(x0, noise, t)
    v = model.velocity(ids, batch["image_start"], x_t, objective.model_time(t))
    return (v - objective.target(x0, noise, t)).pow(2).mean((1, 2))


def loss(model: CellModel, batch: dict[str, torch.Tensor], task: str, objective=None) -> torch.Tensor:
    if task == "flow":
        B = len(batch["ids"])
        t = objective.sample_timesteps(torch.zeros(B, dtype=torch.bool), 1.0)
        return flow_mse(model, batch, batch["ids"], objective, t, torch.randn(B, P, GLYPH_DIM)).mean()
    if task == "write":
        targets = (batch["targets"][..., None] == CELL_IDS).float().argmax(-1)  # (B, P) class index
        return F.cross_entropy(model.cell_logits(batch).flatten(0, 1), targets.flatten())
    ids, loss_mask = batch["ids"], batch["loss_mask"]
    logits = model(ids, batch["image_start"])
    return F.cross_entropy(logits[:, :-1][loss_mask[:, 1:]], ids[:, 1:][loss_mask[:, 1:]])


@torch.no_grad()
def accuracy(model: CellModel, batch: dict[str, torch.Tensor], task: str, objective=None) -> tuple[float, float]:
    """Left/right and above/below accuracy against chance 0.5.

    read:  the true relation word's logit above its flip's.
    write: the true layout more likely than the two digits swapped between their cells.
    flow:  the true image's flow MSE lower under the true caption than under the flipped one,
           summed over noise levels ``LEVELS`` with the same noise (the pipeline's write ranking).
    """
    if task == "flow":
        B, gen = len(batch["ids"]), torch.Generator().manual_seed(0)
        true = flipped = 0.0
        for level in LEVELS:
            t = objective.timesteps_at(torch.full((B,), level))
            noise = torch.randn(B, P, GLYPH_DIM, generator=gen)
            true = true + flow_mse(model, batch, batch["ids"], objective, t, noise)
            flipped = flipped + flow_mse(model, batch, batch["flipped"], objective, t, noise)
        hits = true < flipped
    elif task == "write":
        logp = model.cell_logits(batch).log_softmax(-1)  # (B, P, C)
        cls = (batch["targets"][..., None] == CELL_IDS).float().argmax(-1)  # (B, P)
        first, second = batch["occupied"].unbind(-1)
        r = torch.arange(len(cls))
        d1, d2 = cls[r, first], cls[r, second]
        true = logp[r, first, d1] + logp[r, second, d2]
        swapped = logp[r, first, d2] + logp[r, second, d1]
        hits = true > swapped
    else:
        logits = model(batch["ids"], batch["image_start"])
        r = torch.arange(len(logits))
        at = batch["decision"]
        row = logits[r, at - 1]  # (B, V)
        truth = batch["ids"][r, at]
        flip = {
            VOCAB["left"]: VOCAB["right"],
            VOCAB["right"]: VOCAB["left"],
            VOCAB["above"]: VOCAB["below"],
            VOCAB["below"]: VOCAB["above"],
        }
        flipped = torch.tensor([flip[int(t)] for t in truth])
        hits = row[r, truth] > row[r, flipped]
    vertical = batch["vertical"]
    return float(hits[~vertical].float().mean()), float(hits[vertical].float().mean())


def train(
    variant: str, task: str, steps: int, eval_every: int, batch: int, seed: int, shift: float = 1.0
) -> list[tuple[int, float, float]]:
    from transfusion.diffusion import FlowMatchingObjective

    attention, positions = VARIANTS[variant]
    model = CellModel(attention, positions, seed)
    schedule = SimpleNamespace(objective="flow", train_steps=1000, flow_shift=shift)
    objective = FlowMatchingObjective(schedule) if task == "flow" else None
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng, test_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    test = draw_batch(test_rng, 400, task)
    curve = []
    for step in range(1, steps + 1):
        value = loss(model, draw_batch(rng, batch, task), task, objective)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            curve.append((step, *accuracy(model.eval(), test, task, objective)))
            model.train()
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--task",
        default="read",
        choices=["read", "write", "flow"],
        help="image->caption, caption->image (discrete cells), caption->image (continuous cells, flow matching)",
    )
    ap.add_argument("--shift", type=float, default=1.0, help="task flow: the flow shift of training timesteps")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"task: {args.task}" + (f", flow shift {args.shift}" if args.task == "flow" else ""))
    print(f"{'variant':28s} {'step':>6s} {'left/right':>10s} {'above/below':>11s} {'wall':>6s}")
    for variant in args.variants.split(","):
        start = time.perf_counter()
        for step, lr, ab in train(variant, args.task, args.steps, args.eval_every, args.batch, args.seed, args.shift):
            print(f"{variant:28s} {step:6d} {lr:10.3f} {ab:11.3f} {time.perf_counter() - start:5.0f}s", flush=True)


if __name__ == "__main__":
    main()
