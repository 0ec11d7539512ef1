"""The demo's starting policy: a tiny model taught the answer format and part of the facts.

GRPO needs a policy that sometimes earns the reward. A randomly initialised model never writes
``<answer>\\n\\boxed{8}\\n</answer>``, so the demo first runs a short supervised warm start on
worked solutions of the training problems (``<think>\\n3+5\\n</think>\\n<answer>...``, the
newlines of open-r1's format reward). It is deliberately short (300 steps of 16 examples at a
constant learning rate): the model writes the format and knows part of the 100 facts, about
45% of the held-out problems right greedily and 27% of samples at temperature 1 (seeds 0-2),
which leaves the rest to GRPO. After 250 steps the format was unsure (71-82% of samples well
formed) and GRPO spent its first 100 steps on it (docs/measurements.md). The result is saved
as an ordinary Hugging Face checkpoint next to the demo tokenizer.
"""

from __future__ import annotations

import dataclasses
import random

import torch

from megagrpo.demo.arithmetic import demo_messages, worked_solution
from megagrpo.demo.tiny_models import tiny_hf_model
from megagrpo.demo.tokenizer import save_demo_tokenizer


@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
    """The supervised warm start of the demo model (AdamW at a constant learning rate)."""

    steps: int = 300  # optimizer steps
    lr: float = 1e-3
    batch_size: int = 16  # worked solutions per step, drawn with replacement
    seed: int = 0  # model initialisation and batch order
    threads: int = 1  # torch CPU threads: the model is too small to gain from more, and on a
    # shared machine a second thread made it several times slower (docs/measurements.md)

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0 or self.threads < 1:
            raise ValueError(
                f"warm start needs steps >= 0, batch_size >= 1, lr > 0 and threads >= 1: {self}"
            )


def demo_completion(problem: dict) -> str:
    """The completion the warm start imitates (see ``arithmetic.worked_solution``)."""
    return worked_solution(problem)


def sft_examples(tok, rows: list[dict], completions: list[str]) -> list[tuple[list, list]]:
    """(input ids, labels) per row: the chat prompt masked out, the completion + EOS learned."""
    encoded = []
    for row, completion in zip(rows, completions, strict=True):
        prompt = tok.apply_chat_template(
            demo_messages(row["problem"]), tokenize=False, add_generation_prompt=True
        )
        p_ids = tok(prompt)["input_ids"]
        c_ids = tok(completion + tok.eos_token)["input_ids"]
        encoded.append((p_ids + c_ids, [-100] * len(p_ids) + c_ids))
    return encoded


def sft_step(model, opt, batch: list[tuple[list[int], list[int]]], pad_token_id: int) -> float:
    """One optimizer step of cross-entropy on ``batch`` (right-padded); returns the loss."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([x + [pad_token_id] * (width - len(x)) for x, _ in batch])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
    loss = model(input_ids=ids, labels=labels).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def warm_start(directory: str, train_rows: list[dict], config: WarmStartConfig = WarmStartConfig()):
    """SFT the demo model on worked solutions of the training problems; saves tokenizer + model
    into ``directory``."""
    if not train_rows:
        raise ValueError("warm start needs at least one training row")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        tok = save_demo_tokenizer(directory)
        model = tiny_hf_model("qwen2-demo", len(tok), seed=config.seed).train()
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
        rng = random.Random(config.seed)
        encoded = sft_examples(tok, train_rows, [demo_completion(r) for r in train_rows])
        for _ in range(config.steps):
            batch = [rng.choice(encoded) for _ in range(config.batch_size)]
            sft_step(model, opt, batch, tok.pad_token_id)
        model.eval().save_pretrained(directory)
    finally:
        torch.set_num_threads(threads)
    return model
