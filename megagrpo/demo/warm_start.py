"""The demo's starting policy: a tiny model taught the answer format, not the arithmetic.

GRPO needs a policy that sometimes earns the reward. A randomly initialised model never writes
``<answer>\\boxed{8}</answer>``, so the demo first runs a short supervised warm start on
formatted examples (``<think>\\n3+5\\n</think>\\n<answer>\\n\\boxed{8}\\n</answer>``, the
newlines of open-r1's format reward). It is deliberately short:
the model learns the format but gets few sums right, which leaves the learning to GRPO. The
result is saved as an ordinary Hugging Face checkpoint next to the demo tokenizer.
"""

from __future__ import annotations

import random

import torch

from megagrpo.demo.arithmetic import DEMO_SYSTEM_PROMPT
from megagrpo.demo.tiny_models import tiny_hf_model
from megagrpo.demo.tokenizer import save_demo_tokenizer


def demo_completion(problem: dict, tagged: bool = True) -> str:
    """The completion the warm start imitates: tagged (``<think>/<answer>``) or a bare answer."""
    a, b = problem["problem"].removeprefix("What is ").removesuffix("?").split(" + ")
    boxed = f"\\boxed{{{problem['solution']}}}"
    if not tagged:
        return f"{a}+{b} = {boxed}"
    return f"<think>\n{a}+{b}\n</think>\n<answer>\n{boxed}\n</answer>"


def warm_start(
    directory: str,
    train_rows: list[dict],
    *,
    steps: int = 150,
    lr: float = 3e-3,
    batch_size: int = 16,
    tagged_fraction: float = 0.5,
    seed: int = 0,
):
    """SFT the demo model on a mix of tagged and bare answers (``tagged_fraction`` tagged);
    saves tokenizer + model into ``directory``."""
    tok = save_demo_tokenizer(directory)
    model = tiny_hf_model("qwen2-demo", len(tok), seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    encoded = {True: [], False: []}
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
        for tagged in (True, False):
            c_ids = tok(demo_completion(row, tagged) + tok.eos_token)["input_ids"]
            encoded[tagged].append((p_ids + c_ids, [-100] * len(p_ids) + c_ids))
    for _ in range(steps):
        batch = [rng.choice(encoded[rng.random() < tagged_fraction]) for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(directory)
    return model
