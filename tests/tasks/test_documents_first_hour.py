"""What a new user meets when indexing and evaluating: files are read by their content, failed adds
leave no index, empty indexes say so, the README's retrieval command uses the set's own corpus,
evaluations write files only when asked, and pypdf's repair warnings stay off the terminal."""

from __future__ import annotations

import re

APACHE = ("Apache License\nVersion 2.0, January 2004\n\nTERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION\n\n"
          "Licensor shall mean the copyright owner or entity authorized by the copyright owner that is granting the License.\n")


def test_text_files_without_a_known_suffix_are_indexed_by_their_content(llmos_run, tmp_path, embed_model_path):
    docs = tmp_path / "licenses"
    docs.mkdir()
    (docs / "Apache-2.0").write_text(APACHE)  # Debian's common-licenses/ names
    (docs / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    index = tmp_path / "i.sqlite"
    out = llmos_run("index", "add", str(docs), "--index", str(index), "-q")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1 added") and "1 files of unsupported types skipped" in out.stdout
    out = llmos_run("search", "who is the licensor", "--index", str(index), "-k", "1")
    assert "Apache-2.0" in out.stdout


def test_a_failed_first_add_leaves_no_index_and_an_empty_index_says_so(llmos_run, tmp_path, embed_model_path):
    (tmp_path / "slides.pptx").write_bytes(b"PK\x03\x04" + bytes(200))
    index = tmp_path / "new.sqlite"
    out = llmos_run("index", "add", str(tmp_path / "slides.pptx"), "--index", str(index))
    assert out.returncode == 1 and "unsupported file type .pptx" in out.stderr
    assert not list(tmp_path.glob("new.sqlite*"))
    only_binary = tmp_path / "bin"
    only_binary.mkdir()
    (only_binary / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    out = llmos_run("index", "add", str(only_binary), "--index", str(index), "-q")
    assert out.returncode == 1 and "nothing was indexed" in out.stderr and not list(tmp_path.glob("new.sqlite*"))

    from llmos.tasks.index import Index

    Index(index).close()  # an index with no documents
    out = llmos_run("search", "anything", "--index", str(index))
    assert out.returncode == 1 and "is empty" in out.stderr and str(index) in out.stderr


def test_eval_retrieval_of_the_shipped_file_uses_its_own_corpus(monkeypatch, tmp_path, capsys, embed_model_path):
    from llmos.cli.main import main
    from llmos.tasks import evaluate_retrieval as ev

    questions = ev.load_questions(ev.SHIPPED_QA)[:4]

    def four_topics(folder):  # the documents of four questions: seconds, not the 2-minute corpus
        from pydoc_data.topics import topics

        folder.mkdir(parents=True, exist_ok=True)
        for q in questions:
            for source in q.sources:
                (folder / source).write_text(topics[source.removesuffix(".txt")])
        return folder

    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    (tmp_path / "models").symlink_to(embed_model_path.parent.parent)  # the pulled embedding model
    monkeypatch.setattr(ev, "write_pydoc_corpus", four_topics)
    monkeypatch.setattr(ev, "load_questions", lambda path: questions)
    assert main(["eval", "retrieval", "llmos/data/pydoc_qa.jsonl", "--modes", "keyword", "-q"]) == 0
    out = capsys.readouterr().out
    assert f"index {tmp_path / 'eval' / 'pydoc_topics.sqlite'}" in out
    recall_at_10 = float(re.search(r"keyword\s+\S+\s+\S+\s+(\S+)", out).group(1))
    assert recall_at_10 == 1.0  # the README's command scored 0.000 against the user's default index


def test_eval_writes_a_report_only_when_asked(llmos_run, tmp_path):
    import json

    items = tmp_path / "preds.jsonl"
    items.write_text(json.dumps({"id": "a", "text": "The cat sat on the mat all day.", "summary": "A cat sat.",
                                 "prediction": "The cat sat."}) + "\n")
    work = tmp_path / "cwd"
    work.mkdir()
    out = llmos_run("eval", "summarize", str(items), cwd=work)
    assert out.returncode == 0 and "ROUGE" in out.stdout.upper() and list(work.iterdir()) == []


def test_pypdf_repair_warnings_stay_off_the_terminal(llmos_run, tmp_path):
    import fpdf

    pdf = fpdf.FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.cell(0, 10, "The library opens at nine every morning.")
    data = re.sub(rb"startxref\s+\d+", b"startxref\n999", bytes(pdf.output()))  # pypdf repairs it, loudly
    (tmp_path / "broken.pdf").write_bytes(data)
    out = llmos_run("summarize", str(tmp_path / "broken.pdf"), "--model", str(tmp_path / "no-model.gguf"))
    assert out.returncode == 1
    assert out.stderr.splitlines() == [f"llmos: error: no such file or folder: {tmp_path / 'no-model.gguf'}; "
                                       "give a path to a .gguf file or a Hugging Face folder"]
