"""`dft eval CONFIG`: evaluate a model (a base model, a run directory, a saved model or adapter) on a
config's validation data, sharded over the launch, with the report in output.dir/eval.

`run` is the linear path: load config -> resolve the model -> build data, then model -> evaluate ->
report -> close. The config is an eval config or a training run's config (its model and data are read).
"""
from __future__ import annotations

from pathlib import Path


def load_evaluated_model(model_cfg, data_of):
    """(model, tokenizer, path): a saved adapter over its recorded base, else the configured model (a run's
    final folder when `name_or_path` names a run). `data_of(tokenizer)` builds the data the head is sized from."""
    from distributed_ft.models import ensure_pad_token, load_model, load_tokenizer, load_tokenizer_for
    from distributed_ft.strategies.loading import ADAPTER_FILES, load_trained, resolve_trained_path

    trained = resolve_trained_path(model_cfg.name_or_path) if model_cfg.name_or_path else None
    if trained is not None and any((trained / f).exists() for f in ADAPTER_FILES):
        tokenizer = load_tokenizer(str(trained), model_cfg)
        ensure_pad_token(tokenizer)
        return load_trained(str(trained), task=model_cfg.task), tokenizer, data_of(tokenizer), str(trained)
    if trained is not None:
        model_cfg = model_cfg.model_copy(update={"name_or_path": str(trained)})
    tokenizer, path, added_pad = load_tokenizer_for(model_cfg)
    data = data_of(tokenizer)
    model = load_model(model_cfg, tokenizer, path, added_pad=added_pad, num_labels=data.num_labels,
                       label_names=data.label_names)
    return model, tokenizer, data, path


def run(config_path: str, overrides: list[str]) -> int:
    from accelerate.utils import set_seed

    from distributed_ft.config import load_config
    from distributed_ft.config.schema import RunConfig
    from distributed_ft.data import build_data
    from distributed_ft.engine.distributed import build_accelerator, configure_device_env
    from distributed_ft.engine.logging import setup_console_logging
    from distributed_ft.eval.session import EvalInputs, RunEvaluation, run_metadata
    from distributed_ft.strategies import build_few_shot_records, get_strategy
    from distributed_ft.tasks import kind_of

    configure_device_env()
    config = load_config(config_path, overrides, kind=("eval", "sft"))
    accelerator = build_accelerator(config.training, model_dtype=config.model.dtype)
    setup_console_logging(accelerator.is_main_process)
    set_seed(config.training.seed)

    def data_of(tokenizer):
        return build_data(config.data, tokenizer, task_type=config.model.task, seed=config.training.seed)

    model, tokenizer, data, model_path = load_evaluated_model(config.model, data_of)
    records = list(data.eval_records or [])
    strategy = get_strategy(config.strategy.name) if isinstance(config, RunConfig) else None
    if strategy is not None and strategy.few_shot:  # a prompting run's config: its prompts, as `dft train` builds them
        records = build_few_shot_records(config.strategy, records, data.solved_examples)
    kind = kind_of(config.model.task)
    evaluation = RunEvaluation(EvalInputs(
        model=accelerator.prepare(model.eval()), tokenizer=tokenizer, accelerator=accelerator, records=records,
        task_types={r["task"]: kind for r in records}, config=config.eval, out_dir=Path(config.output.dir),
        metadata=run_metadata(model_path, strategy.name if strategy is not None else "evaluation only", config),
        trains=False))
    try:
        evaluation.final()
    finally:
        accelerator.end_training()
    return 0
