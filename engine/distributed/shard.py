"""A loaded model -> this rank's shard of it, in place (Megatron-style tensor parallelism).

    qkv_proj, gate_up_proj   by output columns: rank r keeps its query heads, its KV heads and
                             its slice of the intermediate size; no communication
    o_proj, down_proj        by input rows, wrapped in `RowParallel`: one all-reduce each
    embed_tokens             by vocabulary rows (`VocabParallelEmbedding`): one all-reduce
    lm_head (or the tied     by vocabulary rows; `LogitsGather` all-gathers the logits
    embedding)

KV heads: with at least as many KV heads as ranks each rank keeps num_kv_heads / world_size of
them; with fewer, each KV head is replicated on world_size / num_kv_heads ranks, and the query
heads a rank keeps all read that one head (vLLM's rule). RMSNorm weights, the rotary tables and
per-head q/k norms are replicated.

MoE layers: every routed expert's gate_up and down (and the shared expert's) are split like a
dense MLP's, the router replicated, and one all-reduce sums the block's output.

Quantized projections (fp8, int8 SmoothQuant) are split the same way: per-output-row weight
scales follow their rows, per-tensor input scales are replicated (every rank quantizes its
input with the same scale), a SmoothQuant pre_quant_scale follows the input columns of a
row-parallel layer. int4 AWQ (packed columns, group scales) is not split yet and is refused.

The whole checkpoint is loaded on every rank before its shard is cut (the rest is freed), so
while loading a model must fit one device's memory; sharding at load time is future work.
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from engine.config import EngineConfig
from engine.distributed.group import TPGroup
from engine.distributed.layers import LogitsGather, RowParallel, VocabParallelEmbedding
from engine.model.builder import LoadedModel, load_model, parameter_bytes
from engine.model.llama import LlamaForCausalLM
from engine.numeric import cdiv
from engine.quant.fp8 import Fp8Linear, fp8_backend
from engine.quant.int8 import Int8SmoothQuantLinear, int8_backend
from engine.quant.linear import QuantLinear


class ShardError(ValueError):
    """The model cannot be split over this many ranks (the message says which dimension)."""


def check_shardable(model: nn.Module, world_size: int) -> None:
    """Raise ShardError unless `model` splits evenly over `world_size` ranks."""
    attn = model.model.layers[0].self_attn
    heads, kv_heads = attn.num_heads, attn.num_kv_heads
    problems = []
    if heads % world_size:
        problems.append(f"num_attention_heads {heads}")
    if kv_heads % world_size and world_size % kv_heads:
        problems.append(f"num_key_value_heads {kv_heads} (nor does it divide {world_size})")
    for name, size in sorted(_intermediate_sizes(model).items()):
        if size % world_size:
            problems.append(f"{name} {size}")
    if problems:
        raise ShardError(
            f"tensor_parallel_size {world_size} does not divide " + ", ".join(problems)
        )
    for module in model.modules():
        if isinstance(module, QuantLinear) and not isinstance(
            module, (Fp8Linear, Int8SmoothQuantLinear)
        ):
            raise ShardError(
                f"tensor_parallel_size > 1 does not serve {module.quant.algo} weights yet "
                "(fp8 and int8 SmoothQuant are sharded; int4 AWQ is not)"
            )


def _intermediate_sizes(model: nn.Module) -> dict[str, int]:
    """The MLP widths the ranks split, by the config names that set them."""
    from engine.model.moe_model import SparseMoeBlock

    sizes = {}
    for layer in model.model.layers:
        mlp = layer.mlp
        if isinstance(mlp, SparseMoeBlock):
            sizes["moe_intermediate_size"] = mlp.experts.expert_size
            if mlp.shared_expert is not None:
                sizes["shared_expert_intermediate_size"] = mlp.shared_expert.intermediate_size
        else:
            sizes["intermediate_size"] = mlp.intermediate_size
    return sizes


@torch.no_grad()
def shard_model(model: LlamaForCausalLM, group: TPGroup) -> None:
    """Cut `model` down to rank `group.rank`'s shard (see the module doc), in place."""
    from engine.model.moe_model import SparseMoeBlock

    rank, world = group.rank, group.world_size
    check_shardable(model, world)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        q_rows, kv_rows, num_kv = _attention_rows(attn, rank, world)
        qkv_starts = [0, attn.q_size, attn.q_size + attn.kv_size]
        keep_rows(attn.qkv_proj, qkv_starts, [q_rows, kv_rows, kv_rows])
        attn.num_heads //= world
        attn.num_kv_heads = num_kv
        attn.q_size = attn.num_heads * attn.head_dim
        attn.kv_size = num_kv * attn.head_dim
        attn.o_proj = RowParallel(keep_columns(attn.o_proj, rank, world), group)
        if isinstance(mlp, SparseMoeBlock):
            _shard_moe_block(mlp, group)
        else:
            _shard_mlp(mlp, rank, world)
            mlp.down_proj = RowParallel(mlp.down_proj, group)
    model.num_kv_heads = model.model.layers[0].self_attn.num_kv_heads
    _shard_vocabulary(model, group)


