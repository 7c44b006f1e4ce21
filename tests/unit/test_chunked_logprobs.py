"""Per-token log-probs from the LM head applied a chunk of tokens at a time equal those of full logits: the engine's
function (with temperature and entropy), the DPO loss and the PPO/GRPO policy losses on fixed batches, values and
every trainable gradient, for full and LoRA policies (LoRA on the head included, whose adapter the reference
must leave out too). Tolerances: fp32 summation order, 1e-5 relative on values, 1e-4 relative + 1e-6 absolute on
gradients (as the SFT loss's tests)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from distributed_ft.engine import chunked_loss
from distributed_ft.engine.chunked_loss import chunked_logprobs_for
from distributed_ft.tasks import IGNORE_INDEX
from tests.unit.test_chunked_loss import CHUNK, batch, wrapped

REPO = Path(__file__).resolve().parents[2]
VALUES = dict(rtol=1e-5, atol=1e-6)
GRADS = dict(rtol=1e-4, atol=1e-6)
LORA_ON_HEAD = "strategy.target_modules=[q_proj,v_proj,lm_head]"
FP32 = "training.mixed_precision=no"  # the tolerances are fp32's (the head follows any autocast, test_chunked_loss)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def _own_accelerator_state():
    """The runs here pin fp32, and accelerate keeps one precision per process: its state is dropped around each
    test, so neither these runs nor the next test's inherit another's."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.text = ""

    def emit(self, record) -> None:
        self.text += record.getMessage() + "\n"


@pytest.fixture
def path_log(monkeypatch):
    """The run log's lines (the console setup stops them propagating), each path logged afresh (once per
    process otherwise)."""
    monkeypatch.setattr(chunked_loss, "_logged", set())
    lines, log = _Lines(), logging.getLogger("distributed_ft")
    log.addHandler(lines)
    yield lines
    log.removeHandler(lines)


def trainable_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_grads(chunked: dict, plain: dict) -> None:
    assert chunked.keys() == plain.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(chunked[name], grad, **GRADS, msg=name)


def assert_every_trainable_moves(model, grads: dict) -> None:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(grads) == sorted(trainable)
    assert all(grads[n].abs().max() > 0 for n in trainable), [n for n in trainable if grads[n].abs().max() == 0]


