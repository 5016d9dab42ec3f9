"""The transformer: a Hugging Face causal LM (LLaMA by default, Qwen2 as an option).

Built from a size preset picked by name, or loaded from a local pretrained folder (LLaMA-2,
Vicuna, Qwen2 ...) with its token embeddings and LM head resized for the added image tokens,
as LLaVA does (new rows start at the mean of the old ones). Never runs a checkpoint's code.
"""

from __future__ import annotations

from pathlib import Path

from transfusion.errors import BadInput, MissingInput

# name -> (hidden, intermediate, layers, heads, kv heads)
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (128, 384, 4, 4, 4),  # CPU tests and the default pipeline
    "base": (256, 768, 6, 4, 4),  # pipelines/cpu-quality.yaml: an hour on a 2-core CPU
    "small": (384, 1024, 8, 6, 6),
    "1b": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B shape
    "7b": (4096, 11008, 32, 32, 32),  # LLaMA-2-7B shape
}
KINDS = ("llama", "qwen2")


def _config_class(kind: str):
    from transformers import LlamaConfig, Qwen2Config

    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]


def preset_config(kind: str, size: str, vocab_size: int, max_positions: int, attention: str, special: dict):
    hidden, inter, layers, heads, kv = SIZES[size]
    return _config_class(kind)(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=special["bos"],
        eos_token_id=special["eos"],
        pad_token_id=special["pad"],
        attn_implementation=attention,
    )


def attn_implementation(attention: str) -> str:
    return {"sdpa": "sdpa", "flex": "flex_attention"}[attention]


def from_config_dict(d: dict, attention: str):
    """A randomly initialised causal LM from a saved config dict (weights loaded separately)."""
    from transformers import AutoModelForCausalLM

    kind = d.get("model_type")
    if kind not in KINDS:
        raise ValueError(f"backbone model_type {kind!r} is not one of {KINDS}")
    d = {k: v for k, v in d.items() if k not in ("model_type", "transformers_version", "architectures")}
    config = _config_class(kind)(**d)
    config._attn_implementation = attn_implementation(attention)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation(attention))


def build_backbone(kind: str, size: str, vocab_size: int, max_positions: int, attention: str, special: dict):
    from transformers import AutoModelForCausalLM

    config = preset_config(kind, size, vocab_size, max_positions, attn_implementation(attention), special)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation(attention))


def load_pretrained_backbone(path: Path, vocab_size: int, attention: str):
    """``from_pretrained`` on a local folder (safetensors, no remote code), vocab resized."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MissingInput(f"{path}: not a pretrained model folder (no config.json)")
    kind = AutoConfig.from_pretrained(str(path), local_files_only=True).model_type
    if kind not in KINDS:
        raise BadInput(f"{path}: backbone model_type {kind!r} is not one of {KINDS}")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, attn_implementation=attn_implementation(attention), use_safetensors=True
    )
    if model.get_input_embeddings().num_embeddings != vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=True)
    return model
