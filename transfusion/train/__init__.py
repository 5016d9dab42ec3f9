"""Training: a plain ``train_loop(config)`` (runs without Ray), checkpoints, and the Ray Train
wrapper that runs the same loop on N workers."""
