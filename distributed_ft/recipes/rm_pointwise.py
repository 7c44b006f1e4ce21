"""`dft rm` with `rm.objective: pointwise`: a grader model, (prompt, output, reference) -> score by regression
on graded samples (from `dft grader label`, or the built-in ones), reported as agreement with the grader
whose scores it learned: Pearson, Spearman, MAE and accuracy at `rm.threshold` on held-out samples, a
calibration plot (calibration.png) and both graders' samples/s on those samples."""
from __future__ import annotations

import torch

from distributed_ft.recipes.rm import RMRun


class PointwiseRun(RMRun):
    metric_names = ["mae"]

    def grader_input(self) -> list[dict]:
        from distributed_ft.preference.render import pointwise_input

        return pointwise_input(self.tokenizer)

    def load_data(self, render):
        from distributed_ft.preference.graded import build_graded, source_grader_spec

        # read now, so that a bad `samples.grader` fails before training rather than after it
        self.source_spec = source_grader_spec(self.config.samples)
        train, self.held_rows = build_graded(self.config.samples, self.config.training.seed)
        return train, self.held_rows

    def tokenize(self, row: dict) -> dict:
        from distributed_ft.preference.render import pointwise_text

        text = pointwise_text(self.tokenizer, row["prompt"], row["output"], row["reference"])
        ids = self.tokenizer(text, truncation=True, max_length=self.config.samples.max_length)["input_ids"]
        return {"input_ids": list(ids), "score": row["score"]}

    def _predict(self, model, examples: list[dict]):
        from distributed_ft.engine.padding_free import flat_scores

        device = self.accelerator.device
        target = torch.tensor([e["score"] for e in examples], device=device)
        if self.not_padding_free is None:  # RMRun.before_training
            rows = [e["input_ids"] for e in examples]
            return flat_scores(model, rows, self.tokenizer.pad_token_id)[:, 0].float(), target
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), int(self.tokenizer.pad_token_id), dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, e in enumerate(examples):
            input_ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
            attention[i, :len(e["input_ids"])] = 1
        predicted = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, 0].float()
        return predicted, target

    def pair_loss(self, model, indices: list[int]):
        predicted, target = self._predict(model, [self.train_pairs[i] for i in indices])
        return (predicted - target) ** 2, {"mae": (predicted - target).detach().abs()}

    def pair_scores(self, model, indices: list[int]):
        return self._predict(model, [self.held_pairs[i] for i in indices])

    def held_metrics(self, scores: torch.Tensor) -> dict:
        from distributed_ft.preference.evaluate import agreement_metrics

        return agreement_metrics(scores[:, 0], scores[:, 1], self.config.rm.threshold)

    def report_extras(self, tag: str, scores: torch.Tensor) -> dict:
        """After training: the calibration plot and both graders' speed on the held-out samples."""
        from distributed_ft.engine.logging import logger
        from distributed_ft.preference.evaluate import calibration_bins, plot_calibration

        if tag != "final":
            return {}
        predicted, source = scores[:, 0], scores[:, 1]
        bins = calibration_bins(predicted, source)
        plot = self.run_dir / "calibration.png"
        plot_calibration(plot, predicted, source, bins, f"pointwise grader, {len(source)} held-out samples")
        logger.info(f"calibration plot (binned predicted score against mean source score): {plot}")
        return {"calibration": {"plot": plot.name, "bins": bins}, "samples_per_s": self.grader_speeds()}

    def grader_speeds(self, batch_size: int = 64) -> dict:
        """Samples/s of the source grader and of the served trained model (grader.yaml), each run through the
        grader engine as `dft grader label` runs it, on the same held-out samples; None where one is missing."""
        from distributed_ft.engine.logging import logger
        from distributed_ft.grader.engine import build_grader, load_grader
        from distributed_ft.preference.graded import grader_samples_per_s

        served = self.run_dir / "grader.yaml"  # absent when an adapter could not be merged for serving
        speeds = {"samples": len(self.held_rows), "batch_size": batch_size, "source_grader": None,
                  "model_grader": None}
        for key, make in (("source_grader", lambda: build_grader(self.source_spec) if self.source_spec else None),
                          ("model_grader", lambda: load_grader(served) if served.is_file() else None)):
            grader = make()
            if grader is None:
                continue
            try:
                speeds[key] = grader_samples_per_s(grader, self.held_rows, batch_size)
            finally:
                grader.close()
        rate = lambda v: "not measured" if v is None else f"{v:,.0f} samples/s"  # noqa: E731
        logger.info(f"graders on the {len(self.held_rows)} held-out samples: source grader "
                    f"{rate(speeds['source_grader'])}, trained model grader {rate(speeds['model_grader'])}")
        return speeds
