"""Training: the shared loop, objectives, optimizers, schedules and evaluation."""
