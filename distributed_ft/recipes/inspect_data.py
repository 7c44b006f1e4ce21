"""`dft data inspect`: what the data layer builds from a run config, without loading a model or training.

Files read and skipped (with reasons), duplicates and boilerplate removed, chunks and tokens per task,
and a few sample chunks with their sources; `--json` prints the same as one JSON object.
"""
from __future__ import annotations

import json


def inspect(config_path: str, overrides: list[str], *, samples: int = 3, as_json: bool = False) -> int:
    from distributed_ft.config import load_config
    from distributed_ft.data import build_data
    from distributed_ft.models import load_tokenizer_for

    config = load_config(config_path, overrides, kind="sft")
    tokenizer, _, _ = load_tokenizer_for(config.model)
    data = build_data(config.data, tokenizer, task_type=config.model.task, seed=config.training.seed, progress=True)
    summary = describe(data, samples)
    print(json.dumps(summary, indent=1, ensure_ascii=False) if as_json else render(summary))
    return 0


def describe(data, samples: int) -> dict:
    """Everything `inspect` prints, as plain data."""
    tokens = [0] * len(data.tasks)
    for example in data.train:
        tokens[example["task_id"]] += len(example["input_ids"])
    tasks = {task: {"weight": weight, "examples": size, "tokens": tokens[i], **data.stats[task]}
             for i, (task, weight, size) in enumerate(zip(data.tasks, data.weights, data.task_sizes))}
    documents = []
    for report in data.documents:
        entry = report.to_dict()
        entry["samples"] = entry["samples"][:samples]
        documents.append(entry)
    return {"train": tasks, "validation": data.validation_stats, "documents": documents}


def render(summary: dict) -> str:
    lines = ["training tasks:"]
    for task, info in summary["train"].items():
        dropped = ", ".join(f"{k} {info[k]}" for k in ("truncated", "dropped_overlong", "dropped_empty") if info.get(k))
        lines.append(f"  {task}: weight {info['weight']}, {info['examples']} examples, {info['tokens']} tokens"
                     + (f" ({dropped})" if dropped else ""))
    if summary["validation"]:
        lines.append("validation tasks:")
        lines += [f"  {task}: {counts['kept']} examples" for task, counts in summary["validation"].items()]
    for doc in summary["documents"]:
        lines += ["", f"documents {doc['task']} ({doc['role']}) from {doc['source']}:",
                  f"  files: {doc['files_listed']} listed, {doc['files_excluded']} excluded by include/exclude, "
                  f"{len(doc['skipped'])} skipped",
                  "  documents: " + f"{doc['documents_read']} read ("
                  + ", ".join(f"{k} {v}" for k, v in sorted(doc["by_type"].items()))
                  + f"), {doc['documents_kept']} kept, "
                  f"{doc['documents_held_out']} held out, {doc['bytes_read'] / 1e3:.1f} kB"]
        lines += [f"  skipped {s['file']}: {s['reason']}" for s in doc["skipped"]]
        lines.append("  cleaning: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in doc["counts"].items()))
        lines.append(f"  chunks: {doc['chunks']['train']} train ({doc['tokens']['train']} tokens), "
                     f"{doc['chunks']['held_out']} held out ({doc['tokens']['held_out']} tokens)")
        for sample in doc["samples"]:
            text = sample["completion"].replace("\n", " / ")
            lines.append(f"  - {sample['source']} chunk {sample['chunk']} (pages {sample['pages']}, "
                         f"section '{sample['section']}', {sample['tokens']} tokens): {text[:160]}"
                         + ("..." if len(text) > 160 else ""))
    return "\n".join(lines)
