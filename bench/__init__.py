"""Benchmarks of the engine, outside the serving path (only `workbench bench` and scripts use them).

`offline`: the engine in this process at a fixed concurrency (+ `hf`, the transformers peer);
`speculative`: the same loop with and without speculative decoding; `online`: load on any
OpenAI-compatible server over HTTP.
"""
