"""`llmos summarize` and `llmos translate`: files of each kind, stdin, and one-line errors for bad
input, given before any model loads."""

from __future__ import annotations

import io

import pytest

from llmos.cli.main import main

DOC = "# Notes\n\nThe committee met on Tuesday and approved the new budget for the library.\n"


class Stdin:
    def __init__(self, data: bytes, tty: bool = False):
        self.buffer = io.BytesIO(data)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def fail(capsys, argv, message):
    code, out, err = run(capsys, argv)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("llmos: error: ") and message in err, err


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.md").write_text("  \n\n")
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0IHDR" + bytes(range(256)))
    (tmp_path / "report.docx").write_bytes(b"PK\x03\x04 not really a docx")
    (tmp_path / "notes.md").write_text(DOC)
    (tmp_path / "page.html").write_text("<html><body><h1>News</h1><p>The library opens at nine.</p>"
                                        "<script>var x = 1;</script></body></html>")
    return tmp_path


@pytest.mark.parametrize("name, message", [
    ("empty.md", "is empty"),
    ("binary.txt", "looks like a binary file"),
    ("report.docx", "unsupported file type .docx"),
    ("missing.txt", "no such file"),
])
def test_summarize_refuses_bad_files(files, capsys, name, message):
    fail(capsys, ["summarize", str(files / name), "--model", "/nonexistent-model"], message)


def test_bad_stdin_is_refused(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", Stdin(b""))
    fail(capsys, ["summarize", "-", "--model", "/nonexistent-model"], "standard input is empty")
    monkeypatch.setattr("sys.stdin", Stdin(b"\0\1\2binary"))
    fail(capsys, ["translate", "--to", "fr", "--model", "/nonexistent-model"], "binary data")
    monkeypatch.setattr("sys.stdin", Stdin(b"", tty=True))
    fail(capsys, ["translate", "--to", "fr", "--model", "/nonexistent-model"], "give the text to translate")


@pytest.mark.parametrize("argv, message", [
    (["translate", "Hello", "--to", "klingon"], "unknown language 'klingon'"),
    (["translate", "Hello", "--to", "fr", "--from", "zz"], "unknown language 'zz'"),
    (["translate", "   ", "--to", "fr"], "is empty"),
])
def test_translate_refuses_bad_arguments(capsys, argv, message):
    fail(capsys, [*argv, "--model", "/nonexistent-model"], message)


def test_summarize_files_and_stdin(files, tiny_model_dir, capsys, monkeypatch):
    model = ["--model", str(tiny_model_dir), "--dtype", "fp32", "--words", "20"]
    for name in ("notes.md", "page.html"):
        code, out, err = run(capsys, ["summarize", str(files / name), *model])
        assert code == 0 and out.strip(), err
    monkeypatch.setattr("sys.stdin", Stdin(DOC.encode()))
    code, out, _ = run(capsys, ["summarize", "-", *model, "--style", "bullets"])
    assert code == 0 and out.startswith("- ")


def test_summarize_pdf(tmp_path, tiny_model_dir, capsys):
    fpdf = pytest.importorskip("fpdf")
    pdf = fpdf.FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    pdf.multi_cell(0, 8, "Quarterly report. Revenue grew 17 percent in the third quarter.")
    pdf.output(str(tmp_path / "report.pdf"))
    code, out, err = run(capsys, ["summarize", str(tmp_path / "report.pdf"), "--model", str(tiny_model_dir),
                                  "--dtype", "fp32", "--words", "20"])
    assert code == 0 and out.strip(), err


def test_translate_text_file_and_stdin(files, tiny_model_dir, capsys, monkeypatch):
    model = ["--model", str(tiny_model_dir), "--dtype", "fp32", "--beams", "1"]
    code, out, _ = run(capsys, ["translate", "Where is the train station?", "--to", "French", "--from", "en", *model])
    assert code == 0 and out.endswith("\n") and out.strip()
    code, out, _ = run(capsys, ["translate", str(files / "notes.md"), "--to", "de", *model])
    assert code == 0 and out.startswith("# ")  # the heading stays a heading
    monkeypatch.setattr("sys.stdin", Stdin(DOC.encode()))
    code, out, _ = run(capsys, ["translate", "--to", "es", *model])
    assert code == 0 and out.startswith("# ") and out.count("\n") == DOC.count("\n")


def test_translate_says_plainly_when_the_model_lacks_the_pair(default_model_name, capsys):
    code, out, err = run(capsys, ["translate", "Good morning.", "--to", "fr", "--beams", "1", "--model", default_model_name])
    assert code == 0 and out.strip()
    assert err.startswith("llmos: note: ") and "not trained to translate English to French" in err
