"""The trained module of an RL run: the policy alone (critic-free algorithms) or the policy plus a value head
(PPO, on the policy backbone or on a separate base copy).

Policy and critic live in one nn.Module so the launch wraps ONE engine with ONE optimizer (DDP or DeepSpeed,
ZeRO-3 included). `forward(mode=...)` picks what is computed; the reference policy of PEFT strategies is the
same module with its adapter disabled, so no second copy of the weights exists.
"""
from __future__ import annotations

from torch import nn


def is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a core dependency
        return False
    return isinstance(model, PeftModel)


def _kept(logits_to_keep: int | None) -> dict:
    """The causal LM's logits_to_keep argument, passed only when set (not every model takes it)."""
    return {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}


def backbone_of(causal_lm: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (LlamaModel inside LlamaForCausalLM): hidden states without the head."""
    body = getattr(causal_lm, "base_model_prefix", None)
    return getattr(causal_lm, body) if body and hasattr(causal_lm, body) else causal_lm


class Policy(nn.Module):
    """The trained policy as the RL loop sees it: `forward(mode=...)` gives response logits from the policy or
    (PEFT) the reference with the adapter disabled. The critic-free algorithms train exactly this: no value
    head, no critic copy, no optimizer state for either."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        # accelerate fills DeepSpeed's "auto" bucket sizes from `model.config.hidden_size`.
        self.config = getattr(policy, "config", None)

    # What trl's unwrap_model_for_generation asks of the module it unwraps.
    @property
    def is_gradient_checkpointing(self) -> bool:
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
            if hasattr(type(self.policy), name) or hasattr(self.policy, name):
                return bool(getattr(self.policy, name))
        return False

    def gradient_checkpointing_disable(self) -> None:
        self.policy.gradient_checkpointing_disable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def generate(self, *args, **kwargs):
        """The policy's generate: code that evaluates a causal LM can take this module as one."""
        return self.policy.generate(*args, **kwargs)

    def adapter_disabled(self):
        """A context in which the policy is its reference: a PEFT policy with its adapter disabled."""
        if not is_peft(self.policy):
            raise RuntimeError("the reference of a non-PEFT policy is a separate frozen model")
        return self.policy.disable_adapter()

    def forward(self, input_ids, attention_mask=None, position_ids=None, mode: str | None = None,
                logits_to_keep: int | None = None, **kwargs):
        """mode: "policy" -> (logits, None); "reference" -> (logits, None); None -> the policy's own output (so
        evaluation code sees a plain causal LM). `logits_to_keep` goes to the causal LM (1: the chunked
        log-probs read the hidden states instead)."""
        kept = _kept(logits_to_keep)
        if mode is None:
            return self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               **kept, **kwargs)
        length = input_ids.shape[1]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **kept}
        if mode == "reference":
            with self.adapter_disabled():
                return self.policy(**inputs).logits[:, -length:], None
        if mode != "policy":
            raise ValueError(f"a policy without a value head has no mode {mode!r}")
        # prompt-learning adapters prepend virtual tokens: keep the positions of the inputs
        return self.policy(**inputs, use_cache=False).logits[:, -length:], None


class PolicyWithValue(Policy):
    """PPO's module: the policy plus a value head (on the policy backbone or on a separate base copy)."""

    def __init__(self, policy: nn.Module, hidden_size: int, critic_backbone: nn.Module | None = None):
        super().__init__(policy)
        self.critic_backbone = critic_backbone  # None: the value head reads the policy's last hidden state
        self.value_head = nn.Linear(hidden_size, 1)
        # A zero value head starts every value at 0: advantages begin as plain (KL-shaped) returns.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def shared(self) -> bool:
        return self.critic_backbone is None

    def forward(self, input_ids, attention_mask=None, position_ids=None, mode: str | None = None,
                logits_to_keep: int | None = None, **kwargs):
        """mode "policy_value" -> (logits, values); the others as Policy."""
        if mode != "policy_value":
            return super().forward(input_ids, attention_mask, position_ids, mode=mode, logits_to_keep=logits_to_keep,
                                   **kwargs)
        length = input_ids.shape[1]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        out = self.policy(**inputs, output_hidden_states=self.shared, use_cache=False, **_kept(logits_to_keep))
        logits = out.logits[:, -length:]
        if self.shared:
            hidden = out.hidden_states[-1][:, -length:]
        else:
            hidden = self.critic_backbone(**inputs, use_cache=False).last_hidden_state
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return logits, values
