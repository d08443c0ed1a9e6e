"""Vision-language models: families, base checkpoints, loss masks and evaluation metrics."""
