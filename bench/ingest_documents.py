"""Document ingestion: the `format: documents` path against the same parsing libraries called in a plain loop.

    python bench/ingest_documents.py [--files 1000] [--rounds 2]
    python bench/ingest_documents.py --smoke      # 25 files, 1 round; targets not checked

Writes a folder of generated handbook pages (projects of a fictional company, 3-6 paragraphs each), an
equal share of Markdown, HTML, text (with a header and footer per page), PDF (fpdf2, 2 pages each with
header and footer) and Word (python-docx) files, plus 2% exact copies, then reads it with
  engine: DocumentReader.read, the path of `dft train` / `dft data inspect` for `format: documents`: parse,
          normalise, strip headers and footers, de-duplicate documents and paragraphs (MinHash), chunk
          with the built-in tokenizer (token counts), held-out split;
  plain:  a loop calling the same readers' libraries (pypdf layout extraction, python-docx paragraphs,
          BeautifulSoup get_text, read_text) and keeping every text in a list: parsing alone.
Each variant runs in its own fresh process, `--rounds` times alternating; its figures are files/s and MB/s
over the wall time of the read (imports and tokenizer loading excluded) and the process's peak resident
memory, the median over rounds. Exits 1 when engine < 0.5x plain in files/s (cleaning, de-duplication and
chunking may cost at most as much as parsing), or when a run read fewer files than the folder holds.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (REPO, Sanity, exit_status, machine_load, median, parse_args, peak_rss_bytes,  # noqa: E402
                          run_worker, versions, write_results)

VARIANTS = ("engine", "plain")
TARGETS = {"engine/plain": 0.5}
SMOKE = {"files": 25, "rounds": 1}
ROW_MARK = "BENCH_ROW "
FORMATS = ("md", "html", "txt", "pdf", "docx")


def generate_folder(folder: Path, n_files: int, seed: int = 0) -> dict:
    """n_files generated pages, one format in turn; 2% of them are exact copies of an earlier file."""
    from distributed_ft.data.documents.corpus import (ADJECTIVES, ANIMALS, FIRST, LAST, MONTHS, OFFICES, Page,
                                                      render)

    rng = random.Random(seed)
    copies = max(1, n_files // 50)
    written: list[Path] = []
    for i in range(n_files - copies):
        name = f"{rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)} {i}"
        lead, office = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(OFFICES)
        paragraphs = tuple(
            f"Project {name} ({rng.choice('ABCDEFGH')}{rng.choice('KLMNPQRS')}-{rng.randint(1000, 9999)}) "
            f"reported in {rng.choice(MONTHS)} {rng.randint(2015, 2025)} that {lead} moved {rng.randint(2, 90)} "
            f"tasks to the {office} office, where the review board approved {rng.randint(1, 40)} changes "
            f"to the schedule and {rng.randint(1, 9)} new hires for the coming quarter."
            for _ in range(rng.randint(3, 6)))
        half = len(paragraphs) // 2
        page = Page(f"p{i:05d}", FORMATS[i % len(FORMATS)], f"Project {name}",
                    (("Status", paragraphs[:half]), ("Plans", paragraphs[half:])))
        path = folder / f"{i % 10}" / f"{page.name}.{page.fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if page.fmt == "pdf":
            _write_pdf(path, page)
        elif page.fmt == "docx":
            _write_docx(path, page)
        else:
            path.write_text(render(page), encoding="utf-8")
        written.append(path)
    for j in range(copies):
        source = written[rng.randrange(len(written))]
        target = folder / "copies" / f"c{j:04d}-{source.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    sizes = [p.stat().st_size for p in folder.rglob("*") if p.is_file()]
    return {"files": len(sizes), "bytes": sum(sizes)}


def _write_pdf(path: Path, page) -> None:
    from fpdf import FPDF

    class Doc(FPDF):
        def header(self):
            self.set_font("Helvetica", size=9)
            self.cell(0, 8, "Brightwater Systems - internal", new_x="LMARGIN", new_y="NEXT")

        def footer(self):
            self.set_y(-15)
            self.set_font("Helvetica", size=9)
            self.cell(0, 8, f"Page {self.page_no()}")

    pdf = Doc()
    for heading, paragraphs in page.sections:
        pdf.add_page()
        pdf.set_font("Helvetica", "B", 13)
        pdf.multi_cell(0, 8, heading if heading != "Status" else f"{page.title}\n\n{heading}")
        pdf.set_font("Helvetica", size=11)
        for paragraph in paragraphs:
            pdf.ln(4)
            pdf.multi_cell(0, 6, paragraph)
    pdf.output(str(path))


def _write_docx(path: Path, page) -> None:
    import docx

    document = docx.Document()
    document.add_heading(page.title, level=1)
    for heading, paragraphs in page.sections:
        document.add_heading(heading, level=2)
        for paragraph in paragraphs:
            document.add_paragraph(paragraph)
    document.save(str(path))


# ---- the two variants, each in its own process ------------------------------------------------------------

def run_engine(folder: Path) -> dict:
    from transformers import AutoTokenizer

    from distributed_ft.data.config import DatasetSpec
    from distributed_ft.data.documents import DocumentReader
    from distributed_ft.models.builtin import builtin_model_path

    import bs4, datasketch, docx, pypdf  # noqa: E401,F401 - imported before the clock starts, as in `plain`

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path())
    reader = DocumentReader(tokenizer, max_length=256, seed=0)
    spec = DatasetSpec(path=str(folder), format="documents", task="bench", documents={"holdout_fraction": 0.05})
    start = time.perf_counter()
    result = reader.read(spec, str(folder), held_out=False, holdout_fraction=0.05)
    seconds = time.perf_counter() - start
    report = result.report
    return {"seconds": seconds, "files_read": report.documents_read, "bytes": report.bytes_read,
            "skipped": len(report.skipped), "chunks": report.chunks, "tokens": report.tokens,
            "removed": {k: v for k, v in report.counts.items() if v}, "peak_rss": peak_rss_bytes()}


def run_plain(folder: Path) -> dict:
    import docx
    import pypdf
    from bs4 import BeautifulSoup

    start = time.perf_counter()
    texts, size = [], 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size += path.stat().st_size
        suffix = path.suffix
        if suffix == ".pdf":
            texts.append("\n".join(page.extract_text(extraction_mode="layout") for page in pypdf.PdfReader(path).pages))
        elif suffix == ".docx":
            texts.append("\n\n".join(p.text for p in docx.Document(str(path)).paragraphs))
        elif suffix == ".html":
            texts.append(BeautifulSoup(path.read_text(encoding="utf-8"), "lxml").get_text("\n"))
        else:
            texts.append(path.read_text(encoding="utf-8"))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "files_read": len(texts), "bytes": size,
            "characters": sum(len(t) for t in texts), "peak_rss": peak_rss_bytes()}


WORKERS = {"engine": run_engine, "plain": run_plain}


def launch(variant: str, folder: Path, timeout: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return run_worker([sys.executable, __file__, "--worker", variant, "--work", str(folder)], env, timeout, variant,
                      ROW_MARK)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000, help="files in the generated folder")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, alternating")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per run")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)
    if args.worker:
        print(ROW_MARK + json.dumps(WORKERS[args.worker](args.work)), flush=True)
        return 0

    sanity = Sanity()
    load_before = machine_load()
    with tempfile.TemporaryDirectory(prefix="dft-ingest-bench-") as tmp:
        folder = Path(tmp) / "docs"
        start = time.perf_counter()
        made = generate_folder(folder, args.files)
        print(f"generated {made['files']} files, {made['bytes'] / 1e6:.1f} MB in {time.perf_counter() - start:.0f} s",
              flush=True)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                m = launch(variant, folder, args.timeout)
                m["files_per_s"] = made["files"] / m["seconds"]
                m["mb_per_s"] = made["bytes"] / 1e6 / m["seconds"]
                sanity.check(m["files_read"] >= made["files"],
                             f"{variant} read {m['files_read']} of {made['files']} files")
                sanity.finite(f"{variant} seconds", m["seconds"], positive=True)
                if variant == "engine":
                    sanity.check(m["skipped"] == 0 and m["chunks"]["train"] > 0,
                                 "engine skipped files or made no chunks")
                    sanity.check(m["removed"].get("exact_duplicate_documents", 0) >= made["files"] // 50,
                                 "engine missed the planted copies")
                runs[variant].append(m)
                print(f"round {r + 1} {variant:>6}: {m['files_per_s']:7.1f} files/s, {m['mb_per_s']:6.2f} MB/s, "
                      f"peak {m['peak_rss'] / 2**20:.0f} MiB", flush=True)
    load_after = machine_load()

    figures = {v: {k: median([m[k] for m in runs[v]]) for k in ("files_per_s", "mb_per_s", "peak_rss")}
               for v in VARIANTS}
    ratios = {"engine/plain": figures["engine"]["files_per_s"] / figures["plain"]["files_per_s"],
              "peak_rss engine/plain": figures["engine"]["peak_rss"] / figures["plain"]["peak_rss"]}
    ok = {name: ratios[name] >= target for name, target in TARGETS.items()}
    print(f"\n{'SMOKE RUN (tiny sizes, targets not checked): ' if args.smoke else ''}{made['files']} files "
          f"({made['bytes'] / 1e6:.1f} MB: md, html, txt, pdf, docx in equal shares, 2% copies), "
          f"median of {args.rounds}")
    for v in VARIANTS:
        f = figures[v]
        print(f"  {v:>6}: {f['files_per_s']:7.1f} files/s, {f['mb_per_s']:6.2f} MB/s, peak memory "
              f"{f['peak_rss'] / 2**20:.0f} MiB")
    verdict = "not checked in a smoke run" if args.smoke else ("ok" if ok["engine/plain"] else "MISSED")
    print(f"  engine/plain files/s: {ratios['engine/plain']:.2f}x (target >= {TARGETS['engine/plain']}x: {verdict})")
    print(f"  engine/plain peak memory: {ratios['peak_rss engine/plain']:.2f}x (no target)")
    engine = runs["engine"][-1]
    print(f"  engine: {engine['chunks']['train']} train / {engine['chunks']['held_out']} held-out chunks, "
          f"removed {engine['removed']}")
    print(f"  load average (1m) {load_before['loadavg_1m']} before, {load_after['loadavg_1m']} after, "
          f"{load_after['cpus']} cpus")
    path = write_results("ingest_documents", {
        "folder": made, "rounds": args.rounds, "figures": figures, "ratios": ratios, "targets": TARGETS,
        "targets_met": ok, "runs": runs, "load_before": load_before, "load_after": load_after,
        "sanity_failures": sanity.failures, "versions": versions()}, smoke=args.smoke)
    print(f"  results: {path.relative_to(REPO)}")
    return exit_status(sanity, all(ok.values()), args.smoke)


if __name__ == "__main__":
    sys.exit(main())
