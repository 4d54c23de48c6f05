"""Checkpoint loading: everything that knows checkpoint file layouts and tensor names lives here.

safetensors_index  lazy, validated safetensors reading (single file or sharded with an index; slices)
hub                local folder or Hugging Face repo id -> local folder (offline from the cache)
architectures      per-architecture key patterns and config keys, as a table
formats            quantization format detection -> a scheme per MoE layer
expert_loader      one layer's expert tensors -> FusedMoE through make_expert_params_mapping + weight_loader
inspect_cli        `moequant inspect`
The user-facing entry point is `moequant.checkpoint.open_checkpoint`.
"""
