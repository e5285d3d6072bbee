"""Tiny seeded models and PEFT adapters for tests and benchmarks, built from configs (no hub).

One place for the builders the LoRA, merge and adapter tests (and the LoRA benchmark) share.
Tests import it directly (tests/python is on pytest's path); benchmarks add this folder to
``sys.path`` first. transformers, peft and bitsandbytes are imported only by the builders
that need them.
"""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(seed: int = 0, **overrides):
    """A 2-layer LLaMA (hidden 64, 4 heads / 2 KV heads) in eval mode; `overrides` change config fields."""
    import transformers

    torch.manual_seed(seed)
    fields = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 96,
        "max_position_embeddings": 64,
    }
    fields.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()


def qwen2(seed: int = 0, **overrides):
    """A 2-layer Qwen2 (biases on q/k/v, hidden 64, 4 heads / 2 KV heads) in eval mode."""
    import transformers

    torch.manual_seed(seed)
    fields = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 96,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    fields.update(overrides)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**fields)).eval()


def gpt2(seed: int = 0, **overrides):
    """A 2-layer GPT-2 (Conv1D projections, fan_in_fan_out) in eval mode."""
    import transformers

    torch.manual_seed(seed)
    fields = {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 80, "n_positions": 32}
    fields.update(overrides)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields)).eval()


def save_base(model, folder: Path, shard: str | None = None) -> Path:
    if shard:
        model.save_pretrained(folder, max_shard_size=shard)
    else:
        model.save_pretrained(folder)
    return folder


ADAPTER_CONFIGS = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS},
    "rslora": {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
    "pattern": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": LLAMA_TARGETS,
        "rank_pattern": {"v_proj": 2, "layers.1.mlp.down_proj": 6},
        "alpha_pattern": {"o_proj": 3},
    },
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "up_proj", "down_proj"]},
    "saved": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "gpt2dora": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["c_attn", "c_fc"],
        "fan_in_fan_out": True,
        "use_dora": True,
    },
    "gpt2": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True},
}


def make_adapter(base_folder: Path, kind: str, out: Path, seed: int = 1):
    """A PEFT adapter of `kind` (a key of ADAPTER_CONFIGS) for the model saved in base_folder;
    returns (out, PEFT's merged state dict)."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **ADAPTER_CONFIGS[kind]))
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


class OneLayer(torch.nn.Module):
    """A module holding one layer `proj`, flagged as transformers flags a model loaded in 4 bits:
    PEFT then wraps a Linear4bit in its bitsandbytes LoRA layer (peft.tuners.lora.bnb.Linear4bit),
    as QLoRA training does."""

    is_loaded_in_4bit = True

    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def qlora_layer(
    in_features: int,
    out_features: int,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    bias: bool = False,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    seed: int = 0,
    lora_seed: int | None = None,
):
    """PEFT's LoRA layer over a bitsandbytes Linear4bit quantized from a seeded nn.Linear (CPU)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features, bias=bias)
    base = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=torch.float32,
        quant_type=quant_type,
        compress_statistics=double_quant,
    )
    base.load_state_dict(dense.state_dict())
    base = base.to("cpu")
    del dense
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"], init_lora_weights=False
    )
    if lora_seed is not None:
        torch.manual_seed(lora_seed)
    return get_peft_model(OneLayer(base), config).base_model.model.proj
