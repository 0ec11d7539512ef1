"""Monitoring: metrics to stdout, JSONL and wandb; completion tables."""
