"""Can the backbone learn *where* things are in an image? A one-minute test on discrete cells.

    python benchmarks/binding_learnability.py [--steps 3000] [--variants causal,bidirectional,...]

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

Prints one row per variant and evaluation step: left/right and above/below accuracy.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from transfusion.model import backbone as bb
from transfusion.model.mask import hybrid_mask
from transfusion.model.positions import PatchPositions

WORDS = ["<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "a", "to", "the", "left", "right", "of", "above", "below"]
DIGITS = [str(d) for d in range(10)]
CELLS = [f"cell{d}" for d in range(10)] + ["cell_empty"]
VOCAB = {w: i for i, w in enumerate(WORDS + DIGITS + CELLS)}
PHRASES = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
SIDE, IMAGE_START, CAPTION_START = 2, 2, 7  # 2 x 2 cells at positions 2..5, <eoi> at 6
VARIANTS = {  # name -> (attention over the cells, patch position table)
    "causal": ("causal", "none"),
    "bidirectional": ("bidirectional", "none"),
    "bidirectional+learned": ("bidirectional", "learned"),
    "bidirectional+sincos_2d": ("bidirectional", "sincos_2d"),
    "bidirectional+learned_2d": ("bidirectional", "learned_2d"),
}


def draw_scenes(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` position scenes -> token ids (n, L), caption-loss mask (n, L), and per scene the
    index of the token that must be the relation word (the decision) (n,)."""
    rows, decisions = [], []
    for _ in range(n):
        relation = str(rng.choice(list(PHRASES)))
        first, second = (int(x) for x in rng.choice(10, size=2, replace=False))
        line = int(rng.integers(SIDE))
        a, b = (line, 0), (line, 1)
        if relation in ("above", "below"):
            a, b = (0, line), (1, line)
        if relation in ("right_of", "below"):
            a, b = b, a
        cells = ["cell_empty"] * SIDE * SIDE
        cells[a[0] * SIDE + a[1]], cells[b[0] * SIDE + b[1]] = f"cell{first}", f"cell{second}"
        caption = ["a", str(first), *PHRASES[relation].split(), "a", str(second)]
        words = ["<bos>", "<boi>", *cells, "<eoi>", *caption, "<eos>"]
        rows.append([VOCAB[w] for w in words])
        # the relation word: "above"/"below" right after the digit, else after "to the"
        decisions.append(CAPTION_START + (2 if relation in ("above", "below") else 4))
    L = max(len(r) for r in rows)
    ids = torch.full((n, L), VOCAB["<pad>"], dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, CAPTION_START:] = ids[:, CAPTION_START:] != VOCAB["<pad>"]
    return ids, loss_mask, torch.tensor(decisions)


class CellModel(torch.nn.Module):
    """The tiny LLaMA over token ids whose 4 cell slots form one image block."""

    def __init__(self, attention: str, positions: str, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        special = {"bos": VOCAB["<bos>"], "eos": VOCAB["<eos>"], "pad": VOCAB["<pad>"]}
        self.lm = bb.build_backbone("llama", "tiny", len(VOCAB), 64, "sdpa", special)
        D = self.lm.config.hidden_size
        self.positions = PatchPositions(positions, D, SIDE)
        self.attention = attention

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, L = ids.shape
        h = self.lm.get_input_embeddings()(ids)  # (B, L, D)
        table = self.positions()
        if table is not None:
            h = h.clone()
            h[:, IMAGE_START : IMAGE_START + SIDE * SIDE] += table[0].to(h.dtype)
        image_block = torch.full((B, L), -1, dtype=torch.long)
        if self.attention == "bidirectional":
            image_block[:, IMAGE_START : IMAGE_START + SIDE * SIDE] = 0
        valid = ids != VOCAB["<pad>"]
        mask = hybrid_mask(torch.zeros_like(ids), image_block, valid)  # (B, 1, L, L)
        out = self.lm.model(inputs_embeds=h, attention_mask=mask, position_ids=torch.arange(L).expand(B, L))
        return self.lm.lm_head(out.last_hidden_state)  # (B, L, V)


@torch.no_grad()
def accuracy(model: CellModel, ids: torch.Tensor, decisions: torch.Tensor) -> tuple[float, float]:
    """Left/right and above/below accuracy: the true word's logit above its flip's."""
    logits = model(ids)
    flip = {"left": "right", "right": "left", "above": "below", "below": "above"}
    hits = {"lr": [], "ab": []}
    for i, at in enumerate(decisions.tolist()):
        true = WORDS[ids[i, at]] if ids[i, at] < len(WORDS) else None
        row = logits[i, at - 1]
        hits["lr" if true in ("left", "right") else "ab"].append(bool(row[VOCAB[true]] > row[VOCAB[flip[true]]]))
    return float(np.mean(hits["lr"])), float(np.mean(hits["ab"]))


def train(variant: str, steps: int, eval_every: int, batch: int, seed: int) -> list[tuple[int, float, float]]:
    attention, positions = VARIANTS[variant]
    model = CellModel(attention, positions, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng, test_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    test_ids, _, test_decisions = draw_scenes(test_rng, 400)
    curve = []
    for step in range(1, steps + 1):
        ids, loss_mask, _ = draw_scenes(rng, batch)
        logits = model(ids)
        targets = ids[:, 1:][loss_mask[:, 1:]]
        loss = F.cross_entropy(logits[:, :-1][loss_mask[:, 1:]], targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            curve.append((step, *accuracy(model.eval(), test_ids, test_decisions)))
            model.train()
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'variant':28s} {'step':>6s} {'left/right':>10s} {'above/below':>11s} {'wall':>6s}")
    for variant in args.variants.split(","):
        start = time.perf_counter()
        for step, lr, ab in train(variant, args.steps, args.eval_every, args.batch, args.seed):
            print(f"{variant:28s} {step:6d} {lr:10.3f} {ab:11.3f} {time.perf_counter() - start:5.0f}s", flush=True)


if __name__ == "__main__":
    main()
