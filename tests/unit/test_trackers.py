"""Experiment trackers through accelerate: tensorboard, mlflow (a local file store) and wandb (offline) get
the logged metrics; no key from the environment reaches any file of the run."""
from __future__ import annotations

import json
import os
import secrets

import pytest

from tests.conftest import run_dft

SMALL = ["model.builtin=tiny", "data.train.0.num_examples=200", "data.train.1.num_examples=100",
         "data.validation_fraction=0.05", "training.micro_batch_size=8", "training.max_steps=4",
         "training.warmup_steps=0", "logging.log_every=1", "logging.progress_bar=false", "eval.max_samples=4",
         "eval.max_new_tokens=4"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run = tmp_path_factory.mktemp("tracked") / "run"
    key = f"sk-test-{secrets.token_hex(8)}"
    proc = run_dft("train", "configs/full.yaml", f"output.dir={run}", *SMALL,
                   "logging.trackers=[tensorboard,mlflow,wandb]", "logging.wandb.mode=offline",
                   "logging.project=dft-test", "logging.run_name=tracked",
                   env={"WANDB_MODE": "offline", "WANDB_API_KEY": key, "MLFLOW_TRACKING_TOKEN": key})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, key


def _losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_tensorboard_holds_the_logged_losses(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = tracked_run
    events = sorted(run.rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file in the run folder"
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        if "loss/all" in acc.Tags()["scalars"]:  # `loss` heads the per-task `loss/<task>` group
            scalars = {e.step: e.value for e in acc.Scalars("loss/all")}
    assert scalars == pytest.approx(_losses(run), rel=1e-6) and len(scalars) == 4


def test_mlflow_file_store_in_the_run_holds_losses_and_config(tracked_run):
    import mlflow

    run, _ = tracked_run
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("dft-test")
    (found,) = client.search_runs([experiment.experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss/all")}
    assert history == pytest.approx(_losses(run), rel=1e-6)
    assert found.data.params["training.max_steps"] == "4" and found.info.run_name == "tracked"
    assert any(k.startswith("eval/") for k in found.data.metrics)  # the final evaluation reached it too


def test_wandb_offline_run_and_no_key_in_any_file(tracked_run):
    run, key = tracked_run
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    for path in run.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
