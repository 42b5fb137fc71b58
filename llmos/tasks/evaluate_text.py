"""Scores for summaries (ROUGE) and translations (chrF, BLEU), with the standard implementations.

- ROUGE-1, ROUGE-2 and ROUGE-L: Google's `rouge-score` package (`RougeScorer` with its Porter
  stemmer), F1 averaged over items, x100.
- chrF (character 6-grams, beta 2) and BLEU (4-grams, `13a` tokenization; `zh`, `char` for
  Japanese, Korean and Thai): `sacrebleu`, corpus-level, per language pair and over all items.

Sets are JSON lines. Summaries: `{"id", "text", "summary", "words"?}`; translations:
`{"id", "source", "target", "text", "reference"}`. An item with a `"prediction"` is scored as it is
(outputs of any system); otherwise the model writes one. `evaluate_*` return a report dict: the
scores, the settings, and every item with its prediction, so the scores can be recomputed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llmos.errors import LlmosError
from llmos.files import json_lines

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
BLEU_TOKENIZE = {"zh": "zh", "ja": "char", "ko": "char", "th": "char"}


def shipped(task: str) -> Path:
    """The evaluation set shipped with llmos for `task` ("summarize" or "translate")."""
    return Path(str(resources.files("llmos.data").joinpath("eval", f"{task}.jsonl")))


def load_items(path: str | Path, task: str) -> list[dict[str, Any]]:
    """The items of a JSON lines set, checked for the fields `task` needs."""
    path = Path(path)
    need = ("text", "summary") if task == "summarize" else ("text", "reference", "target")
    items = []
    for n, item in json_lines(path):
        missing = [k for k in need if not isinstance(item, dict) or not isinstance(item.get(k), str)]
        if missing:
            raise LlmosError(f"{path}:{n}: a {task} item needs {', '.join(need)} (missing or not text: {', '.join(missing)})")
        item.setdefault("id", str(n))
        items.append(item)
    if not items:
        raise LlmosError(f"{path} has no items")
    return items


# --- metrics ----------------------------------------------------------------------------------------------


def _import(name: str) -> Any:
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        package = {"rouge_score": "rouge-score"}.get(name.split(".")[0], name.split(".")[0])
        raise LlmosError(f"this evaluation needs {package}, a dependency of llmos that is missing here: "
                         f"pip install {package}") from None


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100) over the pairs."""
    scorer = _import("rouge_score.rouge_scorer").RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # rouge-score takes (target, prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    n = max(len(predictions), 1)
    return {key: 100 * total / n for key, total in totals.items()}


def chrf_bleu(predictions: list[str], references: list[str], target: str | None = None) -> dict[str, float]:
    """Corpus chrF and BLEU (sacrebleu), BLEU tokenized for the target language."""
    sacrebleu = _import("sacrebleu")
    tokenize = BLEU_TOKENIZE.get(target or "", "13a")
    return {"chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
            "bleu": sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score}


# --- runs -----------------------------------------------------------------------------------------------------


def _predict(items: list[dict[str, Any]], write: Callable[[dict[str, Any]], str] | None, label: str,
             progress: bool) -> tuple[list[str], float]:
    t0 = time.perf_counter()
    predictions = []
    for item in tqdm(items, desc=label, unit="item", disable=not progress, leave=False):
        if isinstance(item.get("prediction"), str):
            predictions.append(item["prediction"])
        elif write is None:
            raise LlmosError(f"item {item['id']} has no prediction and no model was given to write one")
        else:
            predictions.append(write(item))  # a Summary keeps its check counts
    return predictions, time.perf_counter() - t0


def evaluate_summaries(llm: Any | None, items: list[dict[str, Any]], *, words: int | None = None,
                       progress: bool = False, **controls: Any) -> dict[str, Any]:
    """ROUGE of the model's summaries (or the items' predictions) against the references.

    Each item is summarized in its own `words` (else `words`, else 50) words, as a paragraph."""
    from llmos.tasks.summarize import summarize

    def write(item: dict[str, Any]) -> str:
        return summarize(llm, item["text"], words=int(item.get("words") or words or 50), progress=False, **controls)

    predictions, seconds = _predict(items, write if llm is not None else None, "summarizing", progress)
    references = [item["summary"] for item in items]
    return {
        "task": "summarize",
        "items": len(items),
        "scores": rouge(predictions, references),
        "baselines": {name: rouge(texts, references) for name, texts in extractive_baselines(items, words).items()},
        "replaced": sum(getattr(p, "replaced", 0) for p in predictions),
        "written": sum(getattr(p, "written", 0) for p in predictions),
        "seconds": seconds,
        "settings": {"words": words, "rouge": "rouge-score F1 x100, Porter stemmer", **controls},
        "outputs": [{"id": item["id"], "prediction": p, "reference": r} for item, p, r in zip(items, predictions, references)],
    }


