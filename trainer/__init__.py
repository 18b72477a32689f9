"""Trainer: curated groups into a replay buffer, the TB loss, checkpoints, and new policy versions
served to the searchers by the weight-sync service."""
