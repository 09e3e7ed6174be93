"""Distillation of runtime steering into weights: trajectories, the training loop, sharding,
the closed-form warm start, and the pipeline the kl-lora / kl-full bakers run."""
