"""`dft data inspect`: what the data layer built from a run config, without training."""
from __future__ import annotations

import json

import yaml

from distributed_ft.cli import main
from distributed_ft.data.documents.corpus import pages, render


def write_config(tmp_path, folder) -> str:
    config = {"model": {"builtin": "tiny"},
              "data": {"train": [{"path": str(folder), "format": "documents", "task": "handbook", "weight": 2,
                                  "documents": {"holdout_fraction": 0.2}},
                                 {"builtin": "handbook", "split": "qa_trained", "task": "qa"}],
                       "max_length": 128},
              "strategy": {"name": "full"}, "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "inspect.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_inspect_reports_files_cleaning_chunks_and_samples(tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    for page in pages()["documents"][:10]:
        (folder / f"{page.name.split('/')[-1]}.{page.fmt}").write_text(render(page))
    (folder / "scan.pdf").write_bytes(b"%PDF-1.4 truncated")
    config = write_config(tmp_path, folder)

    assert main(["data", "inspect", config, "--json", "--samples", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    [doc] = summary["documents"]
    assert doc["files_listed"] == 11 and doc["documents_kept"] == 10 and doc["documents_held_out"] == 2
    assert [s["file"] for s in doc["skipped"]] == ["scan.pdf"]
    assert doc["counts"]["boilerplate_lines"] > 0                   # the text pages' headers and footers
    assert len(doc["samples"]) == 2 and all(s["source"].endswith((".md", ".html", ".txt")) for s in doc["samples"])
    train = summary["train"]
    assert train["handbook"]["examples"] == doc["chunks"]["train"] > 0 and train["handbook"]["weight"] == 2
    assert train["handbook"]["tokens"] > doc["tokens"]["train"]    # chunk tokens plus BOS / EOS per chunk
    assert summary["validation"]["handbook"]["kept"] == doc["chunks"]["held_out"]
    assert not (tmp_path / "run").exists()                          # nothing trained, nothing written

    assert main(["data", "inspect", config]) == 0
    text = capsys.readouterr().out
    assert "skipped scan.pdf: not a readable PDF" in text
    assert "documents handbook (train)" in text and "qa: weight 1.0, 32 examples" in text
