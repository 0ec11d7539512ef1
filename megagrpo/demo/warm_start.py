"""The demo's starting policy: a tiny model taught the answer format and some sums.

GRPO needs a policy that sometimes earns the reward. A randomly initialised model never writes
``<answer>\\n\\boxed{8}\\n</answer>``, so the demo first runs a short supervised warm start on
formatted examples of the training problems (``<think>\\n3+5\\n</think>\\n<answer>...``, the
newlines of open-r1's format reward). It is deliberately short: the model learns the format
and part of the addition table (about half of the training sums, few of the held-out ones),
which leaves the rest to GRPO. The result is saved as an ordinary Hugging Face checkpoint next to
the demo tokenizer.
"""

from __future__ import annotations

import random

import torch

from megagrpo.demo.arithmetic import DEMO_SYSTEM_PROMPT
from megagrpo.demo.tiny_models import tiny_hf_model
from megagrpo.demo.tokenizer import save_demo_tokenizer


def demo_completion(problem: dict) -> str:
    """The completion the warm start imitates, in the format open-r1's format reward checks."""
    a, b = problem["problem"].removeprefix("What is ").removesuffix("?").split(" + ")
    return f"<think>\n{a}+{b}\n</think>\n<answer>\n\\boxed{{{problem['solution']}}}\n</answer>"


def warm_start(
    directory: str,
    train_rows: list[dict],
    *,
    steps: int = 400,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
):
    """SFT the demo model on formatted examples of the training problems; saves tokenizer +
    model into ``directory``."""
    tok = save_demo_tokenizer(directory)
    model = tiny_hf_model("qwen2-demo", len(tok), seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    encoded = []
    for row in train_rows:
        prompt = tok.apply_chat_template(
            [
                {"role": "system", "content": DEMO_SYSTEM_PROMPT},
                {"role": "user", "content": row["problem"]},
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        p_ids = tok(prompt)["input_ids"]
        c_ids = tok(demo_completion(row) + tok.eos_token)["input_ids"]
        encoded.append((p_ids + c_ids, [-100] * len(p_ids) + c_ids))
    for _ in range(steps):
        batch = [rng.choice(encoded) for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(directory)
    return model
