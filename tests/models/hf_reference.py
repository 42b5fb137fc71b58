"""Set-up shared by the parity tests (test_hf_parity, test_families_parity, test_gemma3_parity and
test_families_formats): a transformers model on a tiny random config with its weights moved off their
init, saved with `save_pretrained` and loaded from that folder through llmos' production loader; and
the greedy tokens transformers generates, to compare with llmos' own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

from llmos.weights.load import load_hf, read_hf_config


def reference(config: transformers.PretrainedConfig, noisy: Sequence[str] = ("norm",), noise: float = 0.1,
              matrices: float = 1.0) -> transformers.PreTrainedModel:
    """The reference model (eager attention, eval mode, seed 0). Parameters whose names contain one of
    `noisy` get Gaussian noise of `noise` (norms and biases start at 1 or 0: a norm read the wrong way,
    a dropped bias or a missed "+1" would otherwise pass unnoticed); other matrices are scaled by
    `matrices` (larger weights make attention scores and logits reach the soft-caps)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in noisy):
                p.add_(torch.randn_like(p) * noise)
            elif p.dim() == 2 and matrices != 1.0:
                p.mul_(matrices)
    return model


def saved_and_loaded(ref: transformers.PreTrainedModel, folder: Path):
    """(llmos model, its ModelConfig) of `ref` saved into `folder` and read back as a user's folder is."""
    ref.save_pretrained(folder)
    config = read_hf_config(folder)
    return load_hf(folder, config), config


def hf_greedy(ref: transformers.PreTrainedModel, prompt: list[int], n: int) -> list[int]:
    """transformers' n greedy tokens after `prompt` (no stop token, so always n)."""
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def llmos_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """llmos' n greedy tokens after `prompt`, through the engine's generation loop."""
    from llmos.engine.generate import Generation
    from llmos.engine.sampling import SamplingParams

    return list(Generation(model, prompt, max_new_tokens=n, params=SamplingParams(temperature=0.0)).tokens())


def cached_vs_full(model: torch.nn.Module, config, length: int, prompt: int = 10) -> float:
    """Largest logit difference between decoding `length` random tokens through the KV cache (a
    `prompt`-token prefill, then one token a step) and one full forward over the same tokens."""
    from llmos.models.kv_cache import KVCache

    torch.manual_seed(2)
    tokens = torch.randint(0, 256, (1, length))
    with torch.no_grad():
        full = model(tokens, torch.arange(length))
        cache = KVCache.for_model(config, 1, length)
        steps = [model(tokens[:, :prompt], torch.arange(prompt), cache)]
        steps += [model(tokens[:, i:i + 1], torch.tensor([i]), cache) for i in range(prompt, length)]
    return (torch.cat(steps, dim=1) - full).abs().max().item()
