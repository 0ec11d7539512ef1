"""Forward + backward of a GPTModel (megatron's local spec) on one micro-batch: right-padded
against packed, with each CPU attention path for packed sequences.

    python tools/bench_packed_attention.py --model outputs/demo/model --sequences 16

Random tokens: a prompt of 14-21 tokens (the demo's are 28-46 with its chat template) and a
completion of 17-32 (the demo's range). Paths:

- ``padded``: ``[b, L]`` with a causal mask (what padded micro-batches run);
- ``packed_padgather``: ``models/sdpa_attention.py``'s packed path (the tokens scattered into a
  right-padded [sequences, max_seqlen] batch for one causal SDPA call, then gathered back);
- ``packed_blockmask``: one SDPA call over all ``t`` tokens with a block-diagonal causal mask;
- ``packed_loop``: one causal SDPA call per sequence.

Reports the min and median over interleaved rounds (the machine may be shared: note the load).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _block_mask(self, q, k, v, params):
    import torch
    import torch.nn.functional as F

    cu = params.cu_seqlens_q.long()
    t, h, d = q.shape
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])
    mask = (seg[:, None] == seg[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    qs, ks, vs = (x.transpose(0, 1)[None] for x in (q, k, v))
    o = F.scaled_dot_product_attention(
        qs, ks, vs, attn_mask=mask, scale=self.softmax_scale, enable_gqa=k.shape[1] != h
    )
    return o[0].transpose(0, 1).reshape(t, h * d)


def _loop(self, q, k, v, params):
    import torch
    import torch.nn.functional as F

    cu = params.cu_seqlens_q.tolist()
    t, h, d = q.shape
    outs = []
    for s, e in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))
        o = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=self.softmax_scale, enable_gqa=k.shape[1] != h
        )
        outs.append(o[0].transpose(0, 1).reshape(e - s, h * d))
    return torch.cat(outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an HF checkpoint directory")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import torch

    from megagrpo.config import MegatronConfig
    from megagrpo.conversion.hf_weights import load_hf_weights
    from megagrpo.conversion.safetensors_io import SafetensorsDir
    from megagrpo.distributed import free_port, init_distributed
    from megagrpo.models import sdpa_attention
    from megagrpo.models.arch import load_arch
    from megagrpo.models.builder import build_model
    from megagrpo.training.batch import CompletionBatch, make_micro_batches
    from megagrpo.training.packing import packed_micro_batch

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    par = MegatronConfig()
    groups = init_distributed(par, seed=11)
    arch = load_arch(args.model)
    (model,) = build_model(arch, par, pg_collection=groups.pg_collection)
    load_hf_weights([model], SafetensorsDir(args.model), arch, groups)

    g = torch.Generator().manual_seed(0)
    b = args.sequences

    def tokens(n):
        return torch.randint(5, arch.vocab_size, (n,), generator=g).tolist()

    batch = CompletionBatch(
        prompt_ids=[tokens(int(torch.randint(14, 22, (1,), generator=g))) for _ in range(b)],
        completion_ids=[tokens(int(torch.randint(17, 33, (1,), generator=g))) for _ in range(b)],
        finish_reasons=["stop"] * b,
        advantages_n=torch.zeros(b),
    )
    (padded,) = make_micro_batches(batch, b, pad_token_id=0)
    packed = packed_micro_batch(batch, list(range(b)), pad_token_id=0).packed

    def run_padded():
        out = model(padded.input_ids_bl, None, attention_mask=None)
        out[..., : arch.vocab_size].logsumexp(-1).sum().backward()

    def run_packed():
        out = model(
            packed.input_ids_1t, None, attention_mask=None, packed_seq_params=packed.params()
        )
        out[..., : arch.vocab_size].logsumexp(-1).sum().backward()

    paths = {
        "padded": (None, run_padded),
        "packed_padgather": (sdpa_attention.SDPAttention._packed, run_packed),
        "packed_blockmask": (_block_mask, run_packed),
        "packed_loop": (_loop, run_packed),
    }
    print(
        f"{b} sequences: {padded.input_ids_bl.numel()} padded tokens, "
        f"{packed.input_ids_1t.numel()} packed; load {os.getloadavg()[0]:.2f}"
    )
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, (attention, run) in paths.items():
            if attention is not None:
                sdpa_attention.SDPAttention._packed = attention
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            for _ in range(3):
                run()
            times[name].append((time.perf_counter() - start) / 3)
    for name, ts in times.items():
        ts.sort()
        print(f"{name:18s} min {ts[0] * 1e3:7.1f} ms   median {ts[len(ts) // 2] * 1e3:7.1f} ms")
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
