"""The demo tokenizer round-trips any text and loads back identically beside a Qwen2 config."""

from __future__ import annotations

import pytest

from megagrpo.demo.tokenizer import build_demo_tokenizer

TEXTS = [
    "<|im_start|>user\nWhat is 3 + 5?<|im_end|>\n",
    "<think>\n3 + 5\n</think>\n<answer>\n\\boxed{8}\n</answer><|im_end|>",
    "  tabs\tand  spaces  ",
    "unicode: é, 你好, ∑ x² ✓",
]


@pytest.mark.parametrize("with_model_config", [False, True])
def test_saved_tokenizer_loads_back_identically(tiny_checkpoint, tmp_path, with_model_config):
    import shutil

    from transformers import AutoTokenizer

    tok = build_demo_tokenizer()
    d = tmp_path / "tok"
    tok.save_pretrained(str(d))
    if with_model_config:  # transformers 5 then builds a Qwen2Tokenizer from these files
        shutil.copy(f"{tiny_checkpoint('qwen2')}/config.json", d / "config.json")
    loaded = AutoTokenizer.from_pretrained(str(d))
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids
        assert loaded.decode(ids) == text
    assert tok.convert_tokens_to_ids(["<think>", "</answer>", "<|im_end|>"]) == [3, 6, 2]
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token_id == 0
    assert len(tok) == 263


def test_markers_are_single_tokens_and_kept_when_skipping_specials():
    tok = build_demo_tokenizer()
    ids = tok("<think>\nx\n</think><|im_end|>")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<think>") and len(ids) == 6
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nx\n</think>"
