"""megagrpo: a Megatron-style GRPO trainer.

Importing ``megagrpo`` is cheap and works on a CPU machine without vLLM or Transformer Engine:
optional and heavy dependencies are imported by the modules that need them.
"""

__version__ = "0.1.0"
