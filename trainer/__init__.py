"""Training: manifold fitting, latent data sets, video encoding, reward LoRA fine-tuning, CLI."""
