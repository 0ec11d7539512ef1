"""Prompt data: sources and mixtures, conversation formatting, tokenization, step sampling."""
