"""archscale training stack: config -> data -> objective -> batch -> engine -> loop -> checkpoint.

Subpackages: `train.objectives` (pure FLM / PLM / span corruption / UL2 transforms and the batch
layout) and `train.data` (reading, tokenizers, packing, the resumable sharded stream).
"""
