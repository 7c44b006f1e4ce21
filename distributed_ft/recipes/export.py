"""`dft export RUN_DIR_OR_MODEL -o OUT`: a plain Hugging Face model folder from a run or a saved model/adapter.

`export` is the linear path: resolve the source (a run directory means its final/) -> refuse what cannot become
a plain model -> load it (`load_trained`) -> merge the adapter into the base (`--merge`, PEFT's merge_and_unload)
-> cast to the export dtype -> write safetensors weights, tokenizer, generation config and a model card (the
run's resolved config and evaluation table) into a temporary folder renamed to OUT when complete -> optionally
push OUT to the Hugging Face Hub (a private repo unless `public`).

What becomes what:
- a full or selective fine-tune (a model folder) is re-written as is, in the export dtype;
- a LoRA / DoRA / IA3 adapter needs `merge=True`: the adapter's update is folded into the base weights, so the
  result loads with `AutoModelForCausalLM` (or `AutoModelForSequenceClassification`) and computes what base +
  adapter computed. Without `merge` an adapter folder is refused with that hint: the adapter folder itself is
  already the adapter export (`peft.PeftModel.from_pretrained`), and `dft export` always writes a plain model;
- prefix tuning and prompt tuning (virtual tokens) and bottleneck adapters (extra layers run by hooks) change no
  base weight and cannot be merged: refused with one line saying why.
Adapters are merged in fp32 and cast afterwards. The Hub token comes only from the environment (HF_TOKEN) or
huggingface_hub's own login store, never from a config or an argument.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from distributed_ft.errors import ModelError
from distributed_ft.models import DTYPES
from distributed_ft.strategies.bottleneck import CONFIG_FILE as BOTTLENECK_CONFIG
from distributed_ft.strategies.common import BASE_INFO_FILE as BASE_INFO
from distributed_ft.strategies.loading import base_model_of

PEFT_CONFIG = "adapter_config.json"


def export(source: str, out: str, *, merge: bool = False, dtype: str | None = None, overwrite: bool = False,
           push_to_hub: str | None = None, public: bool = False) -> Path:
    """Write `source` (a run directory or a model/adapter folder) to `out` as a plain model folder; returns it.

    `dtype` is fp32, bf16 or fp16 (default: the dtype the model was saved in). `push_to_hub` names a Hub repo
    to upload the folder to (created private unless `public`)."""
    import torch

    from distributed_ft.engine.save import verify_saved
    from distributed_ft.strategies.loading import load_trained, load_trained_tokenizer, resolve_trained_path

    model_dir = resolve_trained_path(source)
    if model_dir is None:
        raise ModelError(f"{source}: not a run directory or a model folder (no final/, config.json, "
                         f"{PEFT_CONFIG} or {BOTTLENECK_CONFIG})")
    adapter = check_exportable(model_dir, merge)
    out_dir = Path(out).expanduser()
    _check_target(out_dir, model_dir, overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ModelError(f"--dtype must be one of {', '.join(DTYPES)} (got '{dtype}')")
    target = getattr(torch, DTYPES[dtype]) if dtype else saved_dtype(model_dir)

    # An adapter is merged in fp32 (the update is added at full precision), into the plain weights a 4-bit
    # base's values stand for; a model folder loads as it is cast.
    model = load_trained(str(model_dir), dtype=torch.float32 if adapter else target, dequantize_base=adapter)
    if adapter:
        model = merge_adapter(model, model_dir)
    model = model.to(target)
    tokenizer = load_trained_tokenizer(model_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.exporting-", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None and not (tmp / "generation_config.json").is_file():
            model.generation_config.save_pretrained(str(tmp))
        verify_saved(tmp, model)
        run_dir = _run_dir_of(Path(source).expanduser(), model_dir)
        (tmp / "README.md").write_text(model_card(model, model_dir, run_dir, target, merged=adapter),
                                       encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[dft] exported {model_dir} -> {out_dir} ({str(target).removeprefix('torch.')}"
          f"{', adapter merged' if adapter else ''})")
    if push_to_hub:
        url = push_folder(out_dir, push_to_hub, private=not public)
        print(f"[dft] pushed {out_dir} to {url}")
    return out_dir


def check_exportable(model_dir: Path, merge: bool) -> bool:
    """Whether `model_dir` is an adapter to merge (True) or a model folder (False); raises ModelError (one
    line) for an adapter that cannot be merged, or for a mergeable one without `merge`."""
    if (model_dir / BOTTLENECK_CONFIG).is_file():
        raise ModelError(f"{model_dir}: bottleneck adapters are extra layers run by forward hooks, not a change "
                         "to the base's weights, so they cannot be merged into a plain model; load the folder "
                         "with distributed_ft.strategies.load_trained")
    if not (model_dir / PEFT_CONFIG).is_file():
        return False
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"{model_dir}: cannot read {PEFT_CONFIG}: {str(err).splitlines()[0]}") from None
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if config.is_prompt_learning:
        raise ModelError(f"{model_dir}: a {kind} adapter adds {config.num_virtual_tokens} learned virtual tokens "
                         "to every input instead of changing the base's weights, so it cannot be merged; use the "
                         "adapter folder itself (distributed_ft.strategies.load_trained or peft.PeftModel)")
    if not merge:
        raise ModelError(f"{model_dir} is a {kind} adapter folder (already loadable with peft.PeftModel); "
                         "pass --merge to fold it into the base and export a plain model")
    return True


def merge_adapter(model, model_dir: Path):
    """PEFT's merge_and_unload: the base model with the adapter's update added to its weights."""
    try:
        return model.merge_and_unload()
    except (AttributeError, ValueError, NotImplementedError, TypeError) as err:
        raise ModelError(f"{model_dir}: PEFT cannot merge this adapter: {str(err).splitlines()[0]}") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def saved_dtype(model_dir: Path):
    """The dtype the model (an adapter: its base) was saved in, from its config; fp32 when none is recorded."""
    import torch

    config = _read_json(model_dir / "config.json") or _read_json(model_dir / BASE_INFO).get("model_config") or {}
    base = base_model_of(model_dir)
    if not config and base and Path(base).is_dir():
        config = _read_json(Path(base) / "config.json")
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return getattr(torch, name) if name in DTYPES.values() else torch.float32


def _check_target(out_dir: Path, model_dir: Path, overwrite: bool) -> None:
    resolved, source = out_dir.resolve(), model_dir.resolve()
    if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
        raise ModelError(f"-o {out_dir}: the export folder must be outside the model folder {model_dir}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelError(f"-o {out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ModelError(f"-o {out_dir}: the folder exists and is not empty; pass --overwrite to replace it")


def _run_dir_of(source: Path, model_dir: Path) -> Path | None:
    """The run directory behind the model: the source itself (RUN_DIR/final) or final/'s parent."""
    for cand in (source, model_dir.parent if model_dir.name == "final" else None):
        if cand is not None and cand.is_dir() and ((cand / "config.yaml").is_file() or (cand / "eval").is_dir()):
            return cand
    return None


