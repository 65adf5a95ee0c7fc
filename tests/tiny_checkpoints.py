"""Random-weight tiny Hugging Face checkpoints of each family we serve, for engine tests.

`make_tiny_checkpoint("llama3", tmp_path)` writes a real HF checkpoint (config.json, safetensors,
generation_config.json and a byte-level tokenizer) that transformers loads as is, so a test can run
our engine and the transformers oracle on the same weights. Not a test module.

What each family exercises:
- "llama3":  LlamaConfig, GQA, llama3 rope scaling whose original context (64) is small enough
             that, at head_dim 16, it divides some frequencies, smooths some, keeps the highest.
- "qwen2":   Qwen2Config, q/k/v biases, tied embeddings (no lm_head.weight in the file).
- "qwen3":   Qwen3Config, q/k RMSNorm, head_dim 32 != hidden_size / num_attention_heads (16).
- "mistral": MistralConfig, no sliding window (None), rope theta 1e6.

Weights are drawn by us from `seed` (not by transformers' init, which changes across versions):
matrices N(0, 0.2), so logits are far from uniform (top-2 gaps of ~0.5) and greedy decoding varies
(at 0.1 the tied qwen2 model repeats one token); biases N(0, 0.5), so a dropped bias shows; RMSNorm
weights U(0.5, 1.5), so a dropped norm weight shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama3", "qwen2", "qwen3", "mistral")

# Byte-level tokenizer: token id == byte value for bytes 0x00-0xF7, which covers every byte of
# UTF-8 text (0xF8-0xFF never occur in UTF-8); ids 248-255 are special tokens.
BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = 248, 249, 250, 251, 252
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|reserved_0|>",
    "<|reserved_1|>",
    "<|reserved_2|>",
]
TOKENIZER_VOCAB_SIZE = 256
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SHARD_SIZE = "40KB"  # with save_sharded: every tiny checkpoint spans several shards

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.2,  # the std of our matrix init (see _randomize)
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "dtype": "float32",
}

_FAMILY: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama3": (
        LlamaConfig,
        {
            "architectures": ["LlamaForCausalLM"],
            "rope_theta": 10000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                # wavelengths at head_dim 16 run 6.3 .. 19869: below 16 kept, 16..64 smoothed,
                # above 64 divided by the factor.
                "original_max_position_embeddings": 64,
            },
            "tie_word_embeddings": False,
        },
    ),
    "qwen2": (
        Qwen2Config,
        {
            "architectures": ["Qwen2ForCausalLM"],
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
        },
    ),
    "qwen3": (
        Qwen3Config,
        {
            "architectures": ["Qwen3ForCausalLM"],
            "head_dim": 32,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
        },
    ),
    "mistral": (
        MistralConfig,
        {
            "architectures": ["MistralForCausalLM"],
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
        },
    ),
}


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """The config of a tiny model of `family`; `overrides` are config.json keys."""
    if family not in _FAMILY:
        raise ValueError(f"unknown tiny family '{family}'; families: {', '.join(FAMILIES)}")
    config_class, values = _FAMILY[family]
    return config_class(**{**_COMMON, **values, **overrides})


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (no merges): id == byte value, specials at 248..255, ChatML
    template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(BOS_ID)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters (what the ByteLevel
    pre-tokenizer emits)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def make_tiny_checkpoint(
    family: str,
    out_dir: Path,
    seed: int = 0,
    *,
    save_sharded: bool = False,
    tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Write a random-weight tiny checkpoint of `family` to `out_dir` (created) and return it.

    `save_sharded` splits the weights into several safetensors shards with an index;
    `tokenizer` adds the byte-level tokenizer (needs vocab_size >= 256). Same arguments, same
    bytes: weights come only from `seed`.
    """
    config = tiny_config(family, **overrides)
    if tokenizer and config.vocab_size < TOKENIZER_VOCAB_SIZE:
        raise ValueError(
            f"the tiny tokenizer needs vocab_size >= {TOKENIZER_VOCAB_SIZE}, got "
            f"{config.vocab_size} (pass tokenizer=False)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed, std=config.initializer_range)
    save_kwargs: dict[str, Any] = {"max_shard_size": SHARD_SIZE} if save_sharded else {}
    model.save_pretrained(out_dir, **save_kwargs)
    if tokenizer:
        tiny_tokenizer().save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    # named_parameters() yields a tied weight once, under its first name.
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            values = torch.rand(param.shape, generator=generator) + 0.5
        elif name.endswith(".bias"):
            values = torch.randn(param.shape, generator=generator) * 0.5
        else:
            values = torch.randn(param.shape, generator=generator) * std
        param.copy_(values)


def cached_tiny_checkpoint(
    root: Path,
    family: str,
    seed: int = 0,
    *,
    save_sharded: bool = False,
    tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """`make_tiny_checkpoint` under `root`, built once per distinct arguments and reused after
    (for session fixtures: `cached_tiny_checkpoint(tmp_path_factory.getbasetemp() / "tiny", ...)`).
    The directory appears atomically, so concurrent builders are safe."""
    key = json.dumps(
        [family, seed, save_sharded, tokenizer, overrides], sort_keys=True, default=str
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    target = Path(root) / f"{family}-seed{seed}{'-sharded' if save_sharded else ''}-{digest}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        make_tiny_checkpoint(
            family, staging, seed, save_sharded=save_sharded, tokenizer=tokenizer, **overrides
        )
        try:
            os.replace(staging, target)
        except OSError:  # another builder got there first; theirs is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# Mixture-of-experts families (engine/model/moe_model.py), kept out of FAMILIES so that the dense
# families' many parametrized tests do not run on them; tests/test_moe_parity.py runs these.
# - "mixtral":   MixtralConfig, 4 experts top-2 (always renormalised), routing weights in float32.
# - "qwen2_moe": Qwen2MoeConfig, 8 experts top-2 not renormalised, q/k/v biases, a shared expert
#                with its sigmoid gate, decoder_sparse_step 2 (layers 1, 3 sparse; 0, 2 dense).
# - "qwen3_moe": Qwen3MoeConfig, 8 experts top-3 renormalised (norm_topk_prob), q/k RMSNorm,
#                mlp_only_layers [0] (layer 0 dense).
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig  # noqa: E402

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")

_FAMILY.update(
    {
        "mixtral": (
            MixtralConfig,
            {
                "architectures": ["MixtralForCausalLM"],
                "intermediate_size": 48,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "rope_theta": 1000000.0,
                "sliding_window": None,
                "tie_word_embeddings": False,
            },
        ),
        "qwen2_moe": (
            Qwen2MoeConfig,
            {
                "architectures": ["Qwen2MoeForCausalLM"],
                "num_hidden_layers": 4,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 48,
                "decoder_sparse_step": 2,
                "norm_topk_prob": False,
                "rope_theta": 1000000.0,
                "tie_word_embeddings": False,
                "use_sliding_window": False,
            },
        ),
        "qwen3_moe": (
            Qwen3MoeConfig,
            {
                "architectures": ["Qwen3MoeForCausalLM"],
                "num_hidden_layers": 3,
                "head_dim": 32,
                "num_experts": 8,
                "num_experts_per_tok": 3,
                "moe_intermediate_size": 32,
                "norm_topk_prob": True,
                "mlp_only_layers": [0],
                "rope_theta": 1000000.0,
                "tie_word_embeddings": False,
                "use_sliding_window": False,
            },
        ),
    }
)


def make_tiny_eagle_head(
    target_dir: Path,
    out: Path,
    seed: int = 0,
    draft_vocab_size: int | None = None,
    aux_layer_ids: tuple[int, ...] | None = (0, 1, 1),
) -> Path:
    """A random EAGLE-3 head for the checkpoint at `target_dir`, in the layout vLLM loads
    (config.json with draft_vocab_size and eagle_config, fc / midlayer.* / norm / lm_head /
    d2t / t2d). With `draft_vocab_size` the draft vocabulary is a random subset of the target's
    (d2t maps it); `aux_layer_ids` None leaves the default (2, L // 2, L - 3)."""
    from safetensors.torch import save_file

    from engine.spec.eagle import Eagle3Head, load_head_config

    target = json.loads((Path(target_dir) / "config.json").read_text())
    vocab = target["vocab_size"]
    values = {
        key: target[key]
        for key in (
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rms_norm_eps",
            "vocab_size",
            "max_position_embeddings",
            "rope_parameters",
        )
        if key in target
    }
    values |= {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "intermediate_size": 96,
        "draft_vocab_size": draft_vocab_size or vocab,
        "target_hidden_size": target["hidden_size"],
        "tie_word_embeddings": False,
    }
    if aux_layer_ids is not None:
        values["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(values, indent=2))
    head = Eagle3Head(load_head_config(out), target["hidden_size"], vocab)
    _randomize(head, seed, std=0.2)
    if draft_vocab_size:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randperm(vocab, generator=generator)[:draft_vocab_size].sort().values
        head.d2t.copy_(ids - torch.arange(draft_vocab_size))
        head.t2d.zero_()
        head.t2d[ids] = True
    save_file(head.checkpoint_tensors(torch.float32), str(out / "model.safetensors"))
    return out