def perturb_adapters(model) -> None:
    """LoRA's B starts at 0 (the adapter does nothing, A gets no gradient): make the adapter count."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)


# ---- the engine function ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["full", "lora", "lora_on_head", "prompt_tuning"])
def test_token_logprobs_and_entropy_equal_full_logits(kind):
    model = wrapped(kind)
    model.train()
    inputs, labels = batch(model.config.vocab_size, model.config.pad_token_id)
    keep = labels[:, 1:] != IGNORE_INDEX
    temperature = 0.7
    head = chunked_logprobs_for(model, CHUNK)
    assert head is not None

    def chunked():
        logprobs, entropy, _ = head.token_logprobs(model, inputs, labels, temperature=temperature, entropy=True)
        return logprobs, entropy

    def plain():
        logits = model(**inputs).logits[:, -labels.shape[1]:][:, :-1].float() / temperature
        logp = torch.log_softmax(logits, -1)
        taken = logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
        return taken * keep, -(logp.exp() * logp).sum(-1) * keep

    results = {}
    for name, compute in (("chunked", chunked), ("plain", plain)):
        logprobs, entropy = compute()
        (logprobs.sum() + 0.3 * entropy.sum()).backward()  # the entropy's gradient too (PPO's entropy bonus)
        results[name] = (logprobs.detach(), entropy.detach(), trainable_grads(model))
    (lp, ent, grads), (lp_full, ent_full, grads_full) = results["chunked"], results["plain"]
    torch.testing.assert_close(lp, lp_full, **VALUES)
    torch.testing.assert_close(ent, ent_full, **VALUES)
    assert (lp[~keep] == 0).all() and (ent[~keep] == 0).all()  # unlabelled positions are not scored
    assert_same_grads(grads, grads_full)
    assert_every_trainable_moves(model, grads)


# ---- DPO ------------------------------------------------------------------------------------------------------

def dpo_job(tmp_path, *extra):
    from distributed_ft.recipes.dpo import DPORun

    overrides = [f"output.dir={tmp_path / 'dpo'}", "pairs.train.0.num_examples=40", "logging.progress_bar=false",
                 "eval.enabled=false", FP32, *extra]
    return DPORun(REPO / "configs" / "dpo" / "quickstart.yaml", overrides).build().prepare()


@pytest.mark.parametrize("strategy", [["strategy={name: full}"], [], [LORA_ON_HEAD]], ids=["full", "lora",
                                                                                       "lora_on_head"])
def test_dpo_loss_and_gradients_equal_full_logits(tmp_path, path_log, strategy):
    job = dpo_job(tmp_path, *strategy)
    full = job.reference is not None
    assert job.policy_head is not None and (job.reference_head is not None) is full
    assert "dpo log-probs: chunked log-softmax over 1024 tokens" in path_log.text
    assert ("dpo reference log-probs: chunked" in path_log.text) is full
    if full:  # the policy moves away from its frozen reference
        with torch.no_grad():
            for param in job.model.parameters():
                param.mul_(1.02)
    else:
        perturb_adapters(job.model)
    indices = list(range(6))
    heads = job.policy_head, job.reference_head
    results = {}
    for name, (policy_head, reference_head) in (("chunked", heads), ("plain", (None, None))):
        job.policy_head, job.reference_head = policy_head, reference_head
        loss, chosen, rejected, _, _ = job._loss(job.model, "train", indices)
        loss.sum().backward()
        results[name] = (loss.detach(), chosen, rejected, trainable_grads(job.model))
    chunked, plain = results["chunked"], results["plain"]
    for got, expected in zip(chunked[:3], plain[:3]):  # per-pair loss, chosen and rejected rewards
        torch.testing.assert_close(got, expected, **VALUES)
    assert (chunked[1] - chunked[2]).abs().max() > 1e-3  # the reference differs from the policy
    assert_same_grads(chunked[3], plain[3])
    assert_every_trainable_moves(job.model, chunked[3])
    job.close()


def test_dpo_takes_full_logits_when_the_setting_is_null(tmp_path, path_log):
    job = dpo_job(tmp_path, "training.loss_chunk_tokens=null")
    assert job.policy_head is None
    assert "dpo log-probs: full-vocabulary logits (training.loss_chunk_tokens is null)" in path_log.text
    job.close()


# ---- PPO and GRPO ----------------------------------------------------------------------------------------------

def rl_run(tmp_path, kind: str, *extra):
    from distributed_ft.recipes.grpo import GRPORun
    from distributed_ft.recipes.ppo import PPORun
    from tests.unit.test_ppo_update import FakeGrader

    overrides = [f"output.dir={tmp_path / kind}", "grader.config=null", "grader.urls=[http://127.0.0.1:9]",
                 "data.train.0.num_examples=40", f"{kind}.rollout_batch_size=4", f"{kind}.num_generations=2",
                 f"{kind}.max_new_tokens=5", f"{kind}.eval_prompts=0", "training.micro_batch_size=4",
                 "training.gradient_accumulation_steps=1", FP32,
                 "logging.progress_bar=false", *extra]
    make = {"ppo": PPORun, "grpo": GRPORun}[kind]
    run = make(REPO / "configs" / kind / "quickstart.yaml", overrides).build().prepare_model()
    run.make_trainer(FakeGrader())
    return run


def fixed_rollout(run):
    """Eight samples (two minibatches: a scoring pass gives the old log-probs) of five tokens; some end early with EOS, so their last positions are not real tokens."""
    from distributed_ft.rl.rollout import Rollout, encode_queries, response_mask

    prompts = ["copy: a b =", "copy: c d e ="] * 4
    query, qmask = encode_queries(run.tokenizer, prompts)
    response = torch.tensor([[10 + i, 11 + i, 12 + i, 13 + i, 14 + i] for i in range(8)])
    eos = run.tokenizer.eos_token_id
    response[1, 2] = response[4, 0] = response[6, 3] = eos
    mask = response_mask(response, eos)
    assert 0 < mask.sum() < mask.numel()
    return Rollout(query, qmask, response, mask, ["x"] * 8, [{}] * 8, prompts)


def policy_loss(run, ro, adv):
    """The update's loss on one micro-batch of the whole rollout (rl/trainer.py RLTrainer.update): per-token loss of
    the objective, aggregation weights, one denominator."""
    from distributed_ft.rl.rollout import score_tokens

    trainer, objective = run.trainer, run.trainer.objective
    n = ro.query.shape[0]
    batch = {k: v for k, v in adv.items() if isinstance(v, torch.Tensor) and v.shape[:1] == (n,)}
    batch["old_logprobs"] = ro.logprobs
    logprobs, values, entropy = score_tokens(run.model, ro.query, ro.query_mask, ro.response, ro.mask,
                                             mode=objective.score_mode, temperature=trainer.ppo.temperature,
                                             want_entropy=True, chunked=trainer.policy_head)
    loss, _ = objective.token_loss(logprobs, values, entropy, batch)
    return (loss * batch["weights"]).sum() / batch["units"].sum()


CASES = {
    "ppo_full": ("ppo", "ppo.entropy_coef=0.01", "ppo.temperature=0.8"),
    "ppo_lora_on_head": ("ppo", "strategy.name=lora", LORA_ON_HEAD, "ppo.entropy_coef=0.01"),
    "grpo_full": ("grpo", "grpo.kl.beta=0.04", "grpo.entropy_coef=0.01", "grpo.temperature=0.8"),
    "grpo_lora": ("grpo", "strategy.name=lora", "grpo.kl.beta=0.04", "grpo.entropy_coef=0.01"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rl_scores_and_policy_loss_equal_full_logits(tmp_path, path_log, case):
    from distributed_ft.grader.results import GradeResult

    kind, *extra = CASES[case]
    run = rl_run(tmp_path, kind, *extra)
    trainer = run.trainer
    frozen = run.reference is not None
    assert trainer.policy_head is not None and (trainer.reference_head is not None) is frozen
    assert f"{kind} policy log-probs: chunked log-softmax over 1024 tokens" in path_log.text
    policy = run.model.policy
    if frozen:  # the policy moves away from its frozen reference
        with torch.no_grad():
            for param in policy.parameters():
                param.mul_(1.02)
    else:
        perturb_adapters(policy)
    if hasattr(run.model, "value_head"):  # a value head that reads the backbone, so its gradient reaches it
        torch.manual_seed(4)
        with torch.no_grad():
            run.model.value_head.weight.normal_(0, 0.05)
    heads = trainer.policy_head, trainer.reference_head
    results = {}
    for name, (policy_head, reference_head) in (("chunked", heads), ("plain", (None, None))):
        trainer.policy_head, trainer.reference_head = policy_head, reference_head
        ro = fixed_rollout(run)
        trainer._score(ro)
        trainer.apply_grades(ro, [GradeResult(reward=float(i % 3)) for i in range(8)])
        adv = trainer.advantages(ro)
        run.model.train()
        loss = policy_loss(run, ro, adv)
        loss.backward()
        results[name] = (ro, loss.detach(), trainable_grads(run.model))
    (ro, loss, grads), (ro_full, loss_full, grads_full) = results["chunked"], results["plain"]
    mask = ro.mask
    for field in ("logprobs", "entropy", "ref_logprobs"):
        torch.testing.assert_close(getattr(ro, field) * mask, getattr(ro_full, field) * mask, **VALUES, msg=field)
        assert (getattr(ro, field)[mask == 0] == 0).all(), field  # past the first EOS nothing is scored
    assert ((ro.logprobs - ro.ref_logprobs) * mask).abs().max() > 1e-3  # the reference differs from the policy
    if ro.values is not None:
        torch.testing.assert_close(ro.values, ro_full.values, **VALUES)
    torch.testing.assert_close(loss, loss_full, **VALUES)
    assert_same_grads(grads, grads_full)
    assert_every_trainable_moves(run.model, grads)


def test_rl_takes_full_logits_when_the_setting_is_null(tmp_path, path_log):
    run = rl_run(tmp_path, "grpo", "training.loss_chunk_tokens=null", "grpo.kl.beta=0.04")
    assert run.trainer.policy_head is None and run.trainer.reference_head is None
    assert "grpo policy log-probs: full-vocabulary logits (training.loss_chunk_tokens is null)" in path_log.text
    assert "grpo reference log-probs: full-vocabulary logits" in path_log.text
