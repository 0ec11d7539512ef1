"""The realistic benchmark workload's assets: a Qwen2.5-sized vocabulary, spread lengths.

``tools/bench_e2e.py --workload realistic`` trains on the demo's addition prompts, tokenizer and
reward functions, but with a model whose costs look like a small Qwen2.5's: the embedding and
output layer span Qwen2.5's 151,936 rows (the demo tokenizer uses the first 263; the rest stand
for the vocabulary a real tokenizer would fill), hidden size 256 with head size 64, and a warm
start on targets of variable length (``demo/variable_reasoning.py``), so sampled completions
spread from under 16 tokens to the 256-token cap.

The warm start runs in two phases:

1. ``steps`` steps at the tokenizer's own 263 rows (cheap: the output layer is small), on batches
   of similar lengths (sorted, then a random window), so little of each batch is padding;
2. the embedding resized to 151,936 rows (transformers' ``resize_token_embeddings``, new rows
   drawn around the old rows' mean), then ``pad_steps`` steps of the same cross-entropy over the
   full vocabulary that train only the new rows: it pushes their logits down (AdamW moves every
   row by about the learning rate per step however small its gradient), so sampling stays
   within the tokenizer. The trained model is untouched (its 263 rows keep their values).
   ``pad_probability`` measures what is left: the largest probability mass on rows >= 263 at any
   completion position of 8 freshly drawn targets; it is recorded in ``assets.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

import torch

VOCAB_SIZE = 151_936  # Qwen2.5's embedding rows
MODEL_CONFIG = dict(
    model_type="qwen2",
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
ASSETS_FILE = "assets.json"


@dataclasses.dataclass(frozen=True)
class RealisticWarmStart:
    """The two-phase supervised warm start of the realistic workload's model (AdamW, constant
    learning rate)."""

    steps: int = 200  # phase 1 optimizer steps, at the tokenizer's own vocabulary
    batch_size: int = 16
    pad_steps: int = 20  # phase 2 optimizer steps, at the padded vocabulary, new rows only
    pad_batch_size: int = 4
    pad_lr: float = 0.1  # phase 2's learning rate (only the new rows move)
    lr: float = 1e-3
    variants: int = 4  # targets per training problem, each with its own drawn length
    vocab_size: int = VOCAB_SIZE
    seed: int = 0  # model initialisation, target lengths and batch order
    threads: int = 2  # torch CPU threads

    def __post_init__(self):
        if min(self.steps, self.pad_steps) < 0 or min(self.batch_size, self.pad_batch_size) < 1:
            raise ValueError(f"warm start needs steps >= 0 and batch sizes >= 1: {self}")
        if not self.lr > 0 or self.variants < 1 or self.threads < 1:
            raise ValueError(f"warm start needs lr > 0, variants >= 1, threads >= 1: {self}")


def _window(rng: random.Random, by_length: list, size: int) -> list:
    """``size`` neighbours in length order from a random start: batches of similar lengths."""
    start = rng.randrange(max(1, len(by_length) - size + 1))
    return by_length[start : start + size]


def pad_probability(model, examples: list[tuple[list[int], list[int]]], real_vocab: int) -> float:
    """The largest softmax mass on rows >= ``real_vocab`` over the labelled positions."""
    worst = 0.0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            keep = torch.tensor(labels[1:]) != -100
            probs = logits[keep].float().softmax(-1)
            worst = max(worst, probs[:, real_vocab:].sum(-1).max().item())
    return worst


def _train_new_rows(model, by_length, rng, config: RealisticWarmStart, real_vocab: int, pad_id):
    """Phase 2: the cross-entropy over the full vocabulary, only the rows >= ``real_vocab``
    trained (the model's hidden states computed without gradient, the real rows' gradient
    zeroed: AdamW then leaves them exactly as they were)."""
    weight = model.get_output_embeddings().weight
    weight.register_hook(lambda g: torch.cat([torch.zeros_like(g[:real_vocab]), g[real_vocab:]]))
    opt = torch.optim.AdamW([weight], lr=config.pad_lr, weight_decay=0.0)
    for _ in range(config.pad_steps):
        batch = _window(rng, by_length, config.pad_batch_size)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [pad_id] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        logits = torch.nn.functional.linear(hidden, weight)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def warm_start_realistic(
    directory: str, train_rows: list[dict], config: RealisticWarmStart, lengths
) -> dict:
    """SFT the realistic model on variable-length targets of ``train_rows``; saves tokenizer +
    model into ``directory``; returns what ``pad_probability`` measured."""
    from megagrpo.demo.tiny_models import hf_model_from_config
    from megagrpo.demo.tokenizer import save_demo_tokenizer
    from megagrpo.demo.variable_reasoning import reasoning_targets
    from megagrpo.demo.warm_start import sft_examples, sft_step

    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        rng = random.Random(config.seed)
        tok = save_demo_tokenizer(directory)
        rows, targets = reasoning_targets(train_rows, lengths, rng, config.variants)
        by_length = sorted(sft_examples(tok, rows, targets), key=lambda e: len(e[0]))
        held_rows, held_targets = reasoning_targets(train_rows[:8], lengths, rng)
        held = sft_examples(tok, held_rows, held_targets)
        model = hf_model_from_config(MODEL_CONFIG, len(tok), seed=config.seed).train()
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
        for _ in range(config.steps):
            sft_step(model, opt, _window(rng, by_length, config.batch_size), tok.pad_token_id)
        model.resize_token_embeddings(config.vocab_size)
        before = pad_probability(model.eval(), held, len(tok))
        _train_new_rows(model, by_length, rng, config, len(tok), tok.pad_token_id)
        after = pad_probability(model.eval(), held, len(tok))
        model.save_pretrained(directory)
    finally:
        torch.set_num_threads(threads)
    return {"pad_probability_before": before, "pad_probability": after}


def prepare_realistic(
    output_dir: str, seed: int = 0, config: RealisticWarmStart | None = None, lengths=None
) -> tuple[str, str]:
    """The demo's addition data and the realistic warm-started model under ``output_dir``;
    returns (data_dir, model_dir). The model is reused when ``assets.json`` records the same
    settings."""
    from megagrpo.demo.arithmetic import TEMPLATES, write_addition_dataset
    from megagrpo.demo.variable_reasoning import ReasoningLengths

    config = config or RealisticWarmStart(seed=seed)
    lengths = lengths or ReasoningLengths()
    data_dir = os.path.join(output_dir, "data")
    paths = write_addition_dataset(data_dir, seed=seed)
    model_dir = os.path.join(output_dir, "model")
    settings = {
        "templates": list(TEMPLATES),
        "seed": seed,
        "model": MODEL_CONFIG,
        "warm_start": dataclasses.asdict(config),
        "lengths": dataclasses.asdict(lengths),
    }
    marker = os.path.join(model_dir, ASSETS_FILE)
    if os.path.isfile(os.path.join(model_dir, "model.safetensors")) and os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f).get("settings") == settings:
                return data_dir, model_dir
    with open(paths["train"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    measured = warm_start_realistic(model_dir, rows, config, lengths)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({"settings": settings, **measured}, f)
    return data_dir, model_dir
