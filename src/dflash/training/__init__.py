"""Training: the loop, process groups and sharding, checkpoints, metrics tracking, Ray Train workers."""
