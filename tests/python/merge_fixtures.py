"""Tiny LLaMA / GPT-2 models and PEFT adapters built from configs with fixed seeds (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T


def llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
    )
    return T.LlamaForCausalLM(cfg).eval()


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=80, n_positions=32)
    return T.GPT2LMHeadModel(cfg).eval()


def save_base(model, folder: Path, shard: str | None = None) -> Path:
    if shard:
        model.save_pretrained(folder, max_shard_size=shard)
    else:
        model.save_pretrained(folder)
    return folder


def make_adapter(base_folder: Path, kind: str, out: Path, seed: int = 1):
    """A PEFT adapter of `kind` for the model saved in base_folder; returns (out, reference merged state dict)."""
    import peft

    model = T.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    llama_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    configs = {
        "plain": {"r": 4, "lora_alpha": 8, "target_modules": llama_targets},
        "rslora": {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
        "pattern": {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": llama_targets,
            "rank_pattern": {"v_proj": 2, "layers.1.mlp.down_proj": 6},
            "alpha_pattern": {"o_proj": 3},
        },
        "dora": {
            "r": 4,
            "lora_alpha": 8,
            "use_dora": True,
            "target_modules": ["q_proj", "up_proj", "down_proj"],
        },
        "saved": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
        "gpt2dora": {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["c_attn", "c_fc"],
            "fan_in_fan_out": True,
            "use_dora": True,
        },
        "gpt2": {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["c_attn", "c_proj", "c_fc"],
            "fan_in_fan_out": True,
        },
    }
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **configs[kind]))
    if kind == "saved":
        with torch.no_grad():
            pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    if kind in ("dora", "gpt2dora"):
        with torch.no_grad():  # a trained-looking magnitude, not the initial norms
            for n, p in pm.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1.0 + 0.1 * torch.rand_like(p))
    pm.save_pretrained(out)
    merged = pm.merge_and_unload()
    return out, {k: v.detach().clone() for k, v in merged.state_dict().items()}
