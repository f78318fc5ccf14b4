"""The DeepSpeed engine: distributed setup, steps and the fast paths (runtime.py), the DeepSpeed
JSON (ds_config.py) and the pipeline stages (pipeline/). Empty on purpose, so that
train.engine.ds_config stays free of torch and deepspeed."""
