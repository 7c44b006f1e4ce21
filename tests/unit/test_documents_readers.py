"""Each file type is read: the text recovered from a file written by a real writer of its format
(fpdf2 for PDF, python-docx for Word, the handbook's own Markdown / HTML / text renderings, jsonl rows)
equals the source text up to normalisation (whitespace, heading marks)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from distributed_ft.data.documents.clean import blocks, normalise_page, strip_boilerplate
from distributed_ft.data.documents.corpus import pages, plain_text, render
from distributed_ft.data.documents.readers import RawDocument, read_file

PAGE = pages()["documents"][0]
HEADER, FOOTER = "Brightwater Systems - confidential", "Page {} of {}"


def same_text(text: str) -> str:
    """The comparison's normalisation: heading marks dropped, whitespace collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"(?m)^#{1,6} ", "", text)).strip()


def extracted(path: Path, text_field: str = "text") -> list[str]:
    """Each document's text after the cleaning a reader's output goes through (as ingestion does)."""
    out = []
    for item in read_file(path, path.name, text_field):
        assert isinstance(item, RawDocument), item
        cleaned = [normalise_page(p)[0] for p in item.pages]
        cleaned, _ = strip_boilerplate(cleaned, 0.6)
        out.append("\n\n".join(b.text for b in blocks(cleaned)))
    return out


@pytest.mark.parametrize("fmt", ["md", "html", "txt"])
def test_markdown_html_and_text_files_give_the_page_text(tmp_path, fmt):
    path = tmp_path / f"page.{fmt}"
    path.write_text(render(PAGE, fmt), encoding="utf-8")
    [text] = extracted(path)
    assert same_text(text) == same_text(plain_text(PAGE))
    if fmt == "html":  # navigation and footer elements are page furniture, not text
        assert "Home | Projects" not in text and "<" not in text


def write_pdf(path: Path, sections, *, hyphenate: tuple[str, str] | None = None) -> None:
    from fpdf import FPDF

    class Handbook(FPDF):
        def header(self):
            self.set_font("Helvetica", size=9)
            self.cell(0, 8, HEADER, new_x="LMARGIN", new_y="NEXT")
            self.ln(4)

        def footer(self):
            self.set_y(-15)
            self.set_font("Helvetica", size=9)
            self.cell(0, 8, FOOTER.format(self.page_no(), "{nb}"))

    pdf = Handbook()
    pdf.alias_nb_pages()
    for heading, paragraphs in sections:
        pdf.add_page()
        pdf.set_font("Helvetica", "B", 14)
        pdf.multi_cell(0, 8, heading)
        pdf.ln(5)
        pdf.set_font("Helvetica", size=11)
        for paragraph in paragraphs:
            pdf.multi_cell(0, 6, paragraph)
            pdf.ln(6)
    if hyphenate:
        pdf.set_font("Helvetica", size=11)
        pdf.multi_cell(0, 6, f"{hyphenate[0]}\n{hyphenate[1]}")
    pdf.output(str(path))


def test_pdf_pages_lose_their_header_footer_and_keep_the_text(tmp_path):
    sections = [(PAGE.title, ())] + [(h, p) for h, p in PAGE.sections]
    path = tmp_path / "page.pdf"
    write_pdf(path, sections, hyphenate=("The notes record what the team learned and the knowl-", "edge it gained."))
    [text] = extracted(path)
    expected = plain_text(PAGE) + "\n\nThe notes record what the team learned and the knowledge it gained."
    assert same_text(text) == same_text(expected)
    assert HEADER not in text and "Page 1 of" not in text


def test_docx_headings_and_paragraphs_are_read_and_its_page_header_is_not(tmp_path):
    import docx

    document = docx.Document()
    document.sections[0].header.paragraphs[0].text = HEADER
    document.add_heading(PAGE.title, level=1)
    for heading, paragraphs in PAGE.sections:
        document.add_heading(heading, level=2)
        for paragraph in paragraphs:
            document.add_paragraph(paragraph)
    path = tmp_path / "page.docx"
    document.save(str(path))
    [text] = extracted(path)
    assert same_text(text) == same_text(plain_text(PAGE))
    assert text.startswith(f"# {PAGE.title}\n\n## {PAGE.sections[0][0]}")  # headings keep their level
    assert HEADER not in text


def test_jsonl_rows_are_documents_and_bad_rows_are_named(tmp_path):
    path = tmp_path / "export.jsonl"
    good = [plain_text(p) for p in pages()["documents"][:2]]
    path.write_text(json.dumps({"body": good[0]}) + "\n{not json\n" + json.dumps({"other": 1}) + "\n"
                    + json.dumps({"body": good[1]}) + "\n")
    items = list(read_file(path, "export.jsonl", "body"))
    docs = [i for i in items if isinstance(i, RawDocument)]
    assert [same_text(d.pages[0]) for d in docs] == [same_text(g) for g in good]
    assert [d.source for d in docs] == ["export.jsonl#row1", "export.jsonl#row4"]
    assert [i for i in items if isinstance(i, tuple)] == [
        ("export.jsonl#row2", "not a JSON object"),
        ("export.jsonl#row3", "no string field 'body' (set documents.text_field)")]


def test_broken_encrypted_and_unknown_files_come_back_as_reasons(tmp_path):
    from fpdf import FPDF

    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ngarbage without an xref")
    locked = FPDF()
    locked.set_encryption(owner_password="owner", user_password="secret")
    locked.add_page()
    locked.set_font("Helvetica", size=11)
    locked.cell(0, 8, "secret text")
    locked.output(str(tmp_path / "locked.pdf"))
    (tmp_path / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02binary")
    reasons = {name: list(read_file(tmp_path / name, name, "text")) for name in
               ("broken.pdf", "locked.pdf", "scan.png", "binary.txt")}
    assert reasons["broken.pdf"][0][1].startswith("not a readable PDF")
    assert reasons["locked.pdf"][0][1].startswith("encrypted")
    assert reasons["scan.png"][0][1].startswith("unsupported file type '.png'")
    assert reasons["binary.txt"][0][1] == "binary content, not text"
