"""Training on one engine: co-training (pre-training) and fine-tuning, their configs, data caches and
checkpoints. Imports inference and below."""
