"""Every strategy on a tiny Llama: trains exactly what it declares, loss falls, save -> load_trained round-trips."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from distributed_ft.config.base import parse_section
from distributed_ft.errors import ModelError
from distributed_ft.strategies import count_parameters, get_strategy, load_trained

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 30
PAD = 0
LR = 5e-2
# Larger than Llama's 0.02 so a frozen random head gives logits with real spread: otherwise methods that leave
# the head frozen (IA3, prompt tuning, BitFit) can barely move a near-uniform output in 30 steps.
INIT_RANGE = 0.2


def tiny_config(**extra) -> LlamaConfig:
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, pad_token_id=PAD,
                       initializer_range=INIT_RANGE, **extra)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    """A tiny causal Llama saved as a model folder, so adapters can record where their base lives."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    LlamaForCausalLM(tiny_config()).save_pretrained(path)
    return str(path)


def load_base(base_dir: str, task: str):
    torch.manual_seed(1)  # the classification head is newly (randomly) initialised from this seed
    if task == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(base_dir)
    if task == "regression":
        return AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, problem_type="regression")
    return AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)


def batch(task: str) -> dict:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 64, (4, 12), generator=gen)  # no pad id: the classifier pools the last token
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "causal_lm":
        out["labels"] = ids
    elif task == "regression":
        out["labels"] = torch.tensor([0.5, -1.0, 1.5, 0.0])
    else:
        out["labels"] = torch.tensor([0, 1, 1, 0])
    return out


def direct_trainable(model) -> tuple[int, int]:
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    return (sum(p.numel() for p in unique.values() if p.requires_grad), sum(p.numel() for p in unique.values()))


def logits(model, data: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


def train(model, data: dict, lr: float) -> tuple[float, float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(STEPS):
        loss = model(**data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = model(**data).loss.item()
    return losses[0], final


def run_case(model, task: str, options: dict, lr: float = LR):
    strategy = get_strategy(options["name"])
    cfg = parse_section(strategy.config_cls, options, "test.yaml", ("strategy",))
    model = strategy.apply(model, cfg, task)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert count_parameters(model) == direct_trainable(model)
    first, final = train(model, batch(task), lr)
    after = dict(model.named_parameters())
    for name, old in before.items():
        if name in trainable:
            assert not torch.equal(old, after[name]), f"trainable parameter did not move: {name}"
        else:
            assert torch.equal(old, after[name]), f"frozen parameter changed: {name}"
    assert final < 0.85 * first, f"loss did not fall enough: {first:.4f} -> {final:.4f}"
    return strategy, model, trainable


def check_roundtrip(strategy, model, task: str, out_dir: str, base: str | None = None):
    data = batch(task)
    expected = logits(model, data)
    (strategy.save or (lambda m, d, s: m.save_pretrained(d)))(model, out_dir, None)
    reloaded = load_trained(out_dir, base=base)
    assert not reloaded.training
    torch.testing.assert_close(logits(reloaded, data), expected, atol=1e-5, rtol=0)
    return expected


def check_plain_peft_load(out_dir: str, base_dir: str, task: str, expected: torch.Tensor):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base_dir, task), out_dir)
    torch.testing.assert_close(logits(model, batch(task)), expected, atol=1e-5, rtol=0)


def lora_expected_trainable(model, r: int) -> int:
    """r * (in + out) per adapted linear layer (+ DoRA magnitude of size out), counted from the base model."""
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head" and name != "score":
            total += r * (mod.in_features + mod.out_features)
    return total


# --------------------------------------------------------------------------- full / selective


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_full(base_dir, tmp_path, task):
    model = load_base(base_dir, task)
    n_total = sum(p.numel() for p in model.parameters())
    strategy, model, trainable = run_case(model, task, {"name": "full"}, lr=1e-2)
    assert count_parameters(model) == (n_total, n_total)
    check_roundtrip(strategy, model, task, str(tmp_path / "out"))


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_selective_last_layer(base_dir, tmp_path, task):
    model = load_base(base_dir, task)
    block = sum(p.numel() for p in model.model.layers[1].parameters())
    head = sum(p.numel() for p in model.score.parameters()) if task != "causal_lm" else 0
    strategy, model, trainable = run_case(model, task, {"name": "selective", "layers": [-1]})
    # classification trains its new head by default; causal LM trains only the named block
    assert all(n.startswith("model.layers.1.") or n.startswith("score.") for n in trainable)
    assert count_parameters(model)[0] == block + head
    check_roundtrip(strategy, model, task, str(tmp_path / "out"))


def test_selective_head_norms_embeddings_patterns(base_dir, tmp_path):
    model = load_base(base_dir, "causal_lm")
    options = {"name": "selective", "head": True, "norms": True, "embeddings": True, "patterns": [r"\.q_proj\."],
               "bottom_k": 1}
    strategy, model, trainable = run_case(model, "causal_lm", options)
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(("lm_head.", "model.embed_tokens.", "model.layers.0."))
                or "norm" in n or ".q_proj." in n}
    assert trainable == expected
    check_roundtrip(strategy, model, "causal_lm", str(tmp_path / "out"))


