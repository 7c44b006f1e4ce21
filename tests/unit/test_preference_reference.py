"""The DPO reference: a PEFT policy's reference is the policy with its adapter disabled (no second copy of the
weights); a fully trained policy gets a frozen copy that training does not move."""
from __future__ import annotations

import torch

from distributed_ft.recipes.dpo import DPORun

SMALL = ["pairs.train.0.num_examples=40", "logging.progress_bar=false"]


def test_peft_reference_is_the_policy_with_its_adapter_disabled(tmp_path):
    job = DPORun("configs/dpo/quickstart.yaml", [f"output.dir={tmp_path / 'lora'}", *SMALL]).build()
    assert job.reference is None
    examples = job.train_pairs[:3]
    before = job._reference_forward(job.model, examples)
    with torch.no_grad():
        for name, param in job.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)      # the adapter now changes the policy
        policy, _ = job._logps(job.model, examples)
    after = job._reference_forward(job.model, examples)
    torch.testing.assert_close(after, before)
    assert (policy - after).abs().max() > 1e-3
    # no tensor of the policy is held twice: every parameter storage is distinct
    storages = [p.data_ptr() for p in job.model.parameters()]
    assert len(storages) == len(set(storages))
    job.close()


def test_a_full_policy_gets_a_frozen_copy(tmp_path):
    job = DPORun("configs/dpo/quickstart.yaml", [f"output.dir={tmp_path / 'full'}", "strategy={name: full}",
                                                 *SMALL]).build()
    ref, policy = dict(job.reference.named_parameters()), dict(job.model.named_parameters())
    assert ref.keys() == policy.keys() and not any(p.requires_grad for p in ref.values())
    assert all(ref[k].data_ptr() != policy[k].data_ptr() and torch.equal(ref[k], policy[k]) for k in ref)
    examples = job.train_pairs[:2]
    before = job._reference_forward(job.model, examples)
    with torch.no_grad():
        for param in job.model.parameters():
            param.mul_(1.1)
    torch.testing.assert_close(job._reference_forward(job.model, examples), before)
    job.close()


def test_a_hook_adapter_policy_gets_a_reference_without_its_adapters(tmp_path):
    """Bottleneck adapters run through forward hooks; a deep copy would keep calling the policy's adapters."""
    job = DPORun("configs/dpo/quickstart.yaml", [f"output.dir={tmp_path / 'adapters'}",
                                                 "strategy={name: adapters, adapter_size: 8}", *SMALL]).build()
    examples = job.train_pairs[:2]
    before = job._reference_forward(job.model, examples)
    with torch.no_grad():
        trained = [p for p in job.model.parameters() if p.requires_grad]
        assert trained
        for param in trained:
            param.add_(0.1)
        policy, _ = job._logps(job.model, examples)
    torch.testing.assert_close(job._reference_forward(job.model, examples), before)
    assert (policy - before).abs().max() > 1e-3
    job.close()
