"""The embedded rollout engine: a transformers model, a static KV cache, a tight decode loop.

``TransformersEngine`` runs on CPU (the default of the demo and the tests) or on one GPU. Per
batch of groups it prefills each prompt once, copies the prompt's cache to its ``n`` samples,
then decodes all samples together, one ``FusedDecoder.decode`` call and a handful of tensor
calls per token. Finished samples are dropped from the batch once they are a large part of it.
The sampling distribution and the seeds are those of ``protocol.py`` / ``sampling.py``.

Legend: ``b`` sample rows, ``q`` prompts (groups), ``p`` prompt positions, ``t`` new tokens,
``v`` vocabulary, ``l`` cache columns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from megagrpo.rollout.decoder import FusedDecoder
from megagrpo.rollout.protocol import RolloutRequest, Sample, SamplingParams, resolve_seeds
from megagrpo.rollout.sampling import draw, greedy, processed_logprobs, uniforms_for

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TransformersEngineConfig:
    """Settings of the embedded transformers engine."""

    model: str = ""
    """Hugging Face model directory (config, weights, tokenizer)."""
    dtype: str = "float32"
    """Weights and activations: float32, bfloat16 or float16."""
    device: str = "cpu"
    """torch device of the model (``cpu``, ``cuda``, ``cuda:1``)."""
    max_batch_size: int = 1024
    """Most sample rows decoded together; a batch is split between groups, never inside one."""
    compact_below: float = 0.5
    """Drop finished rows from the batch when fewer than this fraction of its rows still run."""
    num_threads: int | None = None
    """torch CPU threads for this process (None: leave torch's setting)."""
    eos_token_ids: tuple[int, ...] | None = None
    """Default stop tokens; None: generation_config / config / tokenizer EOS of the model."""
    trust_remote_code: bool = False
    """Allow a checkpoint's own Python code (the recipe's ``trust_remote_code``)."""

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"TransformersEngineConfig.dtype must be one of {sorted(_DTYPES)}, got "
                f"{self.dtype!r}"
            )
        if self.max_batch_size < 1:
            raise ValueError(
                f"TransformersEngineConfig.max_batch_size must be >= 1, got {self.max_batch_size}"
            )
        if not 0.0 <= self.compact_below <= 1.0:
            raise ValueError(
                "TransformersEngineConfig.compact_below must be in [0, 1], got "
                f"{self.compact_below}"
            )


def _eos_ids_of(model, model_dir: str | None) -> tuple[int, ...]:
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    if model_dir:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        if tok.eos_token_id is not None:
            return (int(tok.eos_token_id),)
    raise ValueError(
        f"{model_dir or 'model'}: no EOS token id in generation_config.json, config.json or the "
        "tokenizer; set TransformersEngineConfig.eos_token_ids"
    )


