"""The RL loop of PPO and the critic-free family: rollout (generate -> grade asynchronously -> policy,
reference and value passes) then clipped updates. The algorithm is an objective (rl/objectives.py): its
advantages and per-token loss; everything else here is shared.

Every rank takes its own slice of each step's prompts, with all `num_generations` samples of a prompt on the
same rank (groups are whole on one rank). Statistics that steer the update (reward normalisation, advantage
whitening, the per-minibatch denominators that scale the loss) are reduced over all ranks, so N ranks compute
the same update as one process holding the whole batch. Unscorable samples (the grader failed on them) are
masked out of the update and counted; above `unscorable_threshold` the run saves a checkpoint and stops with
GraderUnavailable.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distributed_ft.engine.chunked_loss import chunked_logprob_paths
from distributed_ft.engine.distributed import report_device, uses_deepspeed
from distributed_ft.engine.logging import logger
from distributed_ft.engine.loop import LoopControl
from distributed_ft.rl.prompts import PromptStream
from distributed_ft.rl.rollout import (Rollout, concat_rollouts, decode, encode_queries, generate, response_mask,
                                       score_tokens, select_rollout)


@dataclass
class RLResult:
    step: int
    rows: list[dict] = field(default_factory=list)
    stopped_by: str | None = None
    resumed_from: str | None = None


class RLTrainer:
    def __init__(self, *, config, section: str, make_objective, accelerator, model, optimizer, scheduler,
                 reference, tokenizer, prompts, grader, run_dir: Path, run_logger):
        """section: the config section of the algorithm ("ppo" or "grpo"); make_objective(section config,
        reduce, eos_id) builds its objective."""
        self.config, self.training = config, config.training
        self.ppo = getattr(config, section)  # the rollout settings every algorithm shares (RolloutConfig)
        self.acc, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.reference = reference  # None: the policy with its adapter disabled (or no KL term at all)
        self.tokenizer, self.prompts, self.grader = tokenizer, prompts, grader
        self.run_dir, self.log = Path(run_dir), run_logger
        self.seed = config.training.seed
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.objective = make_objective(self.ppo, self._sum, self.eos_id)
        self.stream = PromptStream(len(prompts.train) if prompts else 1, self.seed)
        # the chunked log-prob paths (engine/chunked_loss.py) of the causal LM inside the trained module and of
        # the frozen reference
        self.policy_head, self.reference_head = chunked_logprob_paths(
            self.acc, self.training.loss_chunk_tokens, self.acc.unwrap_model(self.model).policy, self.reference,
            f"{section} policy log-probs", f"{section} reference log-probs")

    # -- collectives -----------------------------------------------------------------------------------------
    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.acc.num_processes == 1:
            return t
        return self.acc.reduce(t.to(self.acc.device), reduction="sum").cpu()

    def _max(self, t: torch.Tensor) -> torch.Tensor:
        if self.acc.num_processes == 1:
            return t
        return self.acc.gather(t.reshape(1, -1).to(self.acc.device)).max(0).values.cpu()

    # -- rollout -----------------------------------------------------------------------------------------------
    def _generate(self, prompts: list[str], *, sample: bool, batch: int | None = None) -> tuple:
        from trl.models.utils import unwrap_model_for_generation

        from distributed_ft.engine.distributed import zero_stage

        query, query_mask = encode_queries(self.tokenizer, prompts) if prompts else (None, None)
        synced = self.acc.num_processes > 1 and zero_stage(self.acc) == 3
        responses = []
        self.model.eval()
        # Under ZeRO-3 the parameters are gathered once for the whole batch (a collective: every rank enters).
        with unwrap_model_for_generation(self.model, self.acc) as unwrapped:
            step = batch or max(1, len(prompts))
            for i in range(0, len(prompts), step):
                responses.append(generate(
                    unwrapped.policy, query[i:i + step].to(self.acc.device), query_mask[i:i + step].to(self.acc.device),
                    max_new_tokens=self.ppo.max_new_tokens, do_sample=sample, temperature=self.ppo.temperature,
                    top_p=self.ppo.top_p, eos_id=self.eos_id, pad_id=self.pad_id, synced=synced).cpu())
        if not prompts:
            return None, None, None
        return query, query_mask, torch.cat(responses)

    @property
    def single_update(self) -> bool:
        """One optimizer step per rollout (one epoch, one minibatch): the update's own forward pass sees the
        policy that sampled, so its log-probs are the old ones (ratio 1) and no scoring pass is needed."""
        training = self.training
        per_rank = self.ppo.rollout_batch_size * self.ppo.num_generations // self.acc.num_processes
        return self.ppo.ppo_epochs == 1 and per_rank == training.micro_batch_size * training.gradient_accumulation_steps

    def _score(self, ro: Rollout) -> None:
        """Old log-probs, entropy, and (when the objective needs them) values and reference log-probs of a
        rollout, in micro-batches. The policy pass is skipped when the update will give the same numbers."""
        micro = self.training.micro_batch_size
        dev = self.acc.device
        mode, want_ref = self.objective.score_mode, self.objective.uses_reference
        want_policy = not self.single_update or self.objective.advantages_read_logprobs
        parts = {"lp": [], "v": [], "ent": [], "ref": []}
        with torch.no_grad():
            for i in range(0, ro.query.shape[0], micro):
                args = [t[i:i + micro].to(dev) for t in (ro.query, ro.query_mask, ro.response, ro.mask)]
                if want_policy:
                    lp, v, ent = score_tokens(self.model, *args, mode=mode, temperature=self.ppo.temperature,
                                              want_entropy=True, chunked=self.policy_head)
                    parts["lp"].append(lp.cpu()), parts["ent"].append(ent.cpu())
                    if v is not None:
                        parts["v"].append(v.cpu())
                if want_ref:
                    parts["ref"].append(self._reference_logprobs(*args).cpu())
        ro.logprobs = torch.cat(parts["lp"]) if parts["lp"] else None
        ro.entropy = torch.cat(parts["ent"]) if parts["ent"] else None
        ro.values = torch.cat(parts["v"]) if parts["v"] else None
        ro.ref_logprobs = torch.cat(parts["ref"]) if parts["ref"] else None

    def _reference_logprobs(self, query, query_mask, response, mask) -> torch.Tensor:
        """The frozen copy's log-probs, else the PEFT policy's with its adapter (its head's too) disabled."""
        args, temperature = (query, query_mask, response, mask), self.ppo.temperature
        if self.reference is not None:
            with self.acc.autocast():  # the precision the prepared policy's forward runs in
                return score_tokens(self.reference, *args, mode=None, temperature=temperature,
                                    chunked=self.reference_head)[0]
        with self.acc.unwrap_model(self.model).adapter_disabled():
            return score_tokens(self.model, *args, mode="policy", temperature=temperature, chunked=self.policy_head)[0]

    def local_prompts(self, indices: list[int]) -> list[dict]:
        world, rank = self.acc.num_processes, self.acc.process_index
        share = len(indices) // world
        mine = indices[rank * share:(rank + 1) * share]
        return [self.prompts.train[i] for i in mine for _ in range(self.ppo.num_generations)]

    def rollout(self, entries: list[dict], timings: dict) -> Rollout:
        def spent(key: str, since: float) -> None:  # summed: a step may take several generation rounds
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - since

        started = time.perf_counter()
        prompts = [e["prompt"] for e in entries]
        query, query_mask, response = self._generate(prompts, sample=True)
        mask = response_mask(response, self.eos_id)
        texts = decode(self.tokenizer, response, mask)
        spent("generation", started)
        ro = Rollout(query, query_mask, response, mask, texts, [e["item"] for e in entries], prompts)
        pending = self.grader.submit(texts, ro.items)  # grading overlaps the forward passes below
        started = time.perf_counter()
        self._score(ro)
        spent("forward", started)
        started = time.perf_counter()
        results, latency = pending.result()
        spent("grading_wait", started)
        timings["grader_latency"] = timings.get("grader_latency", 0.0) + latency
        self.apply_grades(ro, results)
        return ro

    def collect(self, timings: dict) -> tuple[Rollout, dict]:
        """One step's rollout. With dynamic sampling (DAPO), groups without a learning signal (equal rewards,
        or under two scorable samples) are replaced by groups of freshly drawn prompts, for at most
        `max_rounds` generation rounds. Every rank runs the same rounds and generates as many groups as the
        rank that needs most (generation under ZeRO-3 is collective); each keeps what it needs."""
        ppo, k = self.ppo, self.ppo.num_generations
        ro = self.rollout(self.local_prompts(self.stream.take(ppo.rollout_batch_size)), timings)
        sampling = getattr(ppo, "dynamic_sampling", None)
        if sampling is None or not sampling.enabled:
            return ro, {}  # nothing to report: one round, nothing replaced
        info = {"sampling_rounds": 1, "groups_replaced": 0}
        for _ in range(sampling.max_rounds - 1):
            useless = self.objective.useless_groups(ro)
            most = int(self._max(torch.tensor([float(useless.sum())]))[0])
            if most == 0:
                break
            fresh = self.rollout(self.local_prompts(self.stream.take(ppo.rollout_batch_size))[:most * k], timings)
            good = (~self.objective.useless_groups(fresh)).nonzero().flatten()[:int(useless.sum())].tolist()
            bad = set(useless.nonzero().flatten()[:len(good)].tolist())
            rows = lambda groups: [g * k + j for g in groups for j in range(k)]  # noqa: E731
            kept = [g for g in range(len(useless)) if g not in bad]
            ro = concat_rollouts([select_rollout(ro, rows(kept)), select_rollout(fresh, rows(good))], self.pad_id)
            info["sampling_rounds"] += 1
            info["groups_replaced"] += len(good)
        info["groups_replaced"] = int(self._sum(torch.tensor([float(info["groups_replaced"])]))[0])
        return ro, info

    @staticmethod
    def apply_grades(ro: Rollout, results) -> None:
        ro.scores = torch.tensor([r.reward if r.reward is not None else 0.0 for r in results], dtype=torch.float32)
        ro.scorable = torch.tensor([r.reward is not None for r in results], dtype=torch.float32)
        ro.errors = [r.error for r in results]

    # -- advantages --------------------------------------------------------------------------------------------
    def advantages(self, ro: Rollout) -> dict:
        return self.objective.advantages(ro)

    # -- update ------------------------------------------------------------------------------------------------
    def update(self, ro: Rollout, adv: dict, step: int) -> dict:
        """`ppo_epochs` passes over the rollout in minibatches; importance ratios are taken against the
        rollout's log-probs. Returns token-weighted statistics reduced over ranks."""
        acc, training, ppo = self.acc, self.training, self.ppo
        micro, accum, world = training.micro_batch_size, training.gradient_accumulation_steps, acc.num_processes
        share = micro * accum
        n = ro.query.shape[0]
        n_mb = n // share
        mask, units = adv["mask"], adv["units"]
        tensors = {k: v for k, v in adv.items() if isinstance(v, torch.Tensor) and v.shape[:1] == (n,)}
        from_update = ro.logprobs is None  # no scoring pass (single_update): this pass gives the old log-probs
        if from_update:
            ro.logprobs, ro.entropy = torch.zeros_like(ro.mask), torch.zeros_like(ro.mask)
        tensors["old_logprobs"] = ro.logprobs
        perms = [torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + step * 101 + e))
                 for e in range(ppo.ppo_epochs)]
        local = torch.tensor([[units[p[m * share:(m + 1) * share]].sum() for m in range(n_mb)] for p in perms],
                             dtype=torch.float64)
        denominators = self._sum(local)  # each global minibatch's loss is a sum over it divided by these
        names = self.objective.stat_names
        stats = torch.zeros(len(names) + 1, dtype=torch.float64)
        dev = acc.device
        self.model.train()
        for e, perm in enumerate(perms):
            for m in range(n_mb):
                if denominators[e, m] == 0:  # nothing of this minibatch takes part on any rank
                    continue
                for a in range(accum):
                    idx = perm[m * share + a * micro:m * share + (a + 1) * micro]
                    args = [t[idx].to(dev) for t in (ro.query, ro.query_mask, ro.response, ro.mask)]
                    batch = {k: v[idx].to(dev) for k, v in tensors.items()}
                    mk = batch["mask"]
                    with acc.accumulate(self.model):
                        lp, values, ent = score_tokens(self.model, *args, mode=self.objective.score_mode,
                                                       temperature=ppo.temperature, want_entropy=True,
                                                       chunked=self.policy_head)
                        if from_update:
                            batch["old_logprobs"] = lp.detach()
                            ro.logprobs[idx], ro.entropy[idx] = lp.detach().cpu(), ent.detach().cpu()
                        loss, parts = self.objective.token_loss(lp, values, ent, batch)
                        total = (loss * batch["weights"]).sum()
                        acc.backward(total / float(denominators[e, m]) * world * accum)
                        if acc.sync_gradients and training.max_grad_norm and not uses_deepspeed(acc):
                            acc.clip_grad_norm_(self.model.parameters(), training.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        stats += torch.stack([(x * mk).sum().double().cpu() for x in (*parts, mk)])
        stats = self._sum(stats)
        tokens = max(float(stats[-1]), 1.0)
        return {name: float(stats[i] / tokens) for i, name in enumerate(names)}

    # -- evaluation --------------------------------------------------------------------------------------------
    def evaluate_reward(self, entries: list[dict], batch_size: int = 64) -> dict:
        """Greedy responses to held-out prompts (sharded over ranks), graded; mean reward over all ranks."""
        world, rank = self.acc.num_processes, self.acc.process_index
        mine = entries[rank::world]
        # Every rank generates the same number of batches (a ZeRO-3 requirement): pad with repeats, drop after.
        padded = mine + [entries[0]] * (-(-len(entries) // world) - len(mine)) if entries else []
        _, _, response = self._generate([e["prompt"] for e in padded], sample=False, batch=batch_size)
        total = torch.zeros(3, dtype=torch.float64)
        if mine:
            response = response[:len(mine)]
            mask = response_mask(response, self.eos_id)
            texts = decode(self.tokenizer, response, mask)
            results, _ = self.grader.submit(texts, [e["item"] for e in mine]).result()
            rewards = [r.reward for r in results if r.reward is not None]
            total += torch.tensor([sum(rewards), len(rewards), len(results) - len(rewards)], dtype=torch.float64)
        total = self._sum(total)
        scored = int(total[1])
        return {"mean_reward": float(total[0] / scored) if scored else None, "scored": scored,
                "unscorable": int(total[2]), "prompts": len(entries)}

    # -- the loop ----------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {**self.objective.state_dict(), "prompts": self.stream.state_dict()}

    def train(self) -> RLResult:
        from distributed_ft.grader.client import GraderUnavailable

        ppo, training = self.ppo, self.training
        report_device(self.acc)
        result = RLResult(step=0)
        with LoopControl(self.acc, training, self.run_dir, self.log) as loop:
            resumed = loop.resume()
            if resumed is not None:
                self.objective.load_state_dict(resumed.state)
                self.stream.load_state_dict(resumed.state["prompts"])
                result.step, result.resumed_from = resumed.step, resumed.folder
            while result.step < training.max_steps:
                started = time.perf_counter()
                timings: dict[str, float] = {}
                ro, sampling = self.collect(timings)
                counts = self._sum(torch.tensor([len(ro.texts), float((1 - ro.scorable).sum())], dtype=torch.float64))
                rate = float(counts[1] / counts[0])
                if rate > ppo.unscorable_threshold:
                    folder = loop.save(result.step, self.state())
                    errors = sorted({e for e in ro.errors if e})[:1]
                    raise GraderUnavailable(
                        f"{int(counts[1])}/{int(counts[0])} samples unscorable at step {result.step + 1} "
                        f"({rate:.0%} > ppo.unscorable_threshold {ppo.unscorable_threshold:.0%}); checkpoint saved "
                        f"to {folder}; fix the grader and rerun with training.resume_from=latest"
                        + (f" (first error: {errors[0]})" if errors else ""))
                t_adv = time.perf_counter()
                adv = self.advantages(ro)
                timings["forward"] += time.perf_counter() - t_adv
                t_upd = time.perf_counter()
                losses = self.update(ro, adv, result.step)
                timings["update"] = time.perf_counter() - t_upd
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                result.step += 1
                row = {**self._rollout_stats(ro, counts, rate), **self.objective.step_stats(ro, adv), **sampling}
                self.objective.after_step(row, int(counts[0]))
                elapsed = time.perf_counter() - started
                slowest = self._max(torch.tensor([timings[k] for k in ("generation", "forward", "grading_wait",
                                                                        "update", "grader_latency")] + [elapsed]))
                row = {"step": result.step, **row, **losses, "lr": lr,
                       "time/generation": float(slowest[0]), "time/forward": float(slowest[1]),
                       "time/grading_wait": float(slowest[2]), "time/update": float(slowest[3]),
                       "grader_latency_s": float(slowest[4]), "time/step": float(slowest[5]),
                       "samples_per_s": float(counts[0]) / max(float(slowest[5]), 1e-9)}
                result.rows.append(row)
                self._log(row)
                if result.step % ppo.sample_every == 0 or result.step == 1:
                    self._log_samples(result.step, ro)
                if loop.end_of_step(result.step, self.state):
                    result.stopped_by = loop.stopped_by
                    break
        return result

    def _rollout_stats(self, ro: Rollout, counts, rate: float) -> dict:
        ok = ro.scorable
        has_ref = ro.ref_logprobs is not None  # no KL term: no reference model, no KL to report
        seq_kl = ((ro.logprobs - ro.ref_logprobs) * ro.mask).sum(1) if has_ref else torch.zeros(len(ok))
        lengths = ro.mask.sum(1)
        ent = (ro.entropy * ro.mask).sum()
        s = self._sum(torch.stack([
            (ro.scores * ok).sum(), (ro.scores ** 2 * ok).sum(), ok.sum(), seq_kl.sum(), lengths.sum(),
            ent, ro.mask.sum()]).double())
        n_ok, n = float(s[2]), float(counts[0])
        mean = float(s[0]) / n_ok if n_ok else None  # no sample scored: no mean reward, never a made-up 0
        std = max(float(s[1]) / n_ok - mean * mean, 0.0) ** 0.5 if n_ok else None
        return {"reward_mean": mean, "reward_std": std, "kl": float(s[3]) / n if has_ref else None,
                "rollout_entropy": float(s[5]) / max(float(s[6]), 1.0), "response_length": float(s[4]) / n,
                "unscorable_rate": rate, "unscorable": int(counts[1]), "samples": int(n)}

    def _log(self, row: dict) -> None:
        step = row["step"]
        if step % self.config.logging.log_every == 0 or step == 1 or step == self.training.max_steps:
            self.log.log(row)
        reward = row["reward_mean"]
        kl = row["kl"]
        self.log.progress(step, reward="n/a" if reward is None else f"{reward:.3f}",
                          kl="n/a" if kl is None else f"{kl:.3f}")

    def _log_samples(self, step: int, ro: Rollout) -> None:
        if not self.acc.is_main_process or not self.ppo.num_logged_samples:
            return
        rows = []
        for i in range(min(self.ppo.num_logged_samples, len(ro.texts))):
            reward = float(ro.scores[i]) if ro.scorable[i] > 0 else None
            rows.append({"step": step, "prompt": ro.prompts[i], "completion": ro.texts[i], "reward": reward})
            logger.info(f"sample step {step}: {ro.prompts[i]!r} -> {ro.texts[i]!r} reward {reward}")
        with open(self.run_dir / "samples.jsonl", "a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
