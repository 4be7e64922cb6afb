"""Export a trained GPT as a Hugging Face Llama directory (safetensors + config + tokenizer), and load one."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from app import storage
from app.config import from_dict, to_dict
from app.model import GPT, ModelConfig
from app.tokenizer import eot_id, load_tokenizer

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def hf_config(cfg: ModelConfig, eot: int, dtype: torch.dtype, meta: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face `LlamaConfig` dict for this model, with spotlm's own config under "spotlm"."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "vocab_size": cfg.padded_vocab_size, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": str(dtype).removeprefix("torch."),
        "spotlm": {"model": to_dict(cfg), "meta": meta},
    }


def export_model(model: GPT, out_dir: str, tokenizer_file: str, meta: dict[str, Any] | None = None) -> None:
    """Write `out_dir` (local or s3://): weights, tokenizer, generation config, then config.json last,
    so a half-written export is never taken for a whole one."""
    tok = load_tokenizer(tokenizer_file)
    eot = eot_id(tok)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight")  # stored once, as Hugging Face expects for tied embeddings
    dtype = next(iter(state.values())).dtype
    with tempfile.TemporaryDirectory() as d:
        save_file(state, os.path.join(d, WEIGHTS), metadata={"format": "pt"})
        storage.upload_file(os.path.join(d, WEIGHTS), storage.join(out_dir, WEIGHTS))
    storage.write_text(storage.join(out_dir, TOKENIZER), tok.to_str())
    storage.write_json(storage.join(out_dir, "generation_config.json"), {"bos_token_id": eot, "eos_token_id": eot})
    storage.write_json(storage.join(out_dir, CONFIG), hf_config(model.cfg, eot, dtype, meta or {}))


@dataclass
class Exported:
    model: GPT
    config: ModelConfig
    tokenizer: Tokenizer
    eot_id: int
    meta: dict[str, Any] = field(default_factory=dict)


def load_exported(path: str, device: str = "cpu", dtype: torch.dtype | None = None) -> Exported:
    """Load an export written by `export_model` (local or s3://), in eval mode on `device`."""
    if not storage.exists(storage.join(path, CONFIG)):
        raise FileNotFoundError(f"{path}: no {CONFIG}: not a model export (or the export did not finish)")
    local = storage.local_dir(path)
    with open(os.path.join(local, CONFIG)) as f:
        hf = json.load(f)
    if "spotlm" not in hf:
        raise ValueError(f"{path}: {CONFIG} is not a spotlm export")
    cfg = from_dict(ModelConfig, hf["spotlm"]["model"])
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    state = load_file(os.path.join(local, WEIGHTS))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    if cfg.tie_embeddings:  # to_empty() untied the shared parameter
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(device=device, dtype=dtype).eval()
    tok = Tokenizer.from_file(os.path.join(local, TOKENIZER))
    return Exported(model, cfg, tok, eot_id(tok), hf["spotlm"].get("meta", {}))