class TransformersEngine:
    """A ``RolloutEngine`` over a transformers causal LM (Qwen2 / Qwen3 / Llama-3)."""

    def __init__(self, model, config: TransformersEngineConfig | None = None, *, model_dir=None):
        self.config = config or TransformersEngineConfig()
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.model = model.eval()
        self.decoder = FusedDecoder(self.model)
        model_dir = model_dir or self.config.model or getattr(model, "name_or_path", None)
        self.eos_token_ids = self.config.eos_token_ids or _eos_ids_of(model, model_dir)
        self.vocab_size = self.model.config.vocab_size
        self.weight_version = 0
        self._params = dict(self.model.named_parameters(remove_duplicate=False))
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, config: TransformersEngineConfig) -> TransformersEngine:
        from transformers import AutoModelForCausalLM

        if not config.model:
            raise ValueError("TransformersEngineConfig.model: a model directory is required")
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        model = AutoModelForCausalLM.from_pretrained(
            config.model, dtype=_DTYPES[config.dtype], trust_remote_code=config.trust_remote_code
        )
        return cls(model.to(config.device), config, model_dir=config.model)

    # -- weights -------------------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int):
        """Copy HF-named tensors into the model in place; later samples carry ``version``.

        Names are the model's parameter names (``model.layers.0.self_attn.q_proj.weight``, ...;
        ``lm_head.weight`` of a tied model is the embedding). A subset is allowed.
        """
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"update_weights: version must be an int >= 0, got {version!r}")
        with self._lock:
            count = 0
            for name, tensor in named_tensors:
                param = self._params.get(name)
                if param is None:
                    raise KeyError(
                        f"update_weights: the model has no parameter {name!r} (it has e.g. "
                        f"{sorted(self._params)[:3]})"
                    )
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"update_weights: {name!r} has shape {tuple(param.shape)}, the update "
                        f"{tuple(tensor.shape)}"
                    )
                param.data.copy_(tensor)
                count += 1
            self.decoder.refresh()
            self.weight_version = version
        return count

    def state_dict_copy(self) -> dict[str, torch.Tensor]:
        """The model's HF-named parameters, copied (for checks and weight-sync round trips)."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self, requests: Sequence[RolloutRequest], sampling: SamplingParams
    ) -> list[list[Sample]]:
        """One group of ``sampling.n`` samples per request, in request order."""
        requests = resolve_seeds(list(requests), sampling)
        for r in requests:
            bad = [t for t in r.prompt_ids if t >= self.vocab_size]
            if bad:
                raise ValueError(
                    f"request {r.request_id!r}: token ids {bad[:5]} are outside the vocabulary "
                    f"of size {self.vocab_size}"
                )
        per_chunk = max(1, self.config.max_batch_size // sampling.n)
        groups: list[list[Sample]] = []
        with self._lock:
            for start in range(0, len(requests), per_chunk):
                groups.extend(self._generate_chunk(requests[start : start + per_chunk], sampling))
        return groups

    def _stop_ids(self, sampling: SamplingParams) -> torch.Tensor:
        ids = self.eos_token_ids if sampling.stop_token_ids is None else sampling.stop_token_ids
        return torch.tensor(sorted(set(ids)), dtype=torch.long)

    @torch.no_grad()
    def _prefill(self, requests, n: int, total_len: int):
        """Prompt caches for every sample row; returns (cache, logits_bv, lens_b, key_bias_bl)."""
        dev = self.decoder.device
        lens_q = torch.tensor([len(r.prompt_ids) for r in requests], dtype=torch.long)
        p = int(lens_q.max())
        ids_qp = torch.zeros(len(requests), p, dtype=torch.long)
        mask_qp = torch.zeros(len(requests), p, dtype=torch.long)
        for i, r in enumerate(requests):
            ids_qp[i, p - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask_qp[i, p - len(r.prompt_ids) :] = 1
        ids_qp, mask_qp = ids_qp.to(dev), mask_qp.to(dev)
        prompt_cache = self.decoder.new_cache(len(requests), p)
        logits_qv = self.decoder.prefill(ids_qp, mask_qp, prompt_cache)
        cache = self.decoder.new_cache(len(requests) * n, p + total_len)
        for dst, src in zip(cache.k + cache.v, prompt_cache.k + prompt_cache.v):
            dst[:, :, :p] = src.repeat_interleave(n, dim=0)
        key_bias_bl = torch.zeros(len(requests) * n, p + total_len, dtype=torch.float32)
        key_bias_bl[:, :p].masked_fill_((mask_qp == 0).cpu().repeat_interleave(n, 0), -torch.inf)
        key_bias_bl = key_bias_bl.to(device=dev, dtype=self.decoder.dtype)
        return cache, logits_qv.repeat_interleave(n, 0), lens_q.repeat_interleave(n), key_bias_bl, p

    @torch.no_grad()
    def _generate_chunk(self, requests, sampling: SamplingParams) -> list[list[Sample]]:
        n, steps = sampling.n, sampling.max_tokens
        dev = self.decoder.device
        cache, logits_bv, lens_b, key_bias_bl, p = self._prefill(requests, n, steps)
        rows = len(requests) * n
        stop_ids = self._stop_ids(sampling).to(dev)
        u_bt = None
        if not sampling.greedy:
            u_bt = uniforms_for([r.seed for r in requests], n, steps).to(dev)
        seen_bv = None
        if sampling.repetition_penalty != 1.0:
            seen_bv = torch.zeros(rows, logits_bv.shape[-1], dtype=torch.bool, device=dev)
            for i, r in enumerate(requests):
                seen_bv[i * n : (i + 1) * n, list(r.prompt_ids)] = True
        # Bookkeeping stays on the model's device: no host round trip per token but one sync.
        tokens_bt = torch.zeros(rows, steps, dtype=torch.long, device=dev)
        logp_bt = torch.zeros(rows, steps, dtype=torch.float32, device=dev)
        length_b = torch.full((rows,), steps, dtype=torch.long, device=dev)
        stopped_b = torch.zeros(rows, dtype=torch.bool, device=dev)
        live_b = torch.arange(rows, device=dev)  # original row of each row still in the batch
        pos_b = lens_b.to(dev)
        alive_b = torch.ones(rows, dtype=torch.bool, device=dev)
        for t in range(steps):
            logp_bv = processed_logprobs(logits_bv, sampling, seen_bv)
            tok_b = greedy(logp_bv) if u_bt is None else draw(logp_bv, u_bt[live_b, t])
            tokens_bt[live_b, t] = tok_b
            logp_bt[live_b, t] = logp_bv.gather(1, tok_b[:, None]).squeeze(1)
            ends_b = torch.isin(tok_b, stop_ids) & alive_b
            ended = live_b[ends_b]
            length_b[ended] = t + 1
            stopped_b[ended] = True
            alive_b &= ~ends_b
            n_alive = int(alive_b.sum())  # the one host sync of the step
            if n_alive == 0 or t == steps - 1:
                break
            if n_alive < self.config.compact_below * alive_b.shape[0]:
                keep = alive_b.nonzero().squeeze(1)
                cache.keep_rows(keep)
                live_b, tok_b, pos_b = live_b[keep], tok_b[keep], pos_b[keep]
                key_bias_bl = key_bias_bl[keep]
                seen_bv = None if seen_bv is None else seen_bv[keep]
                alive_b = alive_b[keep]
            if seen_bv is not None:
                seen_bv.scatter_(1, tok_b[:, None], True)
            logits_bv = self.decoder.decode(tok_b, pos_b, p + t, cache, key_bias_bl)
            pos_b = pos_b + 1
        return self._to_samples(requests, n, tokens_bt, logp_bt, length_b, stopped_b)

    def _to_samples(self, requests, n, tokens_bt, logp_bt, length_b, stopped_b):
        tokens, logps = tokens_bt.tolist(), logp_bt.tolist()
        lengths, stopped = length_b.tolist(), stopped_b.tolist()
        groups = []
        for i, r in enumerate(requests):
            group = []
            for j in range(n):
                row = i * n + j
                k = lengths[row]
                group.append(
                    Sample(
                        prompt_ids=list(r.prompt_ids),
                        completion_ids=tokens[row][:k],
                        logprobs=logps[row][:k],
                        finish_reason="stop" if stopped[row] else "length",
                        weight_version=self.weight_version,
                        request_id=r.request_id,
                        index=j,
                    )
                )
            groups.append(group)
        return groups
