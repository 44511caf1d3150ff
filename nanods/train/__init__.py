"""Training: optimizers, the lr schedule, the loop, and what the user sees while it runs."""