def extractive_baselines(items: list[dict[str, Any]], words: int | None = None, embedder: Any = None) -> dict[str, list[str]]:
    """The summaries a model must beat: the first three sentences (lead-3), and the most central
    sentences up to the item's word count (centroid of the sentence embeddings)."""
    from llmos.tasks import faithful

    if embedder is None:
        from llmos.tasks.embed import Embedder

        embedder = Embedder.load()
    return {
        "lead-3": [faithful.lead(item["text"], 3) for item in items],
        "centroid": [faithful.centroid(faithful.SourceSentences.of(item["text"], embedder),
                                       int(item.get("words") or words or 50)) for item in items],
    }


def evaluate_translations(llm: Any | None, items: list[dict[str, Any]], *, beams: int = 4, progress: bool = False,
                          **controls: Any) -> dict[str, Any]:
    """chrF and BLEU of the model's translations (or the items' predictions), per pair and overall."""
    from llmos.tasks.languages import resolve
    from llmos.tasks.translate import translate

    def write(item: dict[str, Any]) -> str:
        return translate(llm, item["text"], to=item["target"], source=item.get("source"), beams=beams, **controls)

    for item in items:  # unknown languages fail before any model time is spent
        item["target"] = resolve(item["target"]).code
        if item.get("source"):
            item["source"] = resolve(item["source"]).code
    predictions, seconds = _predict(items, write if llm is not None else None, "translating", progress)
    references = [item["reference"] for item in items]
    pairs: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        pairs.setdefault(f"{item.get('source') or '?'}-{item['target']}", []).append(i)
    per_pair = {
        pair: {"items": len(idx), **chrf_bleu([predictions[i] for i in idx], [references[i] for i in idx],
                                               items[idx[0]]["target"])}
        for pair, idx in pairs.items()
    }
    targets = {item["target"] for item in items}
    return {
        "task": "translate",
        "items": len(items),
        "scores": chrf_bleu(predictions, references, targets.pop() if len(targets) == 1 else None),
        "pairs": per_pair,
        "seconds": seconds,
        "settings": {"beams": beams, "chrf": "sacrebleu corpus chrF (char 6-grams, beta 2)",
                     "bleu": "sacrebleu corpus BLEU (13a; zh: zh; ja/ko/th: char)", **controls},
        "outputs": [{"id": item["id"], "source": item.get("source"), "target": item["target"], "prediction": p,
                     "reference": r} for item, p, r in zip(items, predictions, references)],
    }


def format_table(report: dict[str, Any]) -> str:
    """The report's scores as a text table: one row per language pair for translations."""
    if report["task"] == "summarize":
        head = f"{'summaries':<12}{'items':>7}" + "".join(f"{k.upper().replace('ROUGE', 'ROUGE-'):>10}" for k in ROUGE_TYPES)
        rows = [(f"{'llmos':<12}", report["scores"])] + [(f"{name:<12}", scores) for name, scores in report.get("baselines", {}).items()]
        lines = [f"{name}{report['items']:>7}" + "".join(f"{scores[k]:>10.2f}" for k in ROUGE_TYPES) for name, scores in rows]
        if report.get("written"):
            lines.append(f"checked: {report['replaced']} sentences replaced as unsupported or repeated (model wrote {report['written']} in final summaries)")
        return "\n".join([head, "-" * len(head), *lines])
    head = f"{'pair':<12}{'items':>7}{'chrF':>10}{'BLEU':>10}"
    lines = [head, "-" * len(head)]
    for pair, s in sorted(report["pairs"].items()):
        lines.append(f"{pair:<12}{s['items']:>7}{s['chrf']:>10.2f}{s['bleu']:>10.2f}")
    s = report["scores"]
    lines.append(f"{'all':<12}{report['items']:>7}{s['chrf']:>10.2f}{s['bleu']:>10.2f}")
    return "\n".join(lines)
