"""The embedded demo tokenizer: byte-level, built locally, no model hub.

A byte-level BPE tokenizer (the scheme of GPT-2 and Qwen) with no merges: one token per byte,
so any text encodes and decodes exactly, plus single tokens for the chat markers
(``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``) and the reasoning tags (``<think>``,
``</think>``, ``<answer>``, ``</answer>``), so a tiny model learns open-r1's ``<think>/<answer>``
format quickly. It is saved like any HF tokenizer and loads back identically through
``AutoTokenizer`` also next to a Qwen2 ``config.json`` (transformers 5 then builds a
``Qwen2Tokenizer``, whose own byte-level pre-tokenizer this scheme matches).
"""

from __future__ import annotations

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKER_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
VOCAB_SIZE = len(SPECIAL_TOKENS) + len(MARKER_TOKENS) + 256
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_demo_tokenizer():
    """A fresh ``PreTrainedTokenizerFast``: specials, tags, then the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + MARKER_TOKENS + byte_symbols)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.add_tokens(MARKER_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_demo_tokenizer(directory: str):
    """Build the demo tokenizer and save it (tokenizer.json and friends) into ``directory``."""
    tok = build_demo_tokenizer()
    tok.save_pretrained(directory)
    return tok
