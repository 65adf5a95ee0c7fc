"""Quantization: serving ModelOpt checkpoints and building them.

Serving: `checkpoint` reads a checkpoint's recipe into a `QuantConfig`; `linear` holds the
quantized projections' common loading and the factory the model builds them with; `fp8`, `int8`
and `int4` (+ `triton_int4`, the GPU kernel) store and compute each scheme; `kv_scales` reads
the KV-cache scales. Building (ModelOpt calibration and export, engine directories, reports):
`build` and the modules it uses.

Nothing is imported here: `engine.config` imports `checkpoint`, which must stay light.
"""
