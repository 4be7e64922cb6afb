"""Export a GPT as a Hugging Face Llama directory (safetensors + config + tokenizer), and load one back.

An export directory (local or s3://) holds `model.safetensors` (the GPT's state dict as it is, so in
the Hugging Face `LlamaForCausalLM` names; a tied lm_head stored once), `tokenizer.json`,
`generation_config.json`, and `config.json`: a `LlamaConfig` with spotlm's own `ModelConfig` and run
metadata under the "spotlm" key. `config.json` is written last, so a directory without it is an
unfinished export. `vocab_size` there is the padded size (the embedding rows); the tokenizer's true
size is `spotlm.model.vocab_size`. A model with a retrieval-match table (`lmatch_vocab > 0`) exports
too, its table as `model.lmatch_embed.weight`; transformers then ignores that tensor, so its Llama
forward differs from ours: load such exports with `load_exported`, not transformers. So with sliding
attention windows (`attn_windows`): Llama has no per-layer windows, so transformers runs every layer as
full causal attention; the windows live in the "spotlm" section, which `load_exported` restores.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from app import storage
from app.config import from_dict, to_dict
from app.log import get_logger
from app.model.gpt import GPT, ModelConfig
from app.data.tokenizer import eot_id, load_tokenizer

log = get_logger(__name__)

WEIGHTS, CONFIG, TOKENIZER, GENERATION = "model.safetensors", "config.json", "tokenizer.json", "generation_config.json"
FORMAT_VERSION = 1  # of the "spotlm" section of config.json


def hf_config(cfg: ModelConfig, eot: int, dtype: torch.dtype, meta: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face `LlamaConfig` dict for this model, with spotlm's own config under "spotlm"; only the
    "spotlm" section for a GELU / ReLU^2 MLP, which Llama (always gated) cannot hold: transformers' Auto
    classes then refuse the export (no model_type) instead of loading a Llama with a random gate_proj.

    rope_theta and the dtype are written in both the transformers 4.x and 5.x spellings."""
    dtype_name = str(dtype).removeprefix("torch.")
    spotlm = {"format_version": FORMAT_VERSION, "model": to_dict(cfg), "meta": meta}
    if cfg.mlp != "swiglu":
        return {"spotlm": spotlm}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "vocab_size": cfg.padded_vocab_size, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": dtype_name, "dtype": dtype_name,
        "use_cache": True,
        "spotlm": spotlm,
    }


def export_model(model: GPT, out_dir: str, tokenizer_file: str, meta: dict[str, Any] | None = None) -> None:
    """Write `out_dir` (local or s3://): weights in their own dtype, the tokenizer file (copied),
    the generation config, then config.json last. An older export there stops counting as one
    (its config.json is removed) before the first new file is written."""
    meta = dict(meta or {})
    _check_json(meta)
    tok = load_tokenizer(tokenizer_file)
    if tok.get_vocab_size() > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} ids but the model only "
                         f"{model.cfg.vocab_size} (ModelConfig.vocab_size)")
    eot = eot_id(tok)
    state = _export_state(model)
    dtype = state["model.embed_tokens.weight"].dtype
    storage.remove(storage.join(out_dir, CONFIG))
    with tempfile.TemporaryDirectory() as d:
        save_file(state, os.path.join(d, WEIGHTS), metadata={"format": "pt"})
        storage.upload_file(os.path.join(d, WEIGHTS), storage.join(out_dir, WEIGHTS))
    storage.write_bytes(storage.join(out_dir, TOKENIZER), storage.read_bytes(tokenizer_file))
    storage.write_json(storage.join(out_dir, GENERATION), {"bos_token_id": eot, "eos_token_id": eot})
    storage.write_json(storage.join(out_dir, CONFIG), hf_config(model.cfg, eot, dtype, meta))
    if any(0 < model.cfg.window(i) < model.cfg.max_seq_len for i in range(model.cfg.n_layer)):
        log.warning("%s: this model attends through sliding windows (attn_windows=%s), which Hugging Face "
                    "transformers ignores (its Llama runs every layer as full attention, so it computes another "
                    "function): load it with app.model.export.load_exported", out_dir, model.cfg.attn_windows)
    if model.cfg.mlp != "swiglu":
        log.warning("%s: this model's MLP is %s, not Llama's gated SwiGLU, so its config.json has no Hugging Face "
                    "architecture: load it with app.model.export.load_exported", out_dir, model.cfg.mlp)
    log.info("exported %.1fM parameters (%s) to %s", model.num_params() / 1e6, dtype, out_dir)


def _check_json(meta: dict[str, Any]) -> None:
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"export meta must be JSON-serialisable: {e}") from None


def _export_state(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors, a tied lm_head left out (Hugging Face re-ties it)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight")
    return state


@dataclass
class Exported:
    """A loaded export: the model (eval mode), its config, tokenizer, end-of-text id and run metadata."""

    model: GPT
    config: ModelConfig
    tokenizer: Tokenizer
    eot_id: int
    meta: dict[str, Any] = field(default_factory=dict)


def load_exported(path: str, device: str = "cpu", dtype: torch.dtype | None = None) -> Exported:
    """Load an export written by `export_model` (local or s3://) onto `device`, cast to `dtype`
    (None = as stored), in eval mode. FileNotFoundError for an unfinished or missing export,
    ValueError for a config.json that is not a spotlm export or weights that do not fit it."""
    config_path = storage.join(path, CONFIG)
    if not storage.exists(config_path):
        raise FileNotFoundError(f"{path}: no {CONFIG}: not a model export (or the export did not finish)")
    cfg, meta = _read_config(config_path)
    local = storage.local_dir(path)
    model = _load_weights(cfg, os.path.join(local, WEIGHTS), device)
    model.to(device=device, dtype=dtype).eval()
    tok = load_tokenizer(os.path.join(local, TOKENIZER))
    return Exported(model, cfg, tok, eot_id(tok), meta)


def _read_config(config_path: str) -> tuple[ModelConfig, dict[str, Any]]:
    try:
        spot = storage.read_json(config_path)["spotlm"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{config_path} is not a spotlm export config (no 'spotlm' section)") from None
    version = spot.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{config_path}: spotlm export format version {version}; this code reads {FORMAT_VERSION}")
    # Older exports kept the FP8 training flags with the shape (now `PerfConfig.fp8`): not part of the model
    shape = {k: v for k, v in spot["model"].items() if not k.startswith("fp8")}
    return from_dict(ModelConfig, shape), spot.get("meta", {})


def _load_weights(cfg: ModelConfig, weights_path: str, device: str) -> GPT:
    """Build on the meta device and take the stored tensors as the parameters (no second copy)."""
    try:
        state = load_file(weights_path, device=str(device))
    except (FileNotFoundError, SafetensorError) as e:
        raise ValueError(f"{weights_path}: cannot read the weights: {e}") from None
    with torch.device("meta"):
        model = GPT(cfg)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state, strict=False, assign=True)  # only a tied lm_head.weight is absent
    except RuntimeError as e:  # a shape that does not fit the config
        raise ValueError(f"{weights_path} does not fit its config: {e}") from None
    model.tie_weights()
    return model