def test_selective_bitfit(tmp_path):
    torch.manual_seed(3)
    model = LlamaForCausalLM(tiny_config(attention_bias=True, mlp_bias=True))
    strategy, model, trainable = run_case(model, "causal_lm", {"name": "selective", "biases": True})
    assert trainable and all(n.endswith(".bias") for n in trainable)
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    check_roundtrip(strategy, model, "causal_lm", str(tmp_path / "out"))


# --------------------------------------------------------------------------- lora


@pytest.mark.parametrize("task,extra", [
    ("causal_lm", {}),
    ("causal_lm", {"use_dora": True}),
    ("causal_lm", {"use_rslora": True}),
    ("sequence_classification", {}),
    ("sequence_classification", {"use_dora": True}),
    ("regression", {}),
])
def test_lora(base_dir, tmp_path, task, extra):
    model = load_base(base_dir, task)
    expected = lora_expected_trainable(model, r=4)
    if extra.get("use_dora"):  # one magnitude per output feature of every adapted layer
        expected += sum(m.out_features for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and n not in ("lm_head", "score"))
    if task != "causal_lm":  # PEFT trains a copy of the new classification head
        expected += sum(p.numel() for p in model.score.parameters())
    strategy, model, trainable = run_case(model, task, {"name": "lora", "r": 4, "alpha": 8, **extra})
    assert count_parameters(model)[0] == expected == model.get_nb_trainable_parameters()[0]
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    out = str(tmp_path / "out")
    expected_logits = check_roundtrip(strategy, model, task, out)
    check_plain_peft_load(out, base_dir, task, expected_logits)


def test_lora_explicit_targets(base_dir, tmp_path):
    model = load_base(base_dir, "causal_lm")
    strategy, model, trainable = run_case(model, "causal_lm",
                                          {"name": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]})
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    check_roundtrip(strategy, model, "causal_lm", str(tmp_path / "out"))


# --------------------------------------------------------------------------- additive


@pytest.mark.parametrize("task,options", [
    ("causal_lm", {"method": "prefix_tuning", "num_virtual_tokens": 4}),
    ("causal_lm", {"method": "prompt_tuning", "num_virtual_tokens": 4}),
    ("causal_lm", {"method": "ia3"}),
    ("sequence_classification", {"method": "prompt_tuning", "num_virtual_tokens": 4}),
    ("sequence_classification", {"method": "ia3"}),
])
def test_additive_peft(base_dir, tmp_path, task, options):
    model = load_base(base_dir, task)
    strategy, model, trainable = run_case(model, task, {"name": "additive", **options})
    assert count_parameters(model)[0] == model.get_nb_trainable_parameters()[0]
    out = str(tmp_path / "out")
    expected_logits = check_roundtrip(strategy, model, task, out)
    check_plain_peft_load(out, base_dir, task, expected_logits)


@pytest.mark.parametrize("task,options", [
    ("causal_lm", {}),
    ("causal_lm", {"adapter_locations": ["mlp"], "nonlinearity": "gelu"}),
    ("sequence_classification", {"nonlinearity": "silu"}),
])
def test_additive_bottleneck(base_dir, tmp_path, task, options):
    model = load_base(base_dir, task)
    base_names = [n for n, _ in model.named_parameters()]
    cfg = {"name": "additive", "method": "bottleneck", "adapter_size": 8, **options}
    strategy, model, trainable = run_case(model, task, cfg)
    # base parameter names unchanged; adapters are submodules of each block
    assert [n for n, _ in model.named_parameters() if "bottleneck_adapters" not in n] == base_names
    locations = options.get("adapter_locations", ["attention", "mlp"])
    per_adapter = (32 * 8 + 8) + (8 * 32 + 32)
    head = sum(p.numel() for p in model.score.parameters()) if task != "causal_lm" else 0
    assert count_parameters(model)[0] == 2 * len(locations) * per_adapter + head
    assert all("bottleneck_adapters" in n or n.startswith("score.") for n in trainable)
    check_roundtrip(strategy, model, task, str(tmp_path / "out"))


def test_bottleneck_base_argument(tmp_path):
    """A model built in memory has no recorded base path: load_trained(path, base=...) supplies it."""
    torch.manual_seed(4)
    base = LlamaForCausalLM(tiny_config())
    base.save_pretrained(tmp_path / "base")
    strategy, model, _ = run_case(base, "causal_lm", {"name": "additive", "method": "bottleneck", "adapter_size": 8})
    with pytest.raises(ModelError, match="base model path is not recorded"):
        check_roundtrip(strategy, model, "causal_lm", str(tmp_path / "out"))
    check_roundtrip(strategy, model, "causal_lm", str(tmp_path / "out"), base=str(tmp_path / "base"))


# --------------------------------------------------------------------------- prompt


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_prompt_trains_nothing(base_dir, task):
    model = load_base(base_dir, task)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy = get_strategy("prompt")
    assert strategy.trains is False
    model = strategy.apply(model, strategy.config_cls(name="prompt"), task)
    assert count_parameters(model) == (0, direct_trainable(model)[1])
    data = batch(task)
    loss = model(**data).loss
    assert not loss.requires_grad  # no parameter can receive a gradient
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])
