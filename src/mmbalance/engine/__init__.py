"""The plain-PyTorch training loop, evaluation, and checkpoints."""
