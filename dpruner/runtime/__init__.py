"""Knowledge of the runtimes a pruned model is deployed on: channel multiples they compute in (widths.py)."""
