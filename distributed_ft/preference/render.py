"""How a reward model reads a (prompt, completion) and a pointwise grader a (prompt, output, reference):
defined once, for training and for the `score_model` grader that serves the trained model (its spec's
`input` gives the same two messages, see REWARD_INPUT and POINTWISE_INPUT)."""
from __future__ import annotations

# The grader spec's `input` that renders a sample exactly as training did.
REWARD_INPUT = [{"role": "user", "content": "{{ item.prompt }}"},
                {"role": "assistant", "content": "{{ sample.output_text }}"}]


POINTWISE_INPUT = [{"role": "user", "content": "{{ item.prompt }}\nreference: {{ item.reference }}"},
                   {"role": "assistant", "content": "{{ sample.output_text }}"}]


def pointwise_text(tokenizer, prompt: str, output: str, reference: str) -> str:
    from distributed_ft.grader.hf_models import render_messages

    messages = [{"role": "user", "content": f"{prompt}\nreference: {reference}"},
                {"role": "assistant", "content": output}]
    return render_messages(tokenizer, messages, add_generation_prompt=False)


def reward_messages(prompt: str, completion: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def reward_text(tokenizer, prompt: str, completion: str) -> str:
    from distributed_ft.grader.hf_models import render_messages

    return render_messages(tokenizer, reward_messages(prompt, completion), add_generation_prompt=False)


def reward_grader_spec(model_dir: str, name: str = "reward_model", low: float = -1e6, high: float = 1e6,
                       pointwise: bool = False) -> dict:
    """A `score_model` grader spec that serves a trained reward model (or pointwise grader) folder."""
    return {"type": "score_model", "name": name, "model": str(model_dir), "model_kind": "reward",
            "input": [dict(m) for m in (POINTWISE_INPUT if pointwise else REWARD_INPUT)], "range": [low, high]}
