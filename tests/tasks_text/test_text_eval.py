"""`llmos eval summarize|translate`: the scores are the metric libraries' own on the same outputs."""

from __future__ import annotations

import json

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from llmos.cli.main import main
from llmos.errors import LlmosError
from llmos.tasks import evaluate_text as ev

PREDICTED = [
    {"id": "a", "text": "The council voted for a bike lane.", "summary": "The council voted seven to two for a new bike lane.",
     "prediction": "The council voted for a bike lane on Main Street."},
    {"id": "b", "text": "Bees find their way home.", "summary": "Bees return home less often on cloudy days.",
     "prediction": "On cloudy days fewer bees returned to their hive."},
    {"id": "c", "text": "Tea came to Europe.", "summary": "Dutch traders brought tea to Europe in the 1600s.",
     "prediction": "Tea reached Europe through Dutch traders."},
]


def direct_rouge(predictions, references):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {k: 100 * sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}


def direct_chrf_bleu(predictions, references):
    return {"chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
            "bleu": sacrebleu.corpus_bleu(predictions, [references]).score}


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    return path


def test_metric_functions_are_the_libraries():
    preds, refs = [i["prediction"] for i in PREDICTED], [i["summary"] for i in PREDICTED]
    assert ev.rouge(preds, refs) == pytest.approx(direct_rouge(preds, refs), abs=1e-9)
    assert ev.chrf_bleu(preds, refs) == pytest.approx(direct_chrf_bleu(preds, refs), abs=1e-9)
    assert 0 < ev.rouge(preds, refs)["rouge1"] < 100


def test_eval_summarize_scores_given_predictions(tmp_path, capsys):
    data = write_jsonl(tmp_path / "preds.jsonl", PREDICTED)
    out = tmp_path / "report.json"
    assert main(["eval", "summarize", str(data), "--out", str(out)]) == 0  # no model needed
    report = json.loads(out.read_text())
    preds = [o["prediction"] for o in report["outputs"]]
    assert preds == [i["prediction"] for i in PREDICTED]
    assert report["scores"] == pytest.approx(direct_rouge(preds, [i["summary"] for i in PREDICTED]), abs=1e-9)
    table = capsys.readouterr().out
    assert "ROUGE-1" in table and f"{report['scores']['rouge1']:.2f}" in table


def test_eval_summarize_with_a_model(tiny_model_dir, tmp_path):
    out = tmp_path / "report.json"
    assert main(["eval", "summarize", "--model", str(tiny_model_dir), "--dtype", "fp32", "--limit", "2",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["items"] == 2 and report["model"] == str(tiny_model_dir)
    items = ev.load_items(ev.shipped("summarize"), "summarize")[:2]
    preds = [o["prediction"] for o in report["outputs"]]
    assert all(preds)
    assert report["scores"] == pytest.approx(direct_rouge(preds, [i["summary"] for i in items]), abs=1e-9)


def test_eval_translate_with_a_model(tiny_model_dir, tmp_path, capsys):
    items = ev.load_items(ev.shipped("translate"), "translate")
    subset = items[:3] + items[12:15]  # en-fr and en-de
    data = write_jsonl(tmp_path / "tr.jsonl", subset)
    out = tmp_path / "report.json"
    assert main(["eval", "translate", str(data), "--model", str(tiny_model_dir), "--dtype", "fp32", "--beams", "1",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    preds = [o["prediction"] for o in report["outputs"]]
    refs = [i["reference"] for i in subset]
    assert report["scores"] == pytest.approx(direct_chrf_bleu(preds, refs), abs=1e-9)
    for pair, idx in (("en-fr", range(3)), ("en-de", range(3, 6))):
        direct = direct_chrf_bleu([preds[i] for i in idx], [refs[i] for i in idx])
        assert report["pairs"][pair] == pytest.approx({"items": 3, **direct}, abs=1e-9)
    table = capsys.readouterr().out
    assert "en-fr" in table and "chrF" in table and "BLEU" in table


def test_shipped_sets_and_their_licence():
    summaries = ev.load_items(ev.shipped("summarize"), "summarize")
    translations = ev.load_items(ev.shipped("translate"), "translate")
    assert len(summaries) >= 20 and len(translations) >= 40
    assert len({i["id"] for i in summaries}) == len(summaries)
    assert {(i["source"], i["target"]) for i in translations} >= {("en", "fr"), ("en", "de"), ("en", "es")}
    readme = ev.shipped("summarize").parent / "README.md"
    assert "licence" in readme.read_text()


def test_bad_sets_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "x"}\n')
    with pytest.raises(LlmosError, match=r"bad.jsonl:1: a summarize item needs text, summary"):
        ev.load_items(bad, "summarize")
    bad.write_text("not json\n")
    with pytest.raises(LlmosError, match="bad.jsonl:1: not valid JSON"):
        ev.load_items(bad, "translate")
    bad.write_text("\n")
    with pytest.raises(LlmosError, match="no items"):
        ev.load_items(bad, "translate")
    with pytest.raises(LlmosError, match="no such file"):
        ev.load_items(tmp_path / "missing.jsonl", "summarize")
    bad.write_text(json.dumps({"text": "Hi", "reference": "Salut", "target": "elvish"}) + "\n")
    with pytest.raises(LlmosError, match="unknown language"):
        ev.evaluate_translations(None, ev.load_items(bad, "translate"))
