"""`dft dpo`: offline preference optimisation (DPO, IPO, hinge, SimPO) of a causal LM with any strategy.

The reference is the policy with its adapter disabled for PEFT strategies (no second copy of the weights),
else a frozen copy of the base (loaded sharded under ZeRO-3), or log-probs precomputed in one pass
and kept in the run folder (`dpo.reference: precomputed`), so a resume reuses them. Log-probs come from the
LM head applied a chunk of tokens at a time (training.loss_chunk_tokens, engine/chunked_loss.py) where the
model allows it, never from a whole batch's full-vocabulary logits.
"""
from __future__ import annotations

import contextlib

import torch

from distributed_ft.errors import ModelError
from distributed_ft.recipes.pair_run import PairRun, run_pairs

REFERENCE_FILE = "reference_logps.safetensors"


class DPORun(PairRun):
    kind = "dpo"
    model_task = "causal_lm"
    metric_names = ["rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
                    "logps/rejected"]

    def tokenize(self, pair: dict) -> dict:
        from distributed_ft.preference.batches import tokenize_lm_pair

        pairs = self.config.pairs
        return tokenize_lm_pair(self.tokenizer, pair, pairs.max_length, pairs.prompt_limit)

    def after_model(self) -> None:
        self.dpo = self.config.dpo
        self.reference = None
        # the chunked log-prob paths of the policy and the frozen reference, chosen once they are wrapped
        self.policy_head = self.reference_head = None
        self.precomputed: dict[str, torch.Tensor] = {}
        if self.dpo.loss != "simpo" and self.dpo.reference == "live" and not _is_peft(self.model):
            from distributed_ft.engine.distributed import deepspeed_requested

            # The base loaded again, not a deep copy: hook-based adapters would keep running the policy's own
            # modules in a copy, and under ZeRO-3 the weights are already shards (zero.Init) a copy cannot use.
            reference = self.load_base()
            if not (deepspeed_requested() and self.accelerator.state.deepspeed_plugin.zero_stage == 3):
                # the policy's own base weights, new embedding rows included
                missing = reference.load_state_dict(self.model.state_dict(), strict=False).missing_keys
                if missing:
                    raise ModelError(f"the DPO reference cannot take the policy's weights ({missing[0]} is "
                                     "missing); use dpo.reference: precomputed")
            self.reference = reference.requires_grad_(False).eval()

    def before_training(self) -> None:
        from distributed_ft.engine.chunked_loss import chunked_logprob_paths
        from distributed_ft.engine.distributed import zero_stage

        if self.reference is not None:
            if zero_stage(self.accelerator) == 3:
                from trl.models.utils import prepare_deepspeed

                self.reference = prepare_deepspeed(self.reference, self.accelerator)  # sharded like the policy
            else:
                self.reference = self.reference.to(self.accelerator.device)
            self._record_reference()
        # collective under ZeRO-3 (a probe forward of each model): every rank, here
        self.policy_head, self.reference_head = chunked_logprob_paths(
            self.accelerator, self.config.training.loss_chunk_tokens, self.model, self.reference, "dpo log-probs",
            "dpo reference log-probs")
        if self.dpo.loss != "simpo" and self.dpo.reference == "precomputed":
            self._precompute()

    def make_evaluation(self):
        """Generations for the held-out prompts scored against their chosen answers, as `dft train` scores
        its validation data: report.md beside the pairwise figures."""
        from distributed_ft.eval.session import EvalInputs, RunEvaluation, run_metadata

        if not self.config.eval.enabled:
            return None
        records = [{"task": p["task"], "prompt": p["prompt"], "reference": p["chosen"]} for p in self.held_rows]
        log = self.run_logger
        return RunEvaluation(EvalInputs(
            model=self.model, tokenizer=self.tokenizer, accelerator=self.accelerator, records=records,
            task_types={r["task"]: "generation" for r in records}, config=self.config.eval, out_dir=self.run_dir,
            metadata=run_metadata(self.model_path, self.strategy.name, self.config),
            log=log.log, log_final=log.log_to_tracker))

    def _record_reference(self) -> None:
        """What each rank holds of the frozen reference, next to the policy's figures (ranks/rank-N.json)."""
        from distributed_ft.engine.rundir import record_rank

        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.reference.parameters())
        record_rank(self.accelerator, self.run_dir, [self.model], reference_local_parameters=held)

    def _precompute(self) -> None:
        """Collective: reference log-probs of every train and held-out pair, read back on a resume."""
        from safetensors.torch import load_file, save_file

        from distributed_ft.engine.logging import logger
        from distributed_ft.preference.loop import sharded_map

        path = self.run_dir / REFERENCE_FILE
        sizes = {"train": len(self.train_pairs), "held": len(self.held_pairs)}
        if path.is_file():
            saved = load_file(str(path))
            if all(saved[k].shape[0] == n for k, n in sizes.items()):
                self.precomputed = saved
                logger.info(f"reference log-probs read from {path}")
                return
        self.model.eval()
        for split, examples in (("train", self.train_pairs), ("held", self.held_pairs)):
            def score(indices, examples=examples):
                with torch.no_grad():
                    return self._reference_forward(self.model, [examples[i] for i in indices]).view(2, -1).T
            self.precomputed[split] = sharded_map(self.accelerator, len(examples), self.config.training.micro_batch_size,
                                                  score).contiguous()
        self.model.train()
        if self.accelerator.is_main_process:
            save_file(self.precomputed, str(path))
        self.accelerator.wait_for_everyone()
        logger.info(f"reference log-probs of {sizes['train']} + {sizes['held']} pairs written to {path}")

    # --- scoring -----------------------------------------------------------------------------------------
    def _logps(self, model, examples: list[dict], head=None):
        """(summed completion log-probs, completion tokens) per row, rows [chosen; rejected], scored in
        length groups (PairRun.pass_cost); `head` is the model's chunked path (None: full logits)."""
        from distributed_ft.preference.batches import collate_lm_pairs, score_in_groups
        from distributed_ft.preference.losses import labelled_tokens, sequence_logps

        batch = collate_lm_pairs(examples, self.tokenizer.pad_token_id)
        device = self.accelerator.device

        def score(rows, width):
            ids, mask, labels = (batch[k][rows, :width].to(device) for k in ("input_ids", "attention_mask", "labels"))
            inputs = {"input_ids": ids, "attention_mask": mask}
            if head is not None:
                logprobs, _, _ = head.token_logprobs(model, inputs, labels)
                return logprobs.sum(-1), labelled_tokens(labels)
            logits = model(**inputs).logits
            # prompt-learning adapters prepend virtual tokens to the outputs: keep the real tokens' positions
            return sequence_logps(logits[:, -width:], labels)

        return score_in_groups(batch["attention_mask"].sum(1), self.pass_cost, score)

    def _reference_forward(self, policy, examples: list[dict]) -> torch.Tensor:
        """[2B] reference log-probs: the frozen copy, or the policy with its adapter disabled."""
        with torch.no_grad():
            if self.reference is not None:
                with self.accelerator.autocast():
                    return self._logps(self.reference, examples, self.reference_head)[0]
            # the head's adapter too (LoRA on lm_head, modules_to_save) is off while the chunks are scored
            with _adapter_disabled(self.accelerator.unwrap_model(policy)):
                return self._logps(policy, examples, self.policy_head)[0]

    def _reference(self, policy, split: str, indices: list[int], examples: list[dict]) -> torch.Tensor:
        if self.dpo.loss == "simpo":
            return torch.zeros(2 * len(examples), device=self.accelerator.device)
        if self.precomputed:
            ref = self.precomputed[split][indices]
            return ref.T.reshape(-1).to(self.accelerator.device)
        return self._reference_forward(policy, examples)

    def _loss(self, model, split: str, indices: list[int]):
        from distributed_ft.preference.losses import dpo_loss

        examples = [(self.train_pairs if split == "train" else self.held_pairs)[i] for i in indices]
        logps, tokens = self._logps(model, examples, self.policy_head)
        ref = self._reference(model, split, indices, examples)
        b = len(examples)
        loss, chosen, rejected = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], tokens[:b], tokens[b:],
                                          loss=self.dpo.loss, beta=self.dpo.beta,
                                          label_smoothing=self.dpo.label_smoothing, simpo_gamma=self.dpo.simpo_gamma)
        return loss, chosen, rejected, logps[:b].detach(), logps[b:].detach()

    def pair_loss(self, model, indices: list[int]):
        loss, chosen, rejected, lp_c, lp_r = self._loss(model, "train", indices)
        return loss, {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margin": chosen - rejected,
                      "rewards/accuracy": (chosen > rejected).float(), "logps/chosen": lp_c, "logps/rejected": lp_r}

    def pair_scores(self, model, indices: list[int]):
        _, chosen, rejected, _, _ = self._loss(model, "held", indices)
        return chosen.detach(), rejected.detach()


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def _adapter_disabled(model):
    return model.disable_adapter() if _is_peft(model) else contextlib.nullcontext()


def run(config_path: str, overrides: list[str]) -> int:
    return run_pairs(DPORun(config_path, overrides))
