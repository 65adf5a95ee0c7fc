"""Tensor parallelism over torch.distributed: one model split across `tensor_parallel_size` ranks.

    group.py     the ranks' process group (gloo on the CPU, NCCL on CUDA) and its collectives
    layers.py    the modules that communicate: row-parallel linears (one all-reduce), the
                 vocabulary-parallel embedding (one all-reduce) and the logits gather
    shard.py     a loaded model -> this rank's shard (Megatron: q/k/v and gate/up by columns,
                 o and down by rows, embedding and lm_head by vocabulary, KV heads split)
    executor.py  rank 0's side: starts the worker processes, sends them each step, watches them
    worker.py    a worker process: its shard, its share of every KV page, the step loop

The scheduler and the block manager live in rank 0 (the engine's process) only. Each step rank 0
sends the step's `SeqChunk`s to every worker (as vLLM's multiproc executor broadcasts its
scheduler output); every rank builds the same flat batch from them, so each writes its KV heads
of the same pages and joins the same collectives in the same order. Only rank 0 samples.
"""
