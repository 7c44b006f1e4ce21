"""Folder ingestion through build_data: planted duplicates and headers/footers are removed and counted,
held-out documents never reach a training chunk, chunks stay within their budget and keep their source,
bad files are named and skipped while the rest trains, and the one-line errors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from distributed_ft.data import DataConfig, build_data
from distributed_ft.data.documents.corpus import pages, render
from distributed_ft.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from distributed_ft.models.builtin import builtin_model_path

    return AutoTokenizer.from_pretrained(builtin_model_path())


def build(tokenizer, train: list[dict], validation: list[dict] | None = None, max_length: int = 128):
    cfg = DataConfig(train=train, validation=validation, max_length=max_length)
    return build_data(cfg, tokenizer, task_type="causal_lm", seed=3)


def write_handbook(folder: Path, n: int = 9) -> list:
    chosen = pages()["documents"][:n]
    for page in chosen:
        path = folder / f"{page.name}.{page.fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(page), encoding="utf-8")
    return chosen


def test_planted_duplicates_and_headers_are_removed_and_counted(tmp_path, tokenizer):
    docs = tmp_path / "docs"
    chosen = write_handbook(docs, 4)
    original = (docs / f"{chosen[0].name}.{chosen[0].fmt}").read_text()
    (docs / "copy.md").write_text(original)                                     # exact copy
    # A near copy: one word changed in a long text (what a re-saved or lightly edited file looks like).
    long_page = "\n\n".join(f"Section {i} of the travel policy says that every trip over three days needs "
                            f"a written approval from the office manager before booking." for i in range(12))
    (docs / "policy.md").write_text(long_page)
    (docs / "policy-v2.md").write_text(long_page.replace("Section 11", "Part 11"))
    shared = "All expense claims are filed within thirty days of the trip with every receipt attached."
    (docs / "a.txt").write_text(f"Notes on claims for the Oslo office.\n\n{shared}\n")
    (docs / "b.txt").write_text(f"Notes on claims for the Porto office.\n\n{shared}\n")          # shared paragraph
    header, footer = "ACME internal - do not forward", "page {} / 5"
    (docs / "report.txt").write_text("\f".join(
        f"{header}\n\nFinding {i}: the archive holds {i * 7} boxes of invoices from the old warehouse.\n\n"
        f"{footer.format(i)}" for i in range(1, 6)))
    data = build(tokenizer, [{"path": str(docs), "format": "documents", "task": "docs"}])
    [report] = data.documents
    assert report.counts["exact_duplicate_documents"] == 1
    assert report.counts["near_duplicate_documents"] == 1
    assert report.counts["exact_duplicate_paragraphs"] == 1
    assert report.counts["boilerplate_lines"] >= 10            # 5 headers and 5 footers
    text = "\n".join(r["completion"] for r in data.train_rows["docs"])
    assert header not in text and "page 3 / 5" not in text
    assert text.count(shared) == 1
    assert "Part 11" not in text or "Section 11 of" not in text
    assert all(f"Finding {i}:" in text for i in range(1, 6))  # the pages' own text stays
    sources = {r["source"] for r in data.train_rows["docs"]}
    assert len({"copy.md", f"{chosen[0].name}.{chosen[0].fmt}"} & sources) == 1   # one of the two copies
    assert len({"policy.md", "policy-v2.md"} & sources) == 1
    assert len(sources) == report.documents_kept == 8   # 4 pages, 1 policy, 2 notes, 1 report


def test_held_out_documents_never_reach_a_training_chunk(tmp_path, tokenizer):
    docs, held = tmp_path / "docs", tmp_path / "held"
    write_handbook(docs, 9)
    held_pages = pages()["heldout"][:3]
    for page in held_pages:
        (held / "x").mkdir(parents=True, exist_ok=True)
        (held / f"{Path(page.name).name}.md").write_text(render(page, "md"))
        (docs / f"{Path(page.name).name}-leaked.md").write_text(render(page, "md"))   # also in the training folder
    data = build(tokenizer, [{"path": str(docs), "format": "documents", "task": "docs",
                              "documents": {"holdout_fraction": 0.25}}],
                 [{"path": str(held), "format": "documents", "task": "held"}])
    train_text = "\n".join(r["completion"] for r in data.train_rows["docs"])
    held_records = [r for r in data.eval_records if r["task"] in ("held", "docs")]
    assert {r["task"] for r in held_records} == {"held", "docs"}
    # Every page is about one project: no held-out project's name or code may occur in training text.
    names = {m for r in held_records for m in re.findall(r"[Pp]roject ([A-Z]\w+ [A-Z]\w+)", r["reference"])}
    codes = {m for r in held_records for m in re.findall(r"\b[A-Z]{2}-\d{4}\b", r["reference"])}
    assert len(names) == len(codes) >= 5  # the 3 held-out pages and the 25% of the folder held out
    for marker in names | codes:
        assert marker not in train_text, marker
    train_report = next(r for r in data.documents if r.task == "docs")
    assert train_report.counts["held_out_overlap_documents"] == 3
    assert train_report.documents_held_out == round(0.25 * train_report.documents_kept)


def test_chunks_fit_their_budget_start_at_headings_and_keep_their_source(tmp_path, tokenizer):
    docs = tmp_path / "docs"
    docs.mkdir()
    sentences = [f"Shelf {i} holds {1990 + i}." for i in range(40)]
    (docs / "rules.md").write_text("# Archive rules\n\n" + " ".join(sentences[:20]) + "\n\n## Later rules\n\n"
                                   + "\n\n".join(sentences[20:]))
    data = build(tokenizer, [{"path": str(docs), "format": "documents", "task": "docs",
                              "documents": {"chunk_tokens": 120, "overlap_tokens": 40}}], max_length=128)
    rows = data.train_rows["docs"]
    assert len(rows) >= 6 and all(r["source"] == "rules.md" for r in rows)
    assert [r["chunk"] for r in rows] == list(range(len(rows)))
    assert data.stats["docs"]["truncated"] == 0                    # every chunk fits max_length whole
    assert all(len(tokenizer(r["completion"])["input_ids"]) + 1 <= 128 for r in rows)
    later = [i for i, r in enumerate(rows) if r["completion"].startswith("## Later rules")]
    assert len(later) == 1 and rows[later[0]]["section"] == "Later rules"
    assert all(r["section"] == "Later rules" for r in rows[later[0]:])
    # Consecutive chunks of one section overlap by whole sentences; none is cut mid-word.
    inside = rows[later[0] + 1]["completion"].split("\n\n")[0]
    assert inside in rows[later[0]]["completion"]
    joined = " ".join(r["completion"] for r in rows)
    assert all(s in joined for s in sentences)


def test_a_corrupt_pdf_is_named_and_skipped_while_the_rest_trains(tmp_path, tokenizer):
    docs = tmp_path / "docs"
    write_handbook(docs, 3)
    (docs / "scan-042.pdf").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Length 99999 >>\nstream\nxx")
    (docs / "logo.png").write_bytes(b"\x89PNG")
    data = build(tokenizer, [{"path": str(docs), "format": "documents", "task": "docs"}])
    [report] = data.documents
    skipped = dict(report.skipped)
    assert set(skipped) == {"scan-042.pdf", "logo.png"}
    assert skipped["scan-042.pdf"].startswith("not a readable PDF")
    assert report.documents_kept == 3 and data.task_sizes[0] == len(data.train_rows["docs"]) > 0
    from distributed_ft.data.documents import documents_summary

    assert "2 skipped" in documents_summary(report)


def test_an_empty_or_unreadable_folder_is_one_line(tmp_path, tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        build(tokenizer, [{"path": str(empty), "format": "documents", "task": "docs"}])
    assert str(err.value) == f"task 'docs': documents folder {empty} has no files to read"
    (empty / "broken.pdf").write_bytes(b"not a pdf at all")
    with pytest.raises(DataError) as err:
        build(tokenizer, [{"path": str(empty), "format": "documents", "task": "docs"}])
    message = str(err.value)
    assert "\n" not in message and message.startswith("task 'docs': nothing readable in")
    assert "broken.pdf: not a readable PDF" in message
    with pytest.raises(DataError, match="documents folder not found"):
        build(tokenizer, [{"path": str(tmp_path / "nope"), "format": "documents", "task": "docs"}])


def test_without_the_extra_the_error_names_the_install_command(tmp_path, tokenizer, monkeypatch):
    import importlib.util

    write_handbook(tmp_path, 1)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pypdf" else real(name, *a))
    with pytest.raises(DataError) as err:
        build(tokenizer, [{"path": str(tmp_path), "format": "documents", "task": "docs"}])
    assert str(err.value) == ("format: documents needs pypdf and the rest of the documents extra: "
                              "pip install 'distributed_ft[documents]'")


def test_include_exclude_and_file_lists(tmp_path, tokenizer):
    docs = tmp_path / "docs"
    chosen = write_handbook(docs, 6)
    (docs / ".hidden.md").write_text("# Secret\n\nThis hidden file must never be read by default at all.")
    data = build(tokenizer, [{"path": str(docs), "format": "documents", "task": "docs",
                              "documents": {"include": ["*.md", "*.html"], "exclude": ["*amber*"]}}])
    [report] = data.documents
    sources = {r["source"] for r in data.train_rows["docs"]}
    assert all(s.endswith((".md", ".html")) and "amber" not in s for s in sources)
    assert report.files_excluded == report.files_listed - len(sources) and ".hidden.md" not in sources
    files = [str(docs / f"{p.name}.{p.fmt}") for p in chosen[:2]] + [str(docs / "missing.pdf")]
    data = build(tokenizer, [{"path": files, "format": "documents", "task": "listed"}])
    assert data.documents[0].skipped == [(files[2], "not found")]
    assert {r["source"] for r in data.train_rows["listed"]} == set(files[:2])


@pytest.mark.parametrize("entry, needle", [
    ({"path": "docs/", "format": "documents", "documents": {"chunk_size": 5}}, "chunk_size"),
    ({"path": "a.jsonl", "documents": {"holdout_fraction": 0.1}}, "apply only to format: documents"),
    ({"hub": "org/set", "format": "documents"}, "needs a path"),
    ({"path": ["a.pdf", "b.pdf"]}, "list of paths needs format: documents"),
    ({"builtin": "handbook"}, "builtin 'handbook' needs a split"),
    ({"path": "d/", "format": "documents", "documents": {"chunk_tokens": 32, "overlap_tokens": 32}}, "overlap_tokens"),
])
def test_documents_options_are_checked_when_the_config_loads(entry, needle):
    from distributed_ft.errors import ConfigError
    from distributed_ft.strict import parse_section

    with pytest.raises(ConfigError) as err:
        parse_section(DataConfig, {"train": [entry]}, "run.yaml", prefix=("data",))
    assert needle in str(err.value) and "\n" not in str(err.value)
