"""The embedded demo tokenizer: character-level, built locally, no model hub.

One token per character of printable ASCII plus newline and tab, and single tokens for the chat
and reasoning markers (``<|im_start|>``, ``<|im_end|>``, ``<think>``, ``</think>``, ``<answer>``,
``</answer>``) so a tiny model can learn the seed's ``<think>/<answer>`` format quickly. It is a
real ``PreTrainedTokenizerFast`` with a Qwen-style chat template, saved like any HF tokenizer.
"""

from __future__ import annotations

import string

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
MARKER_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _characters() -> list[str]:
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    return sorted(set(chars), key=chars.index)


def build_demo_tokenizer():
    """A fresh ``PreTrainedTokenizerFast`` (vocabulary: specials, markers, then characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + MARKER_TOKENS + _characters())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
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
