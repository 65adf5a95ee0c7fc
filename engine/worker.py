"""`build_worker`: one model with its KV pool, attention backend and runner, wired the one way
the target engine and the speculative draft model both use.

    load_model -> kv_quant_for -> KVLayout.of -> (size the pool) -> KVCache + KVCacheManager
               -> make_backend -> [DecodeGraphs] -> ModelRunner
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.attention.select import make_backend
from engine.config import EngineConfig
from engine.kv.cache import KVCache, KVLayout
from engine.kv.manager import KVCacheManager
from engine.model.builder import LoadedModel
from engine.numeric import cdiv
from engine.quant.kv_scales import KVQuant, kv_quant_for
from engine.runner import ModelRunner


@dataclass
class Worker:
    loaded: LoadedModel
    kv_quant: KVQuant
    num_blocks: int  # pages requests can hold (a CUDA-graph scratch page comes on top)
    max_model_len: int  # the model's, or the config's, capped so one request fits the pool
    kv: KVCacheManager
    kv_cache: KVCache
    runner: ModelRunner


def build_worker(
    config: EngineConfig,
    loaded: LoadedModel,
    num_blocks: Callable[[KVLayout], int],
    enable_prefix_caching: bool,
    use_graphs: bool = False,
) -> Worker:
    """`loaded` served under `config` (its block size, KV cache dtype, attention backend and
    max_num_seqs); `num_blocks(layout)` sizes the pool once the page layout is known."""
    model, device = loaded.model, loaded.device
    kv_quant = kv_quant_for(config, loaded)
    layout = KVLayout.of(model, config.block_size, loaded.dtype, kv_quant.kv_cache_dtype)
    pages = num_blocks(layout)
    # With CUDA graphs one extra page, owned by no request, takes the padding rows' K/V.
    kv_cache = KVCache(layout, pages + int(use_graphs), device, kv_quant.fp8_scales)
    # One request at max_model_len must fit the whole pool, or it could never finish.
    max_model_len = min(config.max_model_len or loaded.max_model_len, pages * layout.block_size)
    kv = KVCacheManager(pages, config.block_size, enable_prefix_caching)
    backend = make_backend(
        config.attention_backend, device, config.block_size, model.head_dim, layout.storage_dtype
    )
    graphs = None
    if use_graphs:
        from engine.cuda_graphs import DecodeGraphs

        graphs = DecodeGraphs(
            model,
            kv_cache,
            backend,
            device,
            max_batch=config.max_num_seqs,
            max_blocks_per_seq=cdiv(max_model_len, config.block_size),
            scratch_block=pages,
        )
    runner = ModelRunner(model, kv_cache, backend, device, graphs)
    return Worker(loaded, kv_quant, pages, max_model_len, kv, kv_cache, runner)
