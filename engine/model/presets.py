"""Architecture presets: the published config.json values of models we benchmark.

They feed `load_format="dummy"` (random weights at real shapes), so benchmarks and memory plans
run without downloading weights. The values are those of the Hub's config.json of the base
models (the -Instruct variants share every shape; they differ only in eos ids and, for Qwen2.5-7B,
max_position_embeddings 32768). Keys are config.json keys, so `rope_theta`/`rope_scaling` are
given as published; transformers >= 5 folds them into `config.rope_parameters`.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import LlamaConfig, MixtralConfig, PretrainedConfig, Qwen2Config, Qwen3MoeConfig

from .moe import MOE_ARCHITECTURES, MoeSpec

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.1-8B: 8.03B parameters.
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "dtype": "bfloat16",
    },
    # meta-llama/Llama-3.2-1B: 1.24B parameters (tied embeddings).
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "dtype": "bfloat16",
    },
    # Qwen/Qwen2.5-0.5B: 0.49B parameters (tied embeddings; q/k/v biases via model_type qwen2).
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "max_window_layers": 24,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "dtype": "bfloat16",
    },
    # Qwen/Qwen2.5-7B: 7.61B parameters.
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "dtype": "bfloat16",
    },
    # mistralai/Mixtral-8x7B-v0.1: 46.7B parameters, 12.9B active (2 of 8 experts per token).
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "router_aux_loss_coef": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    },
    # Qwen/Qwen3-30B-A3B: 30.5B parameters, 3.3B active (8 of 128 experts per token).
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 48,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "dtype": "bfloat16",
    },
}

_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mixtral": MixtralConfig,
    "qwen3_moe": Qwen3MoeConfig,
}


def preset_config(name: str) -> PretrainedConfig:
    """A fresh config of preset `name` (its family's config class)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)}")
    values = copy.deepcopy(PRESETS[name])
    config_class = _CONFIG_CLASSES[values.pop("model_type")]
    return config_class(**values)


def num_parameters(config: PretrainedConfig) -> int:
    """Parameter count of a Llama/Mistral/Qwen2/Qwen3 causal LM or of their MoE kin (Mixtral,
    Qwen2-MoE, Qwen3-MoE), from its config alone (tied embeddings counted once)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    model_type = config.model_type

    attention = hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden
    if model_type == "qwen2" or getattr(config, "qkv_bias", False):  # q/k/v biases, no o bias
        attention += q_dim + 2 * kv_dim
    elif getattr(config, "attention_bias", False):
        attention += q_dim + 2 * kv_dim + hidden
    if model_type in ("qwen3", "qwen3_moe"):  # per-head RMSNorm of q and k
        attention += 2 * head_dim
    mlp = 3 * hidden * config.intermediate_size
    if getattr(config, "mlp_bias", False):
        mlp += 2 * config.intermediate_size + hidden
    layers = config.num_hidden_layers * (attention + mlp + 2 * hidden)  # + the two RMSNorms
    if model_type in MOE_ARCHITECTURES.values():
        spec = MoeSpec.of(config)
        sparse = sum(spec.is_sparse(i) for i in range(config.num_hidden_layers))
        moe = spec.num_experts * (3 * hidden * spec.expert_size + hidden)  # experts + router rows
        if spec.shared_expert_size:
            moe += 3 * hidden * spec.shared_expert_size + hidden  # + its sigmoid gate
        layers += sparse * (moe - mlp)

    embedding = config.vocab_size * hidden
    lm_head = 0 if config.tie_word_embeddings else embedding
    return embedding + layers + hidden + lm_head


def num_active_parameters(config: PretrainedConfig) -> int:
    """Parameters one token reads: all of a dense model's; for a MoE model, all but the routed
    experts it is not sent to (what a batch-1 decode step reads, embeddings aside)."""
    total = num_parameters(config)
    if config.model_type not in MOE_ARCHITECTURES.values():
        return total
    spec = MoeSpec.of(config)
    sparse = sum(spec.is_sparse(i) for i in range(config.num_hidden_layers))
    idle = spec.num_experts - spec.top_k
    return total - sparse * idle * 3 * config.hidden_size * spec.expert_size
