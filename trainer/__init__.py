"""Trainer: the replay buffer over the curated topic (and, later, the TB loss and weight sync)."""
