"""Training: multi-task loss balancing, the curriculum and the training loop."""
