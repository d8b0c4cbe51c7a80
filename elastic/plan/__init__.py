"""Planning, pure: the reshard planner and its geometry, the rounds a reshard runs, the cost model and the
policy that picks a placement. No processes, no ray, no torch.distributed; tested at cluster scale."""
