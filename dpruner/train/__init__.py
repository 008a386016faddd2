"""Fine-tuning: the training loop, evaluation, distributed (torchrun) support, progress and resumable state."""
