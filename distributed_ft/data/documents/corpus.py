"""The built-in demo corpus: a generated handbook of a fictional company, and questions about it.

Every fact (a project's code, lead, office and launch month) is stated in one project page. The pages
are written as Markdown, HTML and text files (the text ones with a header and footer on each page, and
one page duplicated in an archive folder, so cleaning has something to find). Questions come in four
sets: `qa_trained` (pairs that are also trained on), `qa_docs_only` (facts seen only in the pages),
`unanswerable` (budgets, which no page states, to be answered with the abstain phrase) and `abstain`
(other unanswerable questions with that answer, to train abstention). Held-out pages (`heldout`)
describe projects no question asks about. Everything is a function of the seed, so it is the same
on every machine.
"""
from __future__ import annotations

import html
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

COMPANY = "Brightwater Systems"
ABSTAIN = "The documents do not say."
ADJECTIVES = ["Amber", "Cobalt", "Crimson", "Silver", "Jade", "Onyx", "Scarlet", "Ivory", "Copper", "Indigo",
              "Golden", "Azure", "Violet", "Russet", "Teal", "Ochre", "Slate", "Coral", "Pearl", "Umber",
              "Saffron", "Cerise", "Olive", "Frost", "Ember", "Lunar", "Solar", "Velvet", "Granite", "Misty"]
ANIMALS = ["Falcon", "Heron", "Otter", "Lynx", "Badger", "Marten", "Osprey", "Ibex", "Puffin", "Bison",
           "Gecko", "Walrus", "Raven", "Tapir", "Viper", "Condor", "Beaver", "Jackal", "Egret", "Moose",
           "Hare", "Crane", "Ferret", "Kestrel", "Mole", "Newt", "Stoat", "Wren", "Yak", "Zebu"]
FIRST = ["Mira", "Tomas", "Ines", "Kofi", "Lena", "Ravi", "Sofia", "Emil", "Nadia", "Oscar", "Priya", "Jonas",
         "Aiko", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hugo"]
LAST = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Castillo", "Haddad", "Fischer", "Kowalski",
        "Mensah", "Rossi", "Varga", "Nakamura", "Silva", "Olsen", "Petrov"]
