"""`workbench build`: the ModelOpt build pipeline, outside the serving engine.

`build` runs the stages (load, calibrate, quantize, export, evaluate) that turn a checkpoint
into an engine directory (`engine.model.engine_dir`); `recipes` maps recipe names onto ModelOpt
configs; `calibration` and `texts` (the shipped texts in data/) feed it; `capture` keeps the
libraries' output in the log; `evaluate` and `report` measure and describe the result. It imports
the engine (to evaluate a build through it); the engine never imports it.
"""
