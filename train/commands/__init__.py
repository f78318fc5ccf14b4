"""One module per CLI verb that needs more than a call: above the trainer, below train/cli.py."""
