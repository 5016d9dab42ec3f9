"""Token and latent sampling under the pipeline (``transfusion.pipeline`` is the one surface).

``sample_latents`` denoises one image per caption with the diffusers scheduler it is handed
(``transfusion.diffusion.build_scheduler``): DDPM, DDIM, DPM-Solver++ (``dpmpp``, diffusers'
multistep solver: good images in 20-50 steps), or the flow-matching Euler sampler for models
trained with flow matching. With ``cfg_scale != 1`` every step also runs
the caption-less sequence (``<bos> <boi> ...``, as in caption-dropout training) and mixes
``uncond + scale * (cond - uncond)``. Each image has its own generator (seed + index), so a
batch of captions gives the same images as the captions sampled one by one.
"""

from __future__ import annotations

import torch

from transfusion.data.collate import Collator, Example


def generators(seed: int, n: int, device: str | torch.device = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(seed + i) for i in range(n)]


def initial_noise(gens: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in gens]).to(device)


def guided(pred: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Mix a stacked [cond; uncond] prediction with the guidance scale."""
    if cfg_scale == 1.0:
        return pred
    cond, uncond = pred.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def guidance_at(level: float, cfg_scale: float, interval: tuple[float, float]) -> float:
    """The guidance scale at noise level ``level`` (0 clean .. 1 pure noise): ``cfg_scale``
    inside ``interval``, 1 (the conditional prediction alone) outside it -- guidance in a limited
    interval (Kynkaanniemi et al. 2024)."""
    lo, hi = interval
    return cfg_scale if lo <= level <= hi else 1.0


@torch.no_grad()
def example_collator(model) -> Collator:
    """A collator laying out ``model``'s examples one per row, unpacked and untruncated."""
    conf = model.config
    return Collator(
        model.special, conf.patches_per_image, 1 << 30, time_token=conf.time_conditioning == "token", pack=False
    )


def latent_shape(model) -> tuple[int, int, int]:
    """(C, H, W) of one scaled latent of ``model``."""
    conf = model.config
    return (conf.latent_channels, conf.latent_size, conf.latent_size)


def image_predictor(
    model, captions: list[list[int]], cfg_scale: float, use_cache=True, context=None, uncond_context=None
):
    """``predict(x_in, time)``: the network's image prediction for ``captions`` (rows: the
    conditional ones, or [cond; uncond] stacked when ``x_in`` has twice as many rows). Cached:
    the prefixes run once into KV caches (or ``context`` / ``uncond_context`` continue); else
    every call runs the whole sequence (the reference, and what post-training differentiates)."""
    if use_cache:
        return _cached_predictor(model, captions, cfg_scale, context, uncond_context)
    return _uncached_predictor(model, captions, cfg_scale, next(model.parameters()).device)


def _uncached_predictor(model, captions: list[list[int]], cfg_scale: float, device):
    """Reference predictor: every step re-runs the whole sequence (caption + image)."""
    placeholder = torch.zeros(latent_shape(model))
    cond = [Example([list(c), placeholder]) for c in captions]
    uncond = [Example([[], placeholder]) for _ in captions] if cfg_scale != 1.0 else []
    collate = example_collator(model)
    cond_batch, both_batch = collate(cond).to(device), collate(cond + uncond).to(device)

    def predict(x_in: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return model(both_batch if len(x_in) > len(cond) else cond_batch, x_in, time)[1]

    return predict


def _cached_predictor(model, captions: list[list[int]], cfg_scale: float, context, uncond_context):
    """The prefixes run once into KV caches (or the contexts given); each call runs the image
    tokens only, over the conditional context or the stacked [cond; uncond] one."""
    s = model.special
    n = len(captions)
    if context is None:
        context = Context.prefill(model, [[s.bos, *c, s.boi] for c in captions])
        if cfg_scale != 1.0:
            uncond_context = Context.prefill(model, [[s.bos, s.boi]] * n)
    if cfg_scale != 1.0 and uncond_context is None:
        raise ValueError("sample_latents: a given context with cfg_scale != 1 needs its uncond_context")
    both = _stack_contexts(context, uncond_context) if cfg_scale != 1.0 else context

    def predict(x_in: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return (both if len(x_in) > n else context).image_prediction(x_in, time)

    return predict


def denoise(
    sched,
    steps: int,
    predict,
    gens: list[torch.Generator],
    shape: tuple[int, ...],
    device,
    cfg_scale: float,
    progress=None,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """The sampling loop: ``predict(x_in, time)`` gives the network output for the stacked
    [cond; uncond] latents where guidance applies (noise levels inside ``cfg_interval``,
    :func:`guidance_at`), and for the conditional latents alone elsewhere: a step outside the
    interval runs half the rows. ``sched`` (reset to ``steps`` steps here, as diffusers' pipelines
    do) steps the guided prediction."""
    sched.set_timesteps(steps)
    x = initial_noise(gens, shape, device) * getattr(sched, "init_noise_sigma", 1.0)
    T = sched.config.num_train_timesteps
    for t in progress(sched.timesteps) if progress else sched.timesteps:
        scale = guidance_at(float(t) / T, cfg_scale, cfg_interval)
        x_in = torch.cat([x, x]) if scale != 1.0 else x
        time = torch.full((len(x_in),), float(t), device=device)
        pred = predict(x_in, time).float()
        x = sched.step(guided(pred, scale), t, x, generator=gens).prev_sample
    return x


# ---------------------------------------------------------------------------------------------
# KV-cached inference
# ---------------------------------------------------------------------------------------------
class Context:
    """A batch of left-padded sequences held in a transformers ``DynamicCache``.

    ``keys_valid`` (B, K) marks real (non-padding) cached positions, ``next_pos`` (B,) the
    position id of each row's next token. ``append`` grows the cache; ``look`` runs tokens that
    see the cache (and, when ``bidirectional``, each other) and then crops the cache back, so a
    denoising step never leaves anything behind.
    """

    def __init__(
        self, model, cache, keys_valid: torch.Tensor, next_pos: torch.Tensor, last_hidden: torch.Tensor | None
    ) -> None:
        self.model, self.cache = model, cache
        self.keys_valid, self.next_pos, self.last_hidden = keys_valid, next_pos, last_hidden

    @classmethod
    def prefill(cls, model, rows: list[list[int]]) -> Context:
        """The token rows (left-padded) run once into a fresh cache."""
        device = next(model.parameters()).device
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), model.special.pad, dtype=torch.long, device=device)
        valid = torch.zeros((len(rows), L), dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            ids[i, L - len(r) :] = torch.tensor(r, dtype=torch.long)
            valid[i, L - len(r) :] = True
        ctx = cls(
            model,
            model.new_cache(),
            torch.zeros((len(rows), 0), dtype=torch.bool, device=device),
            torch.zeros(len(rows), dtype=torch.long, device=device),
            None,
        )
        ctx.last_hidden = ctx._run(model.embed_tokens(ids), valid, keep=True)[:, -1]
        return ctx

    @property
    def length(self) -> int:
        return self.keys_valid.shape[1]

    def _run(self, embeds: torch.Tensor, valid: torch.Tensor, keep: bool, bidirectional: bool = False) -> torch.Tensor:
        """Run (B, q, D) ``embeds`` over the cache; ``valid`` (B, q) marks real new tokens."""
        B, q = valid.shape
        device = embeds.device
        positions = self.next_pos[:, None] + valid.long().cumsum(1) - 1
        positions = positions.clamp_min(0)
        new = torch.ones(q, q, dtype=torch.bool, device=device)
        new = new if bidirectional else new.tril()
        new = (new[None] & valid[:, None, :]) | torch.eye(q, dtype=torch.bool, device=device)[None]
        old = self.keys_valid[:, None, :].expand(B, q, self.length)
        mask = torch.cat([old, new], dim=2)[:, None]  # (B, 1, q, K + q)
        hidden = self.model.transformer(embeds, mask, positions, cache=self.cache)
        if keep:
            self.keys_valid = torch.cat([self.keys_valid, valid], dim=1)
            self.next_pos = self.next_pos + valid.long().sum(1)
        else:
            _crop(self.cache, self.length)
        return hidden

    def append_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,) and return its hidden state (B, D)."""
        embeds = self.model.embed_tokens(ids[:, None])
        self.last_hidden = self._run(embeds, torch.ones_like(ids[:, None], dtype=torch.bool), keep=True)[:, -1]
        return self.last_hidden

    def image_prediction(self, x_t: torch.Tensor, time: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """One denoising look: the image tokens of ``x_t`` (B, C, H, W) at ``time`` (B,) attend
        to the cache and bidirectionally to each other; returns the prediction (B, C, H, W).
        With ``keep`` the image stays in the cache (a finished image, time 0)."""
        tokens, temb, skips = self.model.embed_images(x_t, time)
        block = self.model.image_block(tokens, temb)  # (B, P', D)
        valid = torch.ones(block.shape[:2], dtype=torch.bool, device=block.device)
        hidden = self._run(block, valid, keep=keep, bidirectional=self.model.bidirectional_images)
        patches = hidden[:, block.shape[1] - tokens.shape[1] :]  # drop the time token
        return self.model.predict_images(patches, temb, skips)


def _crop(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _ban(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logits with ``tokens`` made impossible."""
    return logits.index_fill(-1, torch.tensor(tokens, device=logits.device), float("-inf"))


def _pick(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gens: list[torch.Generator]
) -> torch.Tensor:
    """Next token per row: greedy at temperature 0, else sampled after transformers' temperature,
    top-k and top-p warpers."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if temperature <= 0:
        return logits.argmax(-1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    probs = warpers(None, logits.float()).softmax(-1).cpu()
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, gens)]).to(logits.device)


@torch.no_grad()
def generate_text(
    model,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
    stop_at: tuple[int, ...] = (),
    return_logits: bool = False,
    min_new_tokens: int = 0,
):
    """Continue each prompt (token ids, ``<bos>`` added) until ``<eos>`` (or a ``stop_at``
    token, kept) or ``max_new_tokens``. Returns the new ids per prompt (and, with
    ``return_logits``, the (B, T, V) logits of every step, for equivalence tests)."""
    s = model.special
    rows = [[s.bos, *p] for p in prompts]
    gens = generators(seed, len(rows))
    out: list[list[int]] = [[] for _ in rows]
    done = torch.zeros(len(rows), dtype=torch.bool)
    all_logits = []
    ctx = Context.prefill(model, rows) if use_cache else None
    for step in range(max_new_tokens):
        if use_cache:
            hidden = ctx.last_hidden
        else:  # recompute every position from scratch
            hidden = Context.prefill(model, [r + o for r, o in zip(rows, out)]).last_hidden
        logits = model.text_logits(hidden)
        all_logits.append(logits.float().cpu())
        banned = [s.boi, s.eoi] + ([s.eos] if step < min_new_tokens else [])
        nxt = _pick(_ban(logits, banned), temperature, top_k, top_p, gens)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                if t == s.eos:
                    done[i] = True
                else:
                    out[i].append(t)
                    done[i] = t in stop_at
        if done.all():
            break
        if use_cache:
            ctx.append_tokens(nxt)
    if return_logits:
        return out, torch.stack(all_logits, dim=1)
    return out


@torch.no_grad()
def sample_latents(
    model,
    captions: list[list[int]],
    scheduler,
    steps: int,
    cfg_scale: float,
    seed: int = 0,
    use_cache: bool = True,
    progress=None,
    context: Context | None = None,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    uncond_context: Context | None = None,
) -> torch.Tensor:
    """Scaled latents (N, C, H, W), one per caption, denoised in ``steps`` steps of ``scheduler``
    (``transfusion.diffusion.build_scheduler``). The prefix ``<bos> caption <boi>`` (and
    ``<bos> <boi>`` for CFG) runs once into the KV cache; each step runs only the image tokens
    (``use_cache=False``: the whole sequence, the reference). ``context`` (with
    ``uncond_context`` for CFG) continues existing ones instead (interleaved generation; rows =
    images). Guidance applies at noise levels inside ``cfg_interval`` only
    (:func:`guidance_at`); the other steps run the conditional rows alone."""
    device = next(model.parameters()).device
    predict = image_predictor(model, captions, cfg_scale, use_cache, context, uncond_context)
    gens = generators(seed, len(captions))
    return denoise(scheduler, steps, predict, gens, latent_shape(model), device, cfg_scale, progress, cfg_interval)


@torch.no_grad()
def caption_latents(model, latents: torch.Tensor, max_new_tokens: int = 24) -> list[list[int]]:
    """Greedy captions for clean scaled latents (N, C, H, W): ``<bos> <boi> image(t=0) <eoi>``
    in the cache, then text until ``<eos>``."""
    s = model.special
    ctx = Context.prefill(model, [[s.bos, s.boi]] * len(latents))
    ctx.image_prediction(latents, torch.zeros(len(latents), device=latents.device), keep=True)
    ctx.append_tokens(torch.full((len(latents),), s.eoi, dtype=torch.long, device=latents.device))
    out: list[list[int]] = [[] for _ in range(len(latents))]
    done = [False] * len(latents)
    for _ in range(max_new_tokens):
        nxt = _ban(model.text_logits(ctx.last_hidden), [s.boi, s.eoi]).argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                done[i] = t == s.eos
                if not done[i]:
                    out[i].append(t)
        if all(done):
            break
        ctx.append_tokens(nxt)
    return out


@torch.no_grad()
def generate_interleaved(
    model,
    prompt: list[int],
    *,
    scheduler,
    steps: int,
    cfg_scale: float,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    max_new_tokens: int = 64,
    max_images: int = 2,
    temperature: float = 0.0,
    seed: int = 0,
    force_image: bool = False,
    min_new_tokens: int = 0,
    progress=None,
) -> list[list[int] | torch.Tensor]:
    """Text until ``<boi>``, then an image by diffusion (``steps`` steps of ``scheduler``),
    ``<eoi>``, then more text: the paper's inference. Returns the parts in order: token-id lists
    and scaled latents (C, H, W). ``force_image`` starts with ``<boi>`` right after the prompt;
    ``<eos>`` is suppressed for the first ``min_new_tokens`` text tokens, ``<boi>`` once
    ``max_images`` are drawn, and ``<eoi>`` always (the model closes its images itself)."""
    s = model.special
    device = next(model.parameters()).device
    ctx = Context.prefill(model, [[s.bos, *prompt]])
    uncond = Context.prefill(model, [[s.bos, s.boi]]) if cfg_scale != 1.0 else None
    parts: list[list[int] | torch.Tensor] = []
    text: list[int] = []
    gens = generators(seed, 1)
    images = n_text = 0
    for i in range(max_new_tokens):
        if force_image and i == 0:
            nxt = torch.tensor([s.boi], device=device)
        else:
            banned = [s.eoi] + ([s.boi] if images >= max_images else []) + ([s.eos] if n_text < min_new_tokens else [])
            nxt = _pick(_ban(model.text_logits(ctx.last_hidden), banned), temperature, 0, 1.0, gens)
        tok = int(nxt[0])
        if tok == s.eos:
            break
        if tok != s.boi:
            text.append(tok)
            n_text += 1
            ctx.append_tokens(nxt)
            continue
        parts += [text] if text else []
        text = []
        ctx.append_tokens(nxt)
        denoise_args = (scheduler, steps, cfg_scale, seed + images, progress, cfg_interval)
        parts.append(_image_in_context(model, ctx, uncond, *denoise_args))
        images += 1
    return parts + ([text] if text else [])


def _image_in_context(
    model, ctx: Context, uncond: Context | None, scheduler, steps, cfg_scale, seed, progress, interval
):
    """Denoise one image after the context's ``<boi>`` (with a caption-less context for CFG),
    then close it in the context (the image at time 0, ``<eoi>``); returns its latent (C, H, W)."""
    latent = sample_latents(
        model,
        [[]],
        scheduler,
        steps,
        1.0 if uncond is None else cfg_scale,
        seed,
        context=ctx,
        uncond_context=uncond,
        progress=progress,
        cfg_interval=interval,
    )
    device = latent.device
    ctx.image_prediction(latent, torch.zeros(1, device=device), keep=True)
    ctx.append_tokens(torch.tensor([model.special.eoi], device=device))
    return latent[0]


def _stack_contexts(a: Context, b: Context) -> Context:
    """A throw-away context holding a's and b's rows (the shorter left-padded to the longer)."""
    K = max(a.length, b.length)

    def padded(layer_tensor: torch.Tensor) -> torch.Tensor:  # (B, heads, T, d) -> left-padded to K
        return torch.nn.functional.pad(layer_tensor, (0, 0, K - layer_tensor.shape[2], 0))

    cache = a.model.new_cache()
    for idx, (la, lb) in enumerate(zip(a.cache.layers, b.cache.layers)):
        cache.update(
            torch.cat([padded(la.keys), padded(lb.keys)]), torch.cat([padded(la.values), padded(lb.values)]), idx
        )
    pad_mask = lambda c: torch.nn.functional.pad(c.keys_valid, (K - c.length, 0), value=False)  # noqa: E731
    return Context(
        a.model,
        cache,
        torch.cat([pad_mask(a), pad_mask(b)]),
        torch.cat([a.next_pos, b.next_pos]),
        torch.cat([a.last_hidden, b.last_hidden]),
    )
