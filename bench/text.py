"""Summarization and translation speed on the default model, and translation quality by beam width.

- Summarize a ~20k-token Markdown document (Python's own pydoc topics, shipped with the standard
  library): total seconds, chunks per level, prompt tokens read, tokens generated, and generation
  speed (decode tokens/s, timed from each call's first generated token to its last).
- Translate the 50 sentences of the shipped translation set (en->fr/de/es, fr/de->en) with
  beams 1 and 4: seconds, sentences/s, output tokens/s (of the chosen beam, end to end), and
  chrF/BLEU against the references.

`python -m bench.text` prints a table and writes bench/results/text-DATE.json; `run()` returns the dict.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def pydoc_document(llm: Any, tokens: int) -> str:
    """Python's pydoc topics as one Markdown document of about `tokens` tokens."""
    from pydoc_data.topics import topics

    parts: list[str] = []
    total = 0
    for name in sorted(topics):
        part = f"## {name}\n\n{topics[name].strip()}"
        n = len(llm.encode(part, add_special_tokens=False))
        if total + n > tokens:
            continue  # a smaller topic may still fit
        parts.append(part)
        total += n
    return "# Python language reference topics\n\n" + "\n\n".join(parts)


@contextlib.contextmanager
def timed_runs(llm: Any) -> Iterator[list[dict[str, float]]]:
    """Within the block llm.start (under chat, summarize and translate alike) makes the same
    generations, recording each one's prompt and generated tokens and its prefill and decode times
    into the list it yields."""
    real, calls = llm.start, []
    llm.start = lambda ids, controls, **kwargs: _TimedRun(real(ids, controls, **kwargs), calls)
    try:
        yield calls
    finally:
        del llm.start


class _TimedRun:
    def __init__(self, run: Any, calls: list[dict[str, float]]) -> None:
        self.run, self.calls = run, calls

    def __getattr__(self, name: str) -> Any:  # choices, budget, ... of the real run
        return getattr(self.run, name)

    def __iter__(self):
        t0 = time.perf_counter()
        first = None
        for delta in self.run:
            if first is None:
                first = time.perf_counter()
            yield delta
        end = time.perf_counter()
        first = first or end
        from llmos.generation import Completion

        out = Completion(self.run.choices, len(self.run.budget.ids), self.run.budget.truncated)
        self.calls.append({"prompt": out.prompt_tokens, "tokens": out.completion_tokens,
                           "prefill_s": first - t0, "decode_s": end - first})


def bench_summarize(llm: Any, tokens: int) -> dict[str, Any]:
    from llmos.tasks.summarize import summarize

    doc = pydoc_document(llm, tokens)
    with timed_runs(llm) as calls:
        t0 = time.perf_counter()
        summary = summarize(llm, doc, words=150, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - t0
    decode_tokens = sum(max(c["tokens"] - 1, 0) for c in calls)  # the first token is timed with the prefill
    decode_s = sum(c["decode_s"] for c in calls)
    prefill_tokens = sum(c["prompt"] for c in calls)
    prefill_s = sum(c["prefill_s"] for c in calls)
    return {
        "input_tokens": summary.input_tokens, "levels": list(summary.levels), "calls": summary.calls,
        "seconds": seconds, "prompt_tokens": prefill_tokens, "generated_tokens": summary.generated_tokens,
        "generation_tps": decode_tokens / decode_s if decode_s else None,
        "prefill_tps": prefill_tokens / prefill_s if prefill_s else None,
        "summary_words": len(summary.split()), "summary": str(summary),
    }


def bench_translate(llm: Any, beams: int) -> dict[str, Any]:
    from llmos.tasks import evaluate_text as ev

    items = ev.load_items(ev.shipped("translate"), "translate")[:50]
    with timed_runs(llm) as calls:
        t0 = time.perf_counter()
        report = ev.evaluate_translations(llm, items, beams=beams, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - t0
    generated = sum(c["tokens"] for c in calls)  # of the best beam
    return {"sentences": len(items), "beams": beams, "seconds": seconds, "sentences_per_s": len(items) / seconds,
            "prompts": len(calls), "generated_tokens": generated, "output_tokens_per_s": generated / seconds,
            "chrf": report["scores"]["chrf"], "bleu": report["scores"]["bleu"], "pairs": report["pairs"],
            "outputs": report["outputs"]}


def run(tokens: int = 20_000, beams: tuple[int, ...] = (1, 4), threads: int | None = None,
        parts: tuple[str, ...] = ("summarize", "translate")) -> dict[str, Any]:
    import llmos
    from llmos import store

    if threads:
        torch.set_num_threads(threads)
    llm = llmos.load(store.pull(store.DEFAULT_CHAT_MODEL, quiet=True))
    results: dict[str, Any] = {
        "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "model": llm.path.name, "dtype": llm.dtype,
    }
    if "summarize" in parts:
        results["summarize"] = bench_summarize(llm, tokens)
    if "translate" in parts:
        results["translate"] = [bench_translate(llm, b) for b in beams]
    return results


def table(results: dict[str, Any]) -> str:
    lines = [f"{results['model']}, {results['dtype']}, {results['threads']} threads", ""]
    if "summarize" in results:
        s = results["summarize"]
        lines += [
            f"summarize {s['input_tokens']} tokens",
            f"  chunks per level      {s['levels']}  ({s['calls']} calls)",
            f"  total                 {s['seconds']:.1f} s",
            f"  prompt tokens read    {s['prompt_tokens']}  ({s['prefill_tps']:.0f} tok/s prefill)",
            f"  tokens generated      {s['generated_tokens']}  ({s['generation_tps']:.1f} tok/s decode)",
            "",
        ]
    if "translate" not in results:
        return "\n".join(lines)
    lines += [
        f"{'translate 50 sentences':<24}{'seconds':>9}{'sent/s':>9}{'out tok/s':>11}{'chrF':>8}{'BLEU':>8}",
    ]
    for t in results["translate"]:
        lines.append(f"{'beams ' + str(t['beams']):<24}{t['seconds']:>9.1f}{t['sentences_per_s']:>9.2f}"
                     f"{t['output_tokens_per_s']:>11.1f}{t['chrf']:>8.2f}{t['bleu']:>8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000, help="document length to summarize")
    parser.add_argument("--beams", default="1,4", help="beam widths to translate with")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--parts", default="summarize,translate", help="what to measure")
    args = parser.parse_args()
    results = run(args.tokens, tuple(int(b) for b in args.beams.split(",")), args.threads,
                  tuple(p.strip() for p in args.parts.split(",")))
    print(table(results))
    RESULTS.mkdir(exist_ok=True)
    partial = "" if {"summarize", "translate"} <= results.keys() else "-" + "-".join(sorted(
        k for k in ("summarize", "translate") if k in results))
    out = RESULTS / f"text{partial}-{results['date']}.json"
    out.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
