"""What ``megagrpo demo`` runs until the GRPO trainer exists: the foundation, end to end.

1. Build the demo tokenizer and a tiny Qwen2-architecture checkpoint locally (no model hub).
2. Convert it to megatron-core shards (TP x PP as asked) and back; check every tensor is
   bit-identical and the config and tokenizer files came back.
3. Build the megatron-core GPTModel from the HF config, load the HF weights, and compare its
   logits with transformers' on a chat-formatted prompt.
4. Take AdamW steps on the megatron model (next-token loss on that prompt) and show the loss
   falling.
"""

from __future__ import annotations

import os
import time

import torch

from megagrpo.config import MegatronConfig
from megagrpo.conversion.convert import hf_to_megatron, megatron_to_hf
from megagrpo.conversion.safetensors_io import SafetensorsDir
from megagrpo.demo.tiny_models import save_tiny_checkpoint
from megagrpo.distributed import destroy_distributed, init_distributed
from megagrpo.models.arch import load_arch
from megagrpo.models.builder import build_model
from megagrpo.models.hf_weights import load_hf_weights

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively."
)


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_foundation_demo(output_dir: str, *, steps: int = 5, seed: int = 0) -> dict:
    """Run the four stages above; returns the measured numbers."""
    t0 = time.time()
    hf_dir, meg_dir, back_dir = (os.path.join(output_dir, d) for d in ("hf", "megatron", "hf-back"))
    hf_model = save_tiny_checkpoint("qwen2", hf_dir, seed=seed)
    _say(f"[1/4] tiny Qwen2 checkpoint and demo tokenizer -> {hf_dir}")

    hf_to_megatron(hf_dir, meg_dir, tp=2, pp=2)
    megatron_to_hf(meg_dir, back_dir)
    a, b = SafetensorsDir(hf_dir), SafetensorsDir(back_dir)
    identical = sorted(a.names()) == sorted(b.names()) and all(
        torch.equal(a.get(n), b.get(n)) for n in a.names()
    )
    _say(
        f"[2/4] HF -> megatron (TP=2 x PP=2) -> HF: {len(a.names())} tensors, "
        f"bit-identical={identical}"
    )

    groups = init_distributed(MegatronConfig(), seed=seed)
    try:
        arch = load_arch(hf_dir)
        (model,) = build_model(arch, MegatronConfig(), pg_collection=groups.pg_collection)
        load_hf_weights([model], a, arch, groups)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hf_dir)
        text = (
            tok.apply_chat_template(
                [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": "What is 12 + 30?"},
                ],
                tokenize=False,
                add_generation_prompt=True,
            )
            + "<think> 12 + 30 = 42 </think><answer>42</answer><|im_end|>"
        )
        ids = torch.tensor([tok(text)["input_ids"]])
        model.eval()
        with torch.no_grad():
            diff = (
                (
                    model(ids, None, attention_mask=None)[..., : arch.vocab_size]
                    - hf_model(ids).logits
                )
                .abs()
                .max()
                .item()
            )
        _say(
            f"[3/4] megatron-core vs transformers logits on {ids.shape[1]} tokens: "
            f"max |diff| = {diff:.2e}"
        )

        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        inputs, labels = ids[:, :-1], ids[:, 1:]
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = model(inputs, None, attention_mask=None, labels=labels).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        _say(
            f"[4/4] {steps} AdamW steps on the megatron model: loss "
            + " -> ".join(f"{x:.3f}" for x in losses)
        )
    finally:
        destroy_distributed()
    _say(f"done in {time.time() - t0:.1f}s")
    return {"bit_identical": identical, "logits_max_diff": diff, "losses": losses}