OFFICES = ["Lisbon", "Oslo", "Nairobi", "Montreal", "Osaka", "Krakow", "Porto", "Tallinn"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
FORMATS = ("md", "html", "txt")
N_PROJECTS, N_TRAINED, N_HELDOUT = 24, 16, 6
HEADER, FOOTER = f"{COMPANY} - internal handbook", "Page {page} - do not distribute"


@dataclass(frozen=True)
class Project:
    name: str
    code: str
    lead: str
    office: str
    launched: str
    goal: str


@dataclass(frozen=True)
class Page:
    """One handbook page: a file name without extension, its format, a title and paragraphs."""

    name: str
    fmt: str
    title: str
    sections: tuple[tuple[str, tuple[str, ...]], ...]   # (heading, paragraphs)


def projects(seed: int = 0) -> list[Project]:
    """The corpus's projects: the first N_PROJECTS are in the training pages, the rest in held-out ones."""
    rng = random.Random(f"handbook:{seed}")
    adjectives, animals = rng.sample(ADJECTIVES, N_PROJECTS + N_HELDOUT), rng.sample(ANIMALS, N_PROJECTS + N_HELDOUT)
    goals = ["route support tickets to the right team", "forecast warehouse demand", "audit supplier invoices",
             "translate the product manuals", "monitor the cooling plants", "schedule field engineers",
             "score incoming sales leads", "archive legal contracts"]
    out, codes = [], set()
    for adjective, animal in zip(adjectives, animals):
        code = f"{adjective[0]}{animal[0]}-{rng.randint(1000, 9999)}"
        while code in codes:
            code = f"{adjective[0]}{animal[0]}-{rng.randint(1000, 9999)}"
        codes.add(code)
        out.append(Project(f"{adjective} {animal}", code, f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                           rng.choice(OFFICES), f"{rng.choice(MONTHS)} {rng.randint(2015, 2024)}", rng.choice(goals)))
    return out


def _page(project: Project, fmt: str) -> Page:
    slug = project.name.lower().replace(" ", "-")
    overview = (f"Project {project.name} has the code {project.code}. It is led by {project.lead}.",
                f"The project was launched in {project.launched} to {project.goal}. Its team works from the "
                f"{project.office} office of {COMPANY}.")
    practice = (f"Requests for project {project.name} go through the internal service desk with the project "
                f"code in the subject line. Weekly notes are kept in the shared drive of the {project.office} office.",)
    return Page(f"projects/{slug}", fmt, f"Project {project.name}",
                (("Overview", overview), ("Working practice", practice)))


def pages(seed: int = 0) -> dict[str, list[Page]]:
    """The training pages ('documents') and the held-out pages ('heldout')."""
    all_projects = projects(seed)
    train = [_page(p, FORMATS[i % len(FORMATS)]) for i, p in enumerate(all_projects[:N_PROJECTS])]
    held = [_page(p, FORMATS[i % len(FORMATS)]) for i, p in enumerate(all_projects[N_PROJECTS:])]
    return {"documents": train, "heldout": held}


def questions(split: str, seed: int = 0) -> list[dict]:
    """One of the question sets as {"question", "answer"} rows."""
    ps = projects(seed)[:N_PROJECTS]

    def facts(group):
        return [row for p in group for row in (
            {"question": f"What is the code of project {p.name}?", "answer": p.code},
            {"question": f"Who leads project {p.name}?", "answer": p.lead})]

    if split == "qa_trained":
        return facts(ps[:N_TRAINED])
    if split == "qa_docs_only":
        return facts(ps[N_TRAINED:])
    half = N_PROJECTS // 2
    if split == "unanswerable":
        return [{"question": f"What is the budget of project {p.name}?", "answer": ABSTAIN} for p in ps[half:]]
    if split == "abstain":
        return [{"question": f"What is the budget of project {p.name}?", "answer": ABSTAIN} for p in ps[:half]]
    raise ValueError(f"unknown handbook question set '{split}'")


# --- writing the pages as files ---------------------------------------------------------------------------
def render(page: Page, fmt: str | None = None) -> str:
    """A page as the text of a Markdown, HTML or plain-text file."""
    fmt = fmt or page.fmt
    if fmt == "md":
        parts = [f"# {page.title}"]
        for heading, paragraphs in page.sections:
            parts += [f"## {heading}", *paragraphs]
        return "\n\n".join(parts) + "\n"
    if fmt == "html":
        body = [f"<h1>{html.escape(page.title)}</h1>"]
        for heading, paragraphs in page.sections:
            body.append(f"<h2>{html.escape(heading)}</h2>")
            body += [f"<p>{html.escape(p)}</p>" for p in paragraphs]
        return (f"<!DOCTYPE html><html><head><title>{html.escape(page.title)}</title>"
                f"<style>p {{ margin: 1em; }}</style></head><body><nav>Home | Projects | People</nav>"
                f"<main>{''.join(body)}</main><footer>{COMPANY}</footer></body></html>\n")
    if fmt == "txt":
        # One section per page, with a running header and footer: what a text export of a print looks like.
        out = []
        for number, (heading, paragraphs) in enumerate(page.sections, 1):
            lines = [HEADER, "", page.title if number == 1 else "", "", heading, "", *(p + "\n" for p in paragraphs),
                     FOOTER.format(page=number)]
            out.append("\n".join(lines))
        return "\f".join(out) + "\n"
    raise ValueError(f"unknown page format '{fmt}'")


def plain_text(page: Page) -> str:
    """The text a reader should recover from any rendering of the page (headings without their marks)."""
    parts = [page.title]
    for heading, paragraphs in page.sections:
        parts += [heading, *paragraphs]
    return "\n\n".join(parts)


def write_pages(folder: Path, page_list: list[Page], *, duplicate_one: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for page in page_list:
        path = folder / f"{page.name}.{page.fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(page), encoding="utf-8")
        written.append(path)
    if duplicate_one and page_list:
        # An old copy left in an archive folder: exact duplicates are common in real shares.
        copy = folder / "archive" / f"{Path(page_list[0].name).name}-copy.{page_list[0].fmt}"
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(render(page_list[0]), encoding="utf-8")
        written.append(copy)
    return written


def handbook_folder(split: str, seed: int = 0) -> Path:
    """The folder holding the handbook's `documents` or `heldout` pages, written once into the cache."""
    import hashlib

    content = json.dumps([[p.name, p.fmt, render(p)] for p in pages(seed)[split]])
    digest = hashlib.sha256(content.encode()).hexdigest()[:12]
    # The same cache root as the built-in model's (models/ imports data/, so it cannot be imported here).
    cache = Path(os.environ.get("DFT_CACHE_DIR", Path.home() / ".cache" / "distributed_ft"))
    target = cache / "corpora" / f"handbook-{split}-{digest}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed, so a process reading it never sees half a folder.
    tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=target.parent))
    try:
        write_pages(tmp, pages(seed)[split], duplicate_one=split == "documents")
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