def _shard_mlp(mlp: nn.Module, rank: int, world: int) -> None:
    """Rank's slice of a gated MLP's intermediate size: gate_up by rows, down by columns (its
    output a partial sum, for the caller to all-reduce)."""
    size = mlp.intermediate_size // world
    mine = range(rank * size, (rank + 1) * size)
    keep_rows(mlp.gate_up_proj, [0, mlp.intermediate_size], [mine, mine])
    mlp.intermediate_size = size
    keep_columns(mlp.down_proj, rank, world)


def _shard_moe_block(block: nn.Module, group: TPGroup) -> None:
    """Every routed expert (and the shared one) keeps rank's slice of its intermediate size, as
    a dense MLP does; the router and the shared expert's gate are replicated, so every rank
    routes alike, and the block's partial output is summed by one all-reduce (vLLM's
    reduce_results). fp8 experts: per-row weight scales follow gate_up's rows, down's per-row
    scales and the input scales are replicated."""
    rank, world = group.rank, group.world_size
    experts = block.experts
    size = experts.expert_size // world
    mine = torch.arange(rank * size, (rank + 1) * size, device=experts.gate_up.device)
    rows = torch.cat([mine, experts.expert_size + mine])  # of [gate; up]
    experts.gate_up = _param(experts.gate_up, experts.gate_up.index_select(1, rows).contiguous())
    if hasattr(experts, "gate_up_scale"):  # Fp8Experts: [num_experts, 2 * inter]
        experts.gate_up_scale = _param(
            experts.gate_up_scale, experts.gate_up_scale.index_select(1, rows).contiguous()
        )
    cols = slice(rank * size, (rank + 1) * size)
    experts.down = _param(experts.down, experts.down[:, :, cols].contiguous())
    experts.expert_size = size
    if block.shared_expert is not None:
        _shard_mlp(block.shared_expert, rank, world)
    block.reduce = group.all_reduce


def _attention_rows(attn: nn.Module, rank: int, world: int) -> tuple[range, range, int]:
    """-> (rank's query rows within q, its key (= value) rows within k, its KV head count)."""
    q_size = attn.q_size // world
    q_rows = range(rank * q_size, (rank + 1) * q_size)
    kv_heads = attn.num_kv_heads
    if kv_heads >= world:
        per_rank = kv_heads // world
        first = rank * per_rank
    else:  # replicated: world / kv_heads ranks share each head
        per_rank, first = 1, rank // (world // kv_heads)
    d = attn.head_dim
    return q_rows, range(first * d, (first + per_rank) * d), per_rank


