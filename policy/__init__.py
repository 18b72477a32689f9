"""The policy, shared by searchers and the trainer: loading models, LoRA, log-probs at the sampling
temperature, generation backends and weight swaps; and the tasks (prompts and rewards)."""
