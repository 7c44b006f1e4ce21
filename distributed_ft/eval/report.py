"""Evaluation report files: report.json, report.md, predictions.jsonl and PNG plots under <out>/eval/."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from distributed_ft.eval.runner import EvalResult
from distributed_ft.strict import config_hash


def _num(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _compare(after: dict[str, float], before: dict[str, float] | None) -> dict[str, dict[str, float | None]]:
    keys = list(after) + [k for k in (before or {}) if k not in after]
    rows = {}
    for key in keys:
        new, old = _num(after.get(key)), _num((before or {}).get(key))
        rows[key] = {"baseline": old, "fine_tuned": new,
                     "change": None if new is None or old is None else new - old}
    return rows


def build_report(result_after: EvalResult, result_before: EvalResult | None = None,
                 meta: dict | None = None) -> dict[str, Any]:
    """The report.json content: every metric per task with baseline, fine-tuned value and change."""
    meta = dict(meta or {})
    if "config_hash" not in meta and "config" in meta:
        meta["config_hash"] = config_hash(meta["config"])
    before_tasks = result_before.tasks if result_before else {}
    tasks = {}
    for name in list(result_after.tasks) + [t for t in before_tasks if t not in result_after.tasks]:
        after, before = result_after.tasks.get(name), before_tasks.get(name)
        ref = after or before
        tasks[name] = {
            "task_type": ref.task_type,
            "n": after.n if after else None,
            "n_baseline": before.n if before else None,
            "metrics": _compare(after.scores if after else {}, before.scores if before else None),
        }
    knowledge = knowledge_rows(tasks, meta.get("retention") or [], meta.get("max_retention_drop"))
    signatures = {**(result_before.signatures if result_before else {}), **result_after.signatures}
    return {
        "model": meta.get("model"),
        "strategy": meta.get("strategy"),
        "config_hash": meta.get("config_hash"),
        "meta": {k: v for k, v in meta.items() if k != "config"},
        "sacrebleu_signature": signatures.get("bleu"),
        "rouge_signature": signatures.get("rouge"),
        "signatures": signatures,
        "tasks": tasks,
        "knowledge": knowledge,
        "mean": _compare(result_after.mean, result_before.mean if result_before else None),
        "timing": {"fine_tuned": result_after.timing, "baseline": result_before.timing if result_before else None},
    }


# Metrics where lower is better: a retention "drop" is then a rise.
_LOWER_IS_BETTER = {"perplexity", "eval_loss", "mse", "mae", "hallucination"}


def knowledge_rows(tasks: dict[str, Any], retention: list[str], max_drop: float | None) -> list[dict]:
    """What the model knows of its documents, read from the task metrics: recall on question sets (tasks
    scored with token_f1), abstention vs hallucination on unanswerable ones, perplexity on held-out
    documents (tasks scored by perplexity alone), and the retention tasks with their drop."""
    rows = []

    def add(measure, task, metric, **extra):
        row = tasks[task]["metrics"].get(metric)
        if row is not None:
            rows.append({"measure": measure, "task": task, "metric": metric, **row, **extra})

    for task, info in tasks.items():
        metrics = info["metrics"]
        if "token_f1" in metrics:
            add("recall", task, "exact_match")
            add("recall", task, "token_f1")
        if "hallucination" in metrics:
            add("hallucination rate", task, "hallucination")
            add("abstention rate", task, "abstention")
        if "perplexity" in metrics and not set(metrics) - {"perplexity", "eval_loss"}:
            add("held-out perplexity", task, "perplexity")
    for task in retention:
        if task not in tasks or not tasks[task]["metrics"]:
            continue
        metric, row = next(iter(tasks[task]["metrics"].items()))
        drop = None
        if row["baseline"] is not None and row["fine_tuned"] is not None:
            drop = row["baseline"] - row["fine_tuned"]
            drop = -drop if metric in _LOWER_IS_BETTER else drop
        within = None if max_drop is None or drop is None else drop <= max_drop
        add("retention", task, metric, drop=drop, max_drop=max_drop, within_bound=within)
    return rows


def _render_knowledge(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Knowledge and retention", "",
             "| measure | task | metric | baseline | fine-tuned | change |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['measure']} | {r['task']} | {r['metric']} | {_fmt(r['baseline'])} | "
                     f"{_fmt(r['fine_tuned'])} | {_fmt_change(r['change'])} |")
    for r in rows:
        if r["measure"] == "retention" and r.get("drop") is not None:
            bound = "" if r["max_drop"] is None else (
                f"; bound {r['max_drop']:.4f}: {'within' if r['within_bound'] else 'EXCEEDED'}")
            lines.append(f"- retention of {r['task']}: {r['metric']} dropped by {r['drop']:+.4f}{bound}")
    return lines


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_change(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# Evaluation report", ""]
    for key in ("model", "strategy", "config_hash", "sacrebleu_signature", "rouge_signature"):
        if report.get(key):
            lines.append(f"- {key.replace('_', ' ')}: `{report[key]}`")
    lines += ["", "| task | metric | baseline | fine-tuned | change |", "|---|---|---|---|---|"]
    for task, info in report["tasks"].items():
        for metric, row in info["metrics"].items():
            lines.append(f"| {task} | {metric} | {_fmt(row['baseline'])} | {_fmt(row['fine_tuned'])} | "
                         f"{_fmt_change(row['change'])} |")
    for metric, row in report["mean"].items():
        lines.append(f"| **mean (weighted)** | {metric} | {_fmt(row['baseline'])} | {_fmt(row['fine_tuned'])} | "
                     f"{_fmt_change(row['change'])} |")
    lines += _render_knowledge(report.get("knowledge") or [])
    lines += ["", "| task | type | samples |", "|---|---|---|"]
    lines += [f"| {t} | {i['task_type']} | {i['n'] if i['n'] is not None else i['n_baseline']} |"
              for t, i in report["tasks"].items()]
    return "\n".join(lines) + "\n"


def _plot_loss(path: Path, loss_history: list[dict]) -> bool:
    rows = [r for r in loss_history if r.get("loss") is not None and r.get("step") is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], "." if len(rows) > 40 else "o", linestyle="-",
            markersize=3, label="train loss", color="tab:blue")
    evals = [r for r in loss_history if r.get("eval_loss") is not None and r.get("step") is not None]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss",
                color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_metrics(path: Path, report: dict[str, Any]) -> bool:
    metrics: list[str] = []
    for info in report["tasks"].values():
        metrics += [m for m in info["metrics"] if m not in metrics]
    if not metrics:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        tasks = [t for t, i in report["tasks"].items() if metric in i["metrics"]]
        xs = range(len(tasks))
        before = [report["tasks"][t]["metrics"][metric]["baseline"] for t in tasks]
        after = [report["tasks"][t]["metrics"][metric]["fine_tuned"] for t in tasks]
        width = 0.38
        bars = []
        if any(v is not None for v in before):
            bars.append(ax.bar([x - width / 2 for x in xs], [v or 0 for v in before], width, label="baseline",
                               color="tab:gray"))
        bars.append(ax.bar([x + width / 2 for x in xs], [v or 0 for v in after], width, label="fine-tuned",
                           color="tab:green"))
        for container in bars:  # numbers on the bars keep zero-height bars readable
            ax.bar_label(container, fmt="%.3g", fontsize=7)
        values = [v for v in before + after if v is not None]
        if values and min(values) >= 0:
            ax.set_ylim(0, max(max(values) * 1.15, 1e-9) if max(values) > 0 else 1)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(tasks, rotation=20, ha="right")
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("Metrics per task: baseline vs fine-tuned")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out_dir: str | Path, result_after: EvalResult, result_before: EvalResult | None = None,
                 meta: dict | None = None, loss_history: list[dict] | None = None) -> dict[str, Path]:
    """Write <out_dir>/eval/{report.json, report.md, predictions.jsonl, loss_curve.png, metrics.png}."""
    eval_dir = Path(out_dir) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(result_after, result_before, meta)
    paths = {"json": eval_dir / "report.json", "markdown": eval_dir / "report.md",
             "predictions": eval_dir / "predictions.jsonl"}
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
    with paths["predictions"].open("w", encoding="utf-8") as handle:
        for row in result_after.predictions:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    if loss_history and _plot_loss(eval_dir / "loss_curve.png", loss_history):
        paths["loss_curve"] = eval_dir / "loss_curve.png"
    if _plot_metrics(eval_dir / "metrics.png", report):
        paths["metrics_plot"] = eval_dir / "metrics.png"
    return paths