def keep_rows(linear: nn.Module, starts: list[int], rows_per_shard: list[range]) -> None:
    """Keep, of each fused shard of `linear`'s output rows (shard i starts at row starts[i]),
    the rows given relative to the shard's start: a column-parallel split."""
    index = torch.tensor(
        [start + row for start, rows in zip(starts, rows_per_shard, strict=True) for row in rows],
        dtype=torch.int64,
        device=linear.weight.device,
    )
    linear.weight = _param(linear.weight, linear.weight.index_select(0, index))
    if linear.bias is not None:
        linear.bias = _param(linear.bias, linear.bias.index_select(0, index))
    linear.out_features = index.numel()
    if isinstance(linear, QuantLinear):
        linear.weight_scale = _param(
            linear.weight_scale, linear.weight_scale.index_select(0, index)
        )
        linear.shard_sizes = tuple(len(rows) for rows in rows_per_shard)
        linear.shard_starts = tuple(sum(linear.shard_sizes[:i]) for i in range(len(rows_per_shard)))
        _refresh_quantized(linear)


def keep_columns(linear: nn.Module, rank: int, world: int) -> nn.Module:
    """Keep rank's slice of `linear`'s input features: a row-parallel split. The bias stays on
    rank 0 alone (the all-reduce adds it once). -> linear."""
    size = linear.in_features // world
    cols = slice(rank * size, (rank + 1) * size)
    linear.weight = _param(linear.weight, linear.weight[:, cols].contiguous())
    linear.in_features = size
    if linear.bias is not None and rank != 0:
        linear.bias = None
    if isinstance(linear, QuantLinear):
        smooth = getattr(linear, "pre_quant_scale", None)
        if smooth is not None:
            linear.pre_quant_scale = _param(smooth, smooth[cols].contiguous())
        _refresh_quantized(linear)
    return linear


def _shard_vocabulary(model: LlamaForCausalLM, group: TPGroup) -> None:
    vocab = model.config.vocab_size
    rows = cdiv(vocab, group.world_size)
    start = group.rank * rows
    embed = model.model.embed_tokens.weight
    model.model.embed_tokens = VocabParallelEmbedding(_vocab_rows(embed, start, rows), start, group)
    if not model.tie_word_embeddings:
        head = model.lm_head.weight
        model.lm_head.weight = _param(head, _vocab_rows(head, start, rows))
        model.lm_head.out_features = rows
    model.logits_gather = LogitsGather(group, vocab)


def _vocab_rows(weight: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Rows [start, start + rows) of a [vocab, hidden] table, zeros past the vocabulary."""
    out = weight.new_zeros(rows, weight.shape[1])  # [rows, hidden]
    held = max(0, min(rows, weight.shape[0] - start))
    out[:held] = weight[start : start + held]
    return out


def _param(old: torch.Tensor, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data, requires_grad=old.requires_grad)


def _refresh_quantized(linear: QuantLinear) -> None:
    """Re-derive what a quantized layer picked from its shape when it finished loading."""
    if isinstance(linear, Fp8Linear):
        first = linear.weight_scale[:1]
        uniform = bool((linear.weight_scale == first).all())
        linear.weight_scale_scalar = first.reshape(()).clone() if uniform else None
        linear.backend = fp8_backend(linear.weight.device, linear.in_features, linear.out_features)
        if linear.backend != "scaled_mm":
            linear.gemv_max_rows = 0
    elif isinstance(linear, Int8SmoothQuantLinear):
        linear.backend = int8_backend(linear.weight.device, linear.in_features, linear.out_features)


def load_shard(config: EngineConfig, group: TPGroup) -> LoadedModel:
    """A worker's model: loaded whole under `config`, then cut to the group rank's shard."""
    return shard_loaded(load_model(config), group)


def shard_loaded(loaded: LoadedModel, group: TPGroup) -> LoadedModel:
    """`loaded` cut to the group rank's shard, its weight_bytes the shard's; the rest freed."""
    shard_model(loaded.model, group)
    loaded.weight_bytes = parameter_bytes(loaded.model)
    gc.collect()
    if loaded.device.type == "cuda":
        torch.cuda.empty_cache()
    return loaded
