"""Training stage: the loop, optimizers, memory plan, parallelism, checkpoints, preemption, Ray Train."""
