"""The pure core: configs, layouts and shard boxes, datasets and the sampler, the checkpoint format and
the run's record kinds. No processes, no ray, no torch.distributed; everything else builds on it."""
