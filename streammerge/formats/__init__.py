"""On-disk formats: the strict safetensors header, base checkpoints, the shard writer."""
