"""The EAGLE-3 draft head (Li et al. 2025), in the checkpoint layout vLLM and SGLang load
(`llama_eagle3.py` in both; e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B):

    fc          Linear(3 * target_hidden -> hidden): fuses the target's residual stream at a low, a
                middle and a high layer (the inputs of layers `aux_layer_ids`)
    midlayer.*  one Llama decoder layer whose q/k/v read concat(input_layernorm(embeds),
                hidden_norm(hidden)), 2 * hidden wide
    norm        its final RMSNorm
    lm_head     Linear(hidden -> draft_vocab_size)
    d2t         [draft_vocab] int64: target id = draft id + d2t[draft id]
    t2d         [vocab] bool: which target ids the draft vocabulary holds (not needed to serve)

The embeddings are the target's (`embed_tokens.weight` only when the checkpoint ships its own).
At position t the head reads (h_t, token t + 1) and predicts token t + 2: h_t is fc(target aux
states) for a token the target computed, or the head's own pre-norm output at t - 1 for a draft.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig

from engine.model.llama import MLP, Attention, LlamaForCausalLM, RMSNorm
from engine.model.rope import RotaryEmbedding
from engine.quant.linear import copy_checked

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


def load_head_config(model_dir: Path) -> LlamaConfig:
    """config.json of an EAGLE-3 head; draft_vocab_size defaults to vocab_size, as in vLLM."""
    values = json.loads((Path(model_dir) / "config.json").read_text())
    architectures = values.get("architectures") or []
    if not any(a in ARCHITECTURES for a in architectures):
        raise ValueError(
            f"{model_dir} is not an EAGLE-3 head: architectures {architectures}, "
            f"expected one of {ARCHITECTURES}"
        )
    config = LlamaConfig(**values)
    if getattr(config, "draft_vocab_size", None) is None:
        config.draft_vocab_size = config.vocab_size
    return config


def aux_layer_ids(head_config: LlamaConfig, num_target_layers: int) -> tuple[int, ...]:
    """The target layers whose *input* (the residual stream after layer id - 1) the head reads:
    `eagle_config.eagle_aux_hidden_state_layer_ids` (or the top-level key), else vLLM's default
    (2, L // 2, L - 3)."""
    eagle_config = getattr(head_config, "eagle_config", None) or {}
    ids = eagle_config.get("eagle_aux_hidden_state_layer_ids") or getattr(
        head_config, "eagle_aux_hidden_state_layer_ids", None
    )
    if not ids:
        ids = (2, num_target_layers // 2, num_target_layers - 3)
    ids = tuple(int(i) for i in ids)
    if len(ids) != 3 or not all(0 <= i < num_target_layers for i in ids):
        raise ValueError(f"EAGLE-3 needs 3 aux layer ids in [0, {num_target_layers}), got {ids}")
    return ids


class Eagle3Layer(nn.Module):
    """`midlayer`: a decoder layer over [embeds | hidden]."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index=0)
        attn = self.self_attn
        # q/k/v read both halves: the one change from a target layer (vLLM overrides it alike).
        self.self_attn.qkv_proj = nn.Linear(
            2 * hidden,
            attn.q_size + 2 * attn.kv_size,
            bias=bool(getattr(config, "attention_bias", False)),
        )
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(
        self,
        embeds: torch.Tensor,  # [num_tokens, hidden] the input tokens' embeddings
        hidden: torch.Tensor,  # [num_tokens, hidden] fc(aux) or the head's previous output
        rotary: RotaryEmbedding,
        positions: torch.Tensor,  # [num_tokens]
        kv_cache,
        meta,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (MLP output, the residual stream before it), as LlamaDecoderLayer."""
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)  # [num_tokens, 2 * hidden]
        x = self.self_attn(x, rotary, positions, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Eagle3Head(nn.Module):
    def __init__(self, config: LlamaConfig, target_hidden_size: int, target_vocab: int) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.target_hidden_size = int(getattr(config, "target_hidden_size", target_hidden_size))
        if self.target_hidden_size != target_hidden_size:
            raise ValueError(
                f"the head reads target hidden states of {self.target_hidden_size}, the target "
                f"has {target_hidden_size}"
            )
        if config.vocab_size != target_vocab:
            raise ValueError(
                f"the head is for a vocabulary of {config.vocab_size}, the target has "
                f"{target_vocab}: it must share the target's tokenizer"
            )
        self.draft_vocab_size = int(config.draft_vocab_size)
        self.fc = nn.Linear(3 * self.target_hidden_size, hidden, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, self.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.ones(config.vocab_size, dtype=torch.bool))
        # Only when the checkpoint has its own (load_weights adds it); else the target's.
        self.embed_tokens: nn.Embedding | None = None
        attn = self.midlayer.self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.rotary = RotaryEmbedding(config, self.head_dim)

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """aux [num_tokens, 3 * target_hidden] -> the head's hidden input [num_tokens, hidden]."""
        return self.fc(aux)

    def forward(
        self,
        embeds: torch.Tensor,  # [num_tokens, hidden]
        hidden: torch.Tensor,  # [num_tokens, hidden]
        positions: torch.Tensor,  # [num_tokens]
        kv_cache,
        meta,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (normed [num_tokens, hidden] for the logits, pre-norm [num_tokens, hidden]: the
        next draft step's hidden input)."""
        x, residual = self.midlayer(embeds, hidden, self.rotary, positions, kv_cache, meta)
        return self.norm(x, residual)

    def draft_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """-> [rows, draft_vocab] float32."""
        return self.lm_head(normed).float()

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """-> [rows, vocab] float32 over the target's vocabulary: -inf outside the draft's."""
        draft = self.draft_logits(normed)  # [rows, draft_vocab]
        out = draft.new_full((draft.shape[0], self.config.vocab_size), float("-inf"))
        out[:, self.target_ids] = draft
        return out

    @property
    def target_ids(self) -> torch.Tensor:
        """[draft_vocab] int64: each draft id's target id."""
        return torch.arange(self.draft_vocab_size, device=self.d2t.device) + self.d2t

    def checkpoint_tensors(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """Our parameters under the checkpoint's names (q/k/v and gate/up apart), in `dtype`
        (d2t and t2d as they are): what `load_weights` reads back."""
        attn, mlp = self.midlayer.self_attn, self.midlayer.mlp
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.state_dict().items():
            if name == "midlayer.self_attn.qkv_proj.weight":
                parts = tensor.split([attn.q_size, attn.kv_size, attn.kv_size])
                for part, t in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                    out[f"midlayer.self_attn.{part}.weight"] = t
            elif name == "midlayer.mlp.gate_up_proj.weight":
                gate, up = tensor.split(mlp.intermediate_size)
                out["midlayer.mlp.gate_proj.weight"] = gate
                out["midlayer.mlp.up_proj.weight"] = up
            else:
                out[name] = tensor
        return {
            n: (t if t.dtype in (torch.int64, torch.bool) else t.to(dtype)).contiguous()
            for n, t in out.items()
        }

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Checkpoint names (fc.weight, midlayer.self_attn.q_proj.weight, ..., d2t, t2d) into our
        parameters, q/k/v and gate/up fused; every parameter must be covered once."""
        weights = dict(weights)
        if "embed_tokens.weight" in weights:
            shape = weights["embed_tokens.weight"].shape
            self.embed_tokens = nn.Embedding(*shape, device=self.fc.weight.device)
            self.embed_tokens.to(self.fc.weight.dtype)
        params = dict(self.named_parameters()) | dict(self.named_buffers())
        params.pop("rotary.inv_freq", None)
        attn, mlp = self.midlayer.self_attn, self.midlayer.mlp
        shard_sizes = {
            "midlayer.self_attn.qkv_proj.weight": [attn.q_size, attn.kv_size, attn.kv_size],
            "midlayer.self_attn.qkv_proj.bias": [attn.q_size, attn.kv_size, attn.kv_size],
            "midlayer.mlp.gate_up_proj.weight": [mlp.intermediate_size] * 2,
        }
        loaded: set[str] = set()
        for name, tensor in weights.items():
            target, shard = name, None
            for hf_part, (our_part, index) in LlamaForCausalLM._FUSED.items():
                if hf_part in name:
                    target, shard = name.replace(hf_part, our_part), index
                    break
            if target not in params:
                raise ValueError(f"EAGLE-3 checkpoint tensor {name!r} has no place in the head")
            param = params[target]
            if shard is None:
                if param.dtype in (torch.int64, torch.bool):
                    if tuple(param.shape) != tuple(tensor.shape):
                        raise ValueError(f"{name}: shape {tuple(tensor.shape)}, want {param.shape}")
                    param.copy_(tensor.to(param.dtype))
                else:
                    copy_checked(param.data, tensor, name)
                loaded.add(target)
            else:
                sizes = shard_sizes[target]
                start = sum(sizes[:shard])
                copy_checked(param.data.narrow(0, start, sizes[shard]), tensor, name)
                loaded.add(f"{target}#{shard}")
        expected = {
            f"{n}#{i}" if n in shard_sizes else n
            for n in params
            for i in range(len(shard_sizes.get(n, [0])))
        }
        if self.draft_vocab_size == self.config.vocab_size:
            expected -= {"d2t", "t2d"}  # no map: draft ids are target ids
        expected.discard("t2d")  # serving needs d2t only
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"EAGLE-3 checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        if int(self.target_ids.max()) >= self.config.vocab_size or int(self.target_ids.min()) < 0:
            raise ValueError("EAGLE-3 d2t maps a draft id outside the target vocabulary")
