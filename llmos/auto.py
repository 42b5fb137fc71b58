"""transformers-style entry points over llmos, so existing scripts run with one import changed:

    from llmos import AutoTokenizer, AutoModelForCausalLM
    tokenizer = AutoTokenizer.from_pretrained("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained("smollm2-135m-instruct")
    input_ids = tokenizer.encode("LLMOS is a", return_tensors="pt")
    output = model.generate(input_ids, max_length=50, num_return_sequences=1)
    print(tokenizer.decode(output[0], skip_special_tokens=True))

Only the commonly used surface is provided, with transformers' meaning: greedy unless `do_sample`,
`max_length` counts the prompt, output rows hold prompt + generated ids, padded after EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmos.api import LLM, load_tokenizer
from llmos.engine.beam import beam_search
from llmos.engine.generate import Generation
from llmos.engine.sampling import SamplingParams
from llmos.errors import LlmosError
from llmos.tokenizer import IncrementalDecoder, Tokenizer


def _ids_list(ids: Any) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise LlmosError(f"expected one sequence of ids, got a tensor of shape {tuple(ids.shape)}")
        return [int(i) for i in ids.tolist()]
    return [int(i) for i in ids]


class PreTrainedTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_id

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None) -> Any:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        if return_tensors is None:
            return ids
        if return_tensors != "pt":
            raise LlmosError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        return torch.tensor([ids], dtype=torch.long)

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = True) -> dict[str, Any]:
        ids = self.encode(text, add_special_tokens=add_special_tokens, return_tensors=return_tensors)
        mask = torch.ones_like(ids) if isinstance(ids, torch.Tensor) else [1] * len(ids)
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(_ids_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows: Any, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = True,
                            add_generation_prompt: bool = False, return_tensors: str | None = None) -> Any:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        if not tokenize:
            return text
        return self.encode(text, add_special_tokens=False, return_tensors=return_tensors)


class AutoTokenizer:
    @staticmethod
    def from_pretrained(name_or_path: str | Path, **_: Any) -> PreTrainedTokenizer:
        return PreTrainedTokenizer(load_tokenizer(name_or_path))


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, V)


class CausalLM:
    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.config = llm.config

    def __call__(self, input_ids: torch.Tensor, **_: Any) -> CausalLMOutput:
        with torch.inference_mode():
            positions = torch.arange(input_ids.shape[1])
            return CausalLMOutput(self.llm.model(input_ids, positions).float())

    def generate(
        self,
        input_ids: torch.Tensor,
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        num_return_sequences: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        attention_mask: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        streamer: Any = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Rows of prompt + generated ids (B * num_return_sequences, L), padded after EOS.

        Greedy unless `do_sample`; beam search with `num_beams > 1` (best beam first per prompt, as
        transformers orders them). `streamer` gets transformers' calls: `put(prompt ids)`, `put`
        of each new id, `end()`; like transformers, it takes one prompt and no beams."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if max_new_tokens is None:
            max_new_tokens = (max_length if max_length is not None else 20) - input_ids.shape[1]
        if max_new_tokens < 0:
            raise LlmosError(f"max_length ({max_length}) is shorter than the prompt ({input_ids.shape[1]} tokens)")
        if num_beams > 1 and do_sample:
            raise LlmosError("beam sampling (num_beams > 1 with do_sample=True) is not supported: use one or the other")
        if num_beams == 1 and not do_sample and num_return_sequences > 1:
            raise LlmosError("num_return_sequences > 1 needs do_sample=True or num_beams >= num_return_sequences "
                             "(greedy decoding gives one sequence)")
        if streamer is not None and (num_beams > 1 or input_ids.shape[0] > 1):
            raise LlmosError("streamer= takes one prompt and no beam search, as in transformers")
        params = SamplingParams(
            temperature=temperature if do_sample else 0.0, top_k=top_k if do_sample else 0,
            top_p=top_p if do_sample else 1.0, min_p=min_p if do_sample else 0.0,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        )
        tok = self.llm.tokenizer
        stops = tok.stop_ids if eos_token_id is None else frozenset(
            [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (tok.pad_id if tok.pad_id is not None else tok.eos_id or 0)
        rows: list[list[int]] = []
        for b in range(input_ids.shape[0]):
            prompt = input_ids[b].tolist()
            if attention_mask is not None:  # left padding: keep only the attended ids
                prompt = [t for t, m in zip(prompt, attention_mask[b].tolist()) if m]
            if num_beams > 1:
                beams = beam_search(self.llm.model, prompt, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                    length_penalty=length_penalty, early_stopping=early_stopping, stop_ids=stops,
                                    num_return_sequences=num_return_sequences, params=params,
                                    min_new_tokens=min_new_tokens, kv_dtype=self.llm.kv_dtype)
                # transformers keeps the EOS id in the output, then pads.
                rows += [prompt + beam.tokens + ([beam.stop_id] if beam.stop_id is not None else []) for beam in beams]
                continue
            gen = Generation(self.llm.model, prompt, max_new_tokens=max_new_tokens, params=params, stop_ids=stops,
                             min_new_tokens=min_new_tokens, n=num_return_sequences, seed=seed, kv_dtype=self.llm.kv_dtype)
            rows += _sampled_rows(gen, prompt, num_return_sequences, streamer)
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


def _sampled_rows(gen: Generation, prompt: list[int], n: int, streamer: Any) -> list[list[int]]:
    """The n rows of one prompt, prompt + generated ids + the stop id each ended on; a streamer
    sees the prompt, each new id (the stop id too) and the end, as transformers calls it."""
    if streamer is not None:
        streamer.put(torch.tensor([prompt]))
    outs: list[list[int]] = [[] for _ in range(n)]
    for step in gen:
        for r, t in enumerate(step):
            if t is not None:
                outs[r].append(t)
                if streamer is not None:
                    streamer.put(torch.tensor([t]))
    rows = []
    for r in range(n):
        eos = [gen.stop_tokens[r]] if gen.stop_tokens[r] is not None else []
        if streamer is not None and eos:
            streamer.put(torch.tensor(eos))
        rows.append(prompt + outs[r] + eos)
    if streamer is not None:
        streamer.end()
    return rows


class TextStreamer:
    """transformers' TextStreamer: prints the text of `generate(..., streamer=...)` to stdout as it is
    produced, whole characters only; `skip_prompt=True` prints only the new text. Subclasses
    override `on_finalized_text(text, stream_end)` to send the text elsewhere."""

    def __init__(self, tokenizer: PreTrainedTokenizer | Tokenizer, skip_prompt: bool = False, **decode_kwargs: Any) -> None:
        self.tokenizer = tokenizer.tokenizer if isinstance(tokenizer, PreTrainedTokenizer) else tokenizer
        self.skip_prompt, self.skip_special_tokens = skip_prompt, bool(decode_kwargs.get("skip_special_tokens", False))
        self._decoder: IncrementalDecoder | None = None
        self._prompt_next = True

    def put(self, value: torch.Tensor) -> None:
        ids = [int(i) for i in value.reshape(-1).tolist()]
        prompt, self._prompt_next = self._prompt_next, False
        if self._decoder is None:
            self._decoder = IncrementalDecoder(self.tokenizer, self.skip_special_tokens)
        text = "".join(self._decoder.push(i) for i in ids)
        if text and not (prompt and self.skip_prompt):
            self.on_finalized_text(text)

    def end(self) -> None:
        text = self._decoder.flush() if self._decoder is not None else ""
        self._decoder, self._prompt_next = None, True
        self.on_finalized_text(text, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else None)


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(name_or_path: str | Path, dtype: Any = None, torch_dtype: Any = None, **_: Any) -> CausalLM:
        chosen = dtype if dtype is not None else torch_dtype
        name = {None: "auto", torch.float32: "fp32", torch.bfloat16: "bf16"}.get(chosen, chosen)
        return CausalLM(LLM.load(name_or_path, dtype=name))
