"""The Llama family in PyTorch, over a paged KV cache: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3.

The differences between the families are config switches: Qwen2 adds a bias to q/k/v, Qwen3 adds an
RMSNorm over each head of q and k before the rotary embedding, Llama 3.1 scales the rotary
frequencies. q/k/v and gate/up are fused into one matmul each; `load_weights` maps the Hugging Face
names onto the fused parameters. With a `QuantConfig` (a ModelOpt checkpoint) the projections are
the scheme's quantized linears (engine/quant/), loaded from the checkpoint's quantized tensors;
lm_head and the embeddings stay in the compute dtype.

Inputs are flat: all tokens of the step (prefill chunks and decodes of every sequence) in one
dimension, with `AttentionMetadata` telling the attention backend which tokens belong to which
sequence and where their K/V live.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.attention.metadata import AttentionMetadata
from engine.kv.cache import LayerKV
from engine.model.rope import RotaryEmbedding
from engine.quant import make_linear
from engine.quant.checkpoint import QuantConfig, QuantConfigError
from engine.quant.linear import QuantLinear, copy_checked


class RMSNorm(nn.Module):
    fused = False  # CUDA: engine/kernels/rmsnorm.py (LlamaForCausalLM.enable_fused_kernels)
    # Fused only: the next fp8 linear's 1 / input_scale; the normed rows come out in e4m3.
    out_inv_scale: torch.Tensor | None = None

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """-> norm(x); with `residual`: (norm(x + residual), x + residual), the residual add
        fused into the norm as in vLLM. The fused kernel may overwrite x and residual."""
        if self.fused and x.dtype == self.weight.dtype:
            inv = self.out_inv_scale
            if residual is None:
                return kernels.rms_norm(x, self.weight, self.eps, inv)
            return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps, inv)
        if residual is not None:
            x = residual = x + residual  # in the dtype, as transformers' `residual + hidden`
        # Same arithmetic as transformers' LlamaRMSNorm: statistics in float32, scale in x's dtype.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x32.to(dtype)
        return out if residual is None else (out, residual)


class Attention(nn.Module):
    def __init__(self, config, layer_index: int, quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        qkv_bias = qkv_bias or bool(getattr(config, "qkv_bias", False))  # Qwen2-MoE
        hf = f"model.layers.{layer_index}.self_attn."
        self.qkv_proj = make_linear(
            config.hidden_size,
            [self.q_size, self.kv_size, self.kv_size],
            qkv_bias,
            quant,
            [hf + "q_proj", hf + "k_proj", hf + "v_proj"],
        )
        o_bias = bool(getattr(config, "attention_bias", False))
        self.o_proj = make_linear(self.q_size, [config.hidden_size], o_bias, quant, [hf + "o_proj"])
        self.qk_norm = config.model_type in ("qwen3", "qwen3_moe")
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden]
        rotary: RotaryEmbedding,
        positions: torch.Tensor,  # [num_tokens]
        kv_cache: LayerKV,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, kv_heads, head_dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = rotary(positions, q, k)
        out = meta.backend.forward(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    fused = False  # CUDA: SiLU-and-mul in one kernel (engine/kernels/activation.py)
    down_inv_scale: torch.Tensor | None = None  # fused only: SiLU-and-mul's output in e4m3

    def __init__(
        self,
        config,
        layer_index: int = 0,
        quant: QuantConfig | None = None,
        intermediate_size: int | None = None,  # a MoE's shared expert has its own
        hf_name: str = "mlp",
    ) -> None:
        super().__init__()
        self.intermediate_size = size = intermediate_size or config.intermediate_size
        hf = f"model.layers.{layer_index}.{hf_name}."
        self.gate_up_proj = make_linear(
            config.hidden_size, [size, size], False, quant, [hf + "gate_proj", hf + "up_proj"]
        )
        self.down_proj = make_linear(size, [config.hidden_size], False, quant, [hf + "down_proj"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate]
        if self.fused:
            return self.down_proj(kernels.silu_and_mul(gate_up, self.down_inv_scale))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config,
        layer_index: int,
        quant: QuantConfig | None = None,
        mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index, quant)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer_index, quant) if mlp is None else mlp

    def forward(
        self, hidden, residual, rotary, positions, kv_cache, meta
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's residual flow: `hidden` is the previous sublayer's output, `residual` the stream
        before it (None at the first layer); each norm adds the two, fused on CUDA.
        -> (this layer's MLP output, the residual stream before it)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rotary, positions, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    """One class for the whole family; the config's `model_type` picks the variant."""

    # EAGLE-3 (engine/spec/eagle.py): the layers whose input (the residual stream after the
    # layer before) each eager forward keeps in `aux_hidden_states`; empty: nothing is kept.
    aux_hidden_layers: tuple[int, ...] = ()
    aux_hidden_states: torch.Tensor | None = None  # [num_tokens, len(layers) * hidden]

    # Hugging Face parameter name fragment -> (our fused parameter fragment, shard index)
    _FUSED = {
        ".q_proj.": (".qkv_proj.", 0),
        ".k_proj.": (".qkv_proj.", 1),
        ".v_proj.": (".qkv_proj.", 2),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, config, quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.quant = quant
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if quant is not None and not self.tie_word_embeddings and not quant.is_excluded("lm_head"):
            raise QuantConfigError(
                f"{quant.source or 'the checkpoint'} quantizes lm_head; the engine keeps lm_head "
                "in the compute dtype (ModelOpt excludes it by default)"
            )
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(
            DecoderLayer(config, i, quant, self.make_mlp(config, i, quant))
            for i in range(config.num_hidden_layers)
        )
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        first = self.model.layers[0].self_attn
        self.num_kv_heads, self.head_dim = first.num_kv_heads, first.head_dim
        self.rotary = RotaryEmbedding(config, self.head_dim)

    def make_mlp(self, config, layer_index: int, quant: QuantConfig | None) -> nn.Module:
        """The feed-forward block of layer `layer_index`; MoE models (moe_model.py) override it."""
        return MLP(config, layer_index, quant)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: Sequence[LayerKV],  # per layer: its pages (and scales)
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """-> final hidden states [num_tokens, hidden]; `logits` scores the rows it is given."""
        hidden, residual = self.model.embed_tokens(input_ids), None
        if self.aux_hidden_layers:
            return self._forward_keeping_aux(hidden, positions, kv_caches, meta)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, self.rotary, positions, kv_cache, meta)
        return self.model.norm(hidden, residual)[0]

    def _forward_keeping_aux(self, hidden, positions, kv_caches, meta) -> torch.Tensor:
        """`forward` that also keeps the residual stream entering the aux layers (a separate
        loop, so the plain path has no per-layer check)."""
        kept: dict[int, torch.Tensor] = {}
        residual = None
        for i, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches, strict=True)):
            if i in self.aux_hidden_layers:
                # A new tensor: the fused norm may overwrite hidden and residual in place.
                kept[i] = hidden if residual is None else hidden + residual
            hidden, residual = layer(hidden, residual, self.rotary, positions, kv_cache, meta)
        self.aux_hidden_states = torch.cat([kept[i] for i in self.aux_hidden_layers], dim=-1)
        return self.model.norm(hidden, residual)[0]

    def enable_fused_kernels(self, names: frozenset[str], max_positions: int) -> None:
        """Use the Triton kernels in `names` (engine/kernels.KERNELS: "rmsnorm", "rotary", "silu")
        instead of the torch ops; an empty set restores the torch path. CUDA only; positions
        must stay below max_positions (the rotary cos/sin cache). A fused RMSNorm or
        SiLU-and-mul that feeds an fp8 linear (static activation scale) quantizes its output
        for it, so no separate quantize kernel runs."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.fused = "rmsnorm" in names
                module.out_inv_scale = None
            elif isinstance(module, MLP):
                module.fused = "silu" in names
                module.down_inv_scale = _fp8_inv_scale(module.down_proj) if module.fused else None
        if "rmsnorm" in names:
            for layer in self.model.layers:
                layer.input_layernorm.out_inv_scale = _fp8_inv_scale(layer.self_attn.qkv_proj)
                # A MoE layer's experts take their input as it is (no gate_up_proj to feed).
                layer.post_attention_layernorm.out_inv_scale = _fp8_inv_scale(
                    getattr(layer.mlp, "gate_up_proj", None)
                )
        self.rotary.build_cache(max_positions if "rotary" in names else None)

    # Tensor parallelism (engine/distributed/shard.py): lm_head holds this rank's vocabulary rows
    # and this gathers every rank's logits columns.
    logits_gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """-> [rows, vocab] float32 (written into `out` when given)."""
        scores = F.linear(hidden, self.lm_head_weight)  # [rows, vocab, or this rank's share]
        if self.logits_gather is not None:
            scores = self.logits_gather(scores)
        return scores.float() if out is None else out.copy_(scores)

    @torch.no_grad()
    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        loaded_elsewhere: frozenset[str] = frozenset(),
    ) -> None:
        """Copy Hugging Face-named tensors into our (partly fused) parameters; every parameter
        must be covered exactly once, or the load fails naming what is missing. Tensors of a
        quantized projection (weight, weight_scale, input_scale, ...) go to its QuantLinear.
        The modules named in `loaded_elsewhere` (MoE experts) are the caller's to fill."""
        quantized = {n: m for n, m in self.named_modules() if isinstance(m, QuantLinear)}
        skip = quantized.keys() | loaded_elsewhere
        params = {n: p for n, p in self.named_parameters() if n.rpartition(".")[0] not in skip}
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name.endswith((".k_scale", ".v_scale")):
                continue  # KV-cache scales (ModelOpt FP8 KV): engine/quant/kv_scales.py reads them
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            target, shard = name, None
            for hf_part, (our_part, index) in self._FUSED.items():
                if hf_part in name:
                    target, shard = name.replace(hf_part, our_part), index
                    break
            module_name, _, suffix = target.rpartition(".")
            if module_name in quantized:
                quantized[module_name].load(suffix, shard or 0, tensor, name)
                continue
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in this model")
            param = params[target]
            if shard is None:
                copy_checked(param.data, tensor, name)
                loaded.add(target)
            else:
                start, size = self._shard_range(target, shard)
                copy_checked(param.data.narrow(0, start, size), tensor, name)
                loaded.add(f"{target}#{shard}")
        expected = set()
        for pname in params:
            if ".qkv_proj." in pname:
                expected |= {f"{pname}#{i}" for i in range(3)}
            elif ".gate_up_proj." in pname:
                expected |= {f"{pname}#{i}" for i in range(2)}
            else:
                expected.add(pname)
        missing = sorted(expected - loaded)
        missing += [name for module in quantized.values() for name in module.missing()]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        for module in quantized.values():
            module.finish_loading()

    def _shard_range(self, target: str, shard: int) -> tuple[int, int]:
        attn = self.model.layers[0].self_attn
        if ".qkv_proj." in target:
            sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        else:
            sizes = [self.config.intermediate_size] * 2
        return sum(sizes[:shard]), sizes[shard]


def _fp8_inv_scale(linear: nn.Module) -> torch.Tensor | None:
    return linear.fp8_input_inv_scale() if isinstance(linear, QuantLinear) else None