def _demoted(markdown: str) -> str:
    """Headings two levels down, so an embedded report's title sits under the card's own (##) section."""
    return "\n".join("##" + line if line.startswith("#") else line for line in markdown.splitlines())


def model_card(model, model_dir: Path, run_dir: Path | None, dtype, merged: bool) -> str:
    """README.md: Hub metadata, how to load the folder, the run's resolved config and its evaluation table."""
    causal = model.can_generate()
    auto = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
    base = base_model_of(model_dir)
    info = _read_json(model_dir / BASE_INFO)
    strategy = info.get("strategy")
    dtype_name = str(dtype).removeprefix("torch.")
    meta = ["---", "library_name: transformers", f"pipeline_tag: {'text-generation' if causal else 'text-classification'}",
            "tags:", "- distributed_ft"]
    meta += [f"- {strategy}"] if strategy else []
    if base and not Path(base).expanduser().exists():  # a Hub id, not a local folder
        meta.append(f"base_model: {base}")
    meta.append("---")
    how = (f"the `{strategy or 'adapter'}` adapter merged into its base (`{base}`)" if merged
           else "the fine-tuned model folder, re-written")
    lines = [*meta, "", f"# {(run_dir or model_dir).resolve().name}", "",
             f"Exported with `dft export` (distributed_ft) from `{model_dir}`: {how}. Weights: safetensors, "
             f"{dtype_name}.", "", "## Usage", "", "```python",
             f"from transformers import {auto}, AutoTokenizer", "",
             f'model = {auto}.from_pretrained("PATH_OR_REPO")',
             'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")', "```", ""]
    config_file = run_dir / "config.yaml" if run_dir else None
    if config_file is not None and config_file.is_file():
        lines += ["## Training config", "", "The run's resolved config (`config.yaml`):", "", "```yaml",
                  config_file.read_text(encoding="utf-8").rstrip(), "```", ""]
    report = run_dir / "eval" / "report.md" if run_dir else None
    if report is not None and report.is_file():
        lines += ["## Evaluation", "", "Baseline (the untrained model) and fine-tuned results on held-out "
                  "examples (`eval/report.md`):", "", _demoted(report.read_text(encoding="utf-8").rstrip()), ""]
    return "\n".join(lines)


def push_folder(folder: Path, repo_id: str, private: bool = True) -> str:
    """Create the Hub repo (private by default; an existing one is reused) and upload `folder`; returns its URL.
    The token is huggingface_hub's own: HF_TOKEN or the login store (`hf auth login`)."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if not get_token():
        raise ModelError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login` "
                         "(a token is never read from a config or an argument)")
    api = HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload model exported with dft export")
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise ModelError(f"--push-to-hub {repo_id}: {str(err).strip().splitlines()[0]}") from None
    return str(url)
