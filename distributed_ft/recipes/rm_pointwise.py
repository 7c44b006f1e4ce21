"""`dft rm` with `rm.objective: pointwise`: a grader model, (prompt, output, reference) -> score by regression
on graded samples (from `dft grader label`, or the built-in ones), reported as agreement with the grader
whose scores it learned: Pearson, Spearman, MAE and accuracy at `rm.threshold` on held-out samples."""
from __future__ import annotations

import torch

from distributed_ft.recipes.rm import RMRun


class PointwiseRun(RMRun):
    metric_names = ["mae"]
    pointwise = True

    def load_data(self, render):
        from distributed_ft.preference.graded import build_graded

        return build_graded(self.config.samples, self.config.training.seed)

    def tokenize(self, row: dict) -> dict:
        from distributed_ft.preference.render import pointwise_text

        text = pointwise_text(self.tokenizer, row["prompt"], row["output"], row["reference"])
        ids = self.tokenizer(text, truncation=True, max_length=self.config.samples.max_length)["input_ids"]
        return {"input_ids": list(ids), "score": row["score"]}

    def _predict(self, model, examples: list[dict]):
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), int(self.tokenizer.pad_token_id), dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, e in enumerate(examples):
            input_ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
            attention[i, :len(e["input_ids"])] = 1
        device = self.accelerator.device
        predicted = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, 0].float()
        return predicted, torch.tensor([e["score"] for e in examples], device=device)

    def pair_loss(self, model, indices: list[int]):
        predicted, target = self._predict(model, [self.train_pairs[i] for i in indices])
        return (predicted - target) ** 2, {"mae": (predicted - target).detach().abs()}

    def pair_scores(self, model, indices: list[int]):
        return self._predict(model, [self.held_pairs[i] for i in indices])

    def held_metrics(self, scores: torch.Tensor) -> dict:
        from distributed_ft.preference.evaluate import agreement_metrics

        return agreement_metrics(scores[:, 0], scores[:, 1], self.config.rm.threshold)
