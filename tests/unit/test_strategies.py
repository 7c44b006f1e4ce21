"""Every strategy on a tiny Llama: trains exactly what it declares, loss falls, save -> load_trained round-trips."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from distributed_ft.strict import parse_section
from distributed_ft.errors import ModelError
from distributed_ft.engine.optim import build_optimizer
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
    """STEPS of AdamW over ALL parameters, frozen ones included: a parameter a strategy leaves trainable by
    mistake receives a gradient and moves, so `run_case` sees it (an optimizer over the trainable parameters
    only could never show a frozen parameter moving)."""
    model.train()
    opt = torch.optim.AdamW(list(model.parameters()), lr=lr)
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


def run_case(model, task: str, options: dict, expected: dict[str, tuple[int, ...]], count: int, lr: float = LR):
    """Apply the strategy, train, and check that exactly `expected` (name -> shape, derived from the config by
    the caller, not from the strategy or PEFT) is trainable, sums to `count`, moves, and nothing else moves."""
    strategy = get_strategy(options["name"])
    cfg = parse_section(strategy.config_cls, options, "test.yaml", ("strategy",))
    model = strategy.apply(model, cfg, task)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert sum(math.prod(s) for s in expected.values()) == count, "the test's own shapes and count disagree"
    wrong = sorted(k for k in expected if trainable.get(k) != expected[k])
    assert trainable == expected, f"unexpected trainable: {sorted(set(trainable) - set(expected))}; wrong: {wrong}"
    assert count_parameters(model) == direct_trainable(model)
    assert count_parameters(model)[0] == count
    first, final = train(model, batch(task), lr)
    after = dict(model.named_parameters())
    moved = {name for name, old in before.items() if not torch.equal(old, after[name])}
    assert moved == set(expected), (f"frozen parameters that moved: {sorted(moved - set(expected))}; "
                                    f"declared parameters that did not: {sorted(set(expected) - moved)}")
    assert final < 0.85 * first, f"loss did not fall enough: {first:.4f} -> {final:.4f}"
    return strategy, model, set(trainable)


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


# --------------------------------------------------------------------------- what each config declares
# Shapes and counts below come from the model config (tiny_config) and the strategy options alone; the names
# are the ones a user finds in the saved model/adapter. Nothing here asks the strategy or PEFT what it trains.

CFG = tiny_config()
H, L, I, V = CFG.hidden_size, CFG.num_hidden_layers, CFG.intermediate_size, CFG.vocab_size
KV = H // CFG.num_attention_heads * CFG.num_key_value_heads  # width of k_proj/v_proj (grouped-query attention)
# every linear layer of a block: (in_features, out_features)
LINEARS = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (H, KV), "self_attn.v_proj": (H, KV),
           "self_attn.o_proj": (H, H), "mlp.gate_proj": (H, I), "mlp.up_proj": (H, I), "mlp.down_proj": (I, H)}
BLOCK = sum(i * o for i, o in LINEARS.values()) + 2 * H  # linears + the two RMSNorm weights


def n_labels(task: str) -> int:
    return {"sequence_classification": 2, "regression": 1}.get(task, 0)


def base_shapes(task: str) -> dict[str, tuple[int, ...]]:
    """Every parameter of the tiny Llama (causal LM head, or the new classification head `score`)."""
    out = {"model.embed_tokens.weight": (V, H)}
    for layer in range(L):
        for mod, (i, o) in LINEARS.items():
            out[f"model.layers.{layer}.{mod}.weight"] = (o, i)
        out[f"model.layers.{layer}.input_layernorm.weight"] = (H,)
        out[f"model.layers.{layer}.post_attention_layernorm.weight"] = (H,)
    out["model.norm.weight"] = (H,)
    if task == "causal_lm":
        out["lm_head.weight"] = (V, H)
    else:
        out["score.weight"] = (n_labels(task), H)
    return out


def peft_head(task: str, prefix: str = "base_model.model.") -> dict[str, tuple[int, ...]]:
    """PEFT trains a copy of a new classification head (modules_to_save); a causal LM head stays frozen."""
    return {} if task == "causal_lm" else {f"{prefix}score.modules_to_save.default.weight": (n_labels(task), H)}


def head_count(task: str) -> int:
    return n_labels(task) * H


def lora_shapes(task: str, r: int, dora: bool = False, targets=tuple(LINEARS)) -> dict[str, tuple[int, ...]]:
    out = {}
    for layer in range(L):
        for mod in targets:
            i, o = LINEARS[mod]
            name = f"base_model.model.model.layers.{layer}.{mod}"
            out[f"{name}.lora_A.default.weight"] = (r, i)
            out[f"{name}.lora_B.default.weight"] = (o, r)
            if dora:
                out[f"{name}.lora_magnitude_vector.default.weight"] = (o,)
    return {**out, **peft_head(task)}


def adapter_shapes(task: str, size: int, locations) -> dict[str, tuple[int, ...]]:
    out = {}
    for layer in range(L):
        for loc in locations:
            name = f"model.layers.{layer}.bottleneck_adapters.{loc}"
            out.update({f"{name}.down.weight": (size, H), f"{name}.down.bias": (size,),
                        f"{name}.up.weight": (H, size), f"{name}.up.bias": (H,)})
    if task != "causal_lm":
        out["score.weight"] = (n_labels(task), H)
    return out


def test_expected_shapes_match_the_real_tiny_llama():
    """The hand-written architecture above is the model's: names and shapes of a real LlamaForCausalLM.
    Planted bug seen failing: KV = hidden_size (ignoring grouped-query attention)."""
    model = LlamaForCausalLM(CFG)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == base_shapes("causal_lm")


# --------------------------------------------------------------------------- full / selective


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_full(base_dir, tmp_path, task):
    """Everything trains. Planted bug seen failing: the strategy leaving one weight (layer 0 q_proj) frozen."""
    model = load_base(base_dir, task)
    count = V * H + L * BLOCK + H + (V * H if task == "causal_lm" else head_count(task))
    strategy, model, trainable = run_case(model, task, {"name": "full"}, base_shapes(task), count, lr=1e-2)
    assert count_parameters(model) == (count, count)
    check_roundtrip(strategy, model, task, str(tmp_path / "out"))


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_selective_last_layer(base_dir, tmp_path, task):
    """The last block's parameters (+ the new head). Planted bugs seen failing: block 0's q_proj also set
    trainable (names/count differ; set trainable during the first forward instead, it moves and is caught
    there); `layers` resolved to block 0."""
    model = load_base(base_dir, task)
    # classification trains its new head by default; causal LM trains only the named block
    expected = {n: s for n, s in base_shapes(task).items()
                if n.startswith(f"model.layers.{L - 1}.") or n == "score.weight"}
    strategy, model, trainable = run_case(model, task, {"name": "selective", "layers": [-1]}, expected,
                                          BLOCK + head_count(task))
    check_roundtrip(strategy, model, task, str(tmp_path / "out"))


def test_selective_head_norms_embeddings_patterns(base_dir, tmp_path):
    """Planted bug seen failing: one selected weight (layer 0 q_proj) left frozen."""
    model = load_base(base_dir, "causal_lm")
    options = {"name": "selective", "head": True, "norms": True, "embeddings": True, "patterns": [r"\.q_proj\."],
               "bottom_k": 1}
    expected = {n: s for n, s in base_shapes("causal_lm").items()
                if n.startswith(("lm_head.", "model.embed_tokens.", "model.layers.0.")) or "norm" in n
                or ".q_proj." in n}
    # head + embeddings + block 0 + the other blocks' norms and q_proj + the final norm
    count = 2 * V * H + BLOCK + (L - 1) * (2 * H + H * H) + H
    strategy, model, trainable = run_case(model, "causal_lm", options, expected, count)
    check_roundtrip(strategy, model, "causal_lm", str(tmp_path / "out"))


def test_selective_bitfit(tmp_path):
    """Every bias and nothing else. Planted bug seen failing: a weight (layer 0 q_proj) left trainable."""
    torch.manual_seed(3)
    model = LlamaForCausalLM(tiny_config(attention_bias=True, mlp_bias=True))
    expected = {f"model.layers.{layer}.{mod}.bias": (o,) for layer in range(L) for mod, (_, o) in LINEARS.items()}
    count = L * sum(o for _, o in LINEARS.values())
    strategy, model, trainable = run_case(model, "causal_lm", {"name": "selective", "biases": True}, expected, count)
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
    """r x (in + out) per adapted linear (all but the head), + DoRA's magnitude (out) per linear, + the copied
    classification head. Planted bugs seen failing: a base q_proj weight left trainable; rank r+1."""
    model = load_base(base_dir, task)
    dora = extra.get("use_dora", False)
    count = L * sum(4 * (i + o) + (o if dora else 0) for i, o in LINEARS.values()) + head_count(task)
    strategy, model, trainable = run_case(model, task, {"name": "lora", "r": 4, "alpha": 8, **extra},
                                          lora_shapes(task, 4, dora), count)
    out = str(tmp_path / "out")
    expected_logits = check_roundtrip(strategy, model, task, out)
    check_plain_peft_load(out, base_dir, task, expected_logits)


def test_lora_explicit_targets(base_dir, tmp_path):
    """Only q_proj and v_proj adapted. Planted bugs seen failing: a base weight left trainable; rank r+1."""
    model = load_base(base_dir, "causal_lm")
    targets = ("self_attn.q_proj", "self_attn.v_proj")
    count = L * (2 * (H + H) + 2 * (H + KV))
    strategy, model, trainable = run_case(model, "causal_lm",
                                          {"name": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]},
                                          lora_shapes("causal_lm", 2, targets=targets), count)
    check_roundtrip(strategy, model, "causal_lm", str(tmp_path / "out"))


# --------------------------------------------------------------------------- additive

NVT = 4


def prefix_shapes(task):
    # One embedding row per virtual token holding, for every layer, a key and a value prefix of the
    # key/value width: head_dim x num_key_value_heads (KV), not hidden_size, under grouped-query attention.
    return {"prompt_encoder.default.embedding.weight": (NVT, L * 2 * KV)}


def prompt_shapes(task):
    return {"prompt_encoder.default.embedding.weight": (NVT, H), **peft_head(task, prefix="base_model.")}


def ia3_shapes(task):
    # IA3's Llama targets: k_proj and v_proj scale their outputs (KV each), down_proj (feed-forward) its input (I).
    out = {}
    for layer in range(L):
        name = f"base_model.model.model.layers.{layer}"
        out.update({f"{name}.self_attn.k_proj.ia3_l.default": (KV, 1),
                    f"{name}.self_attn.v_proj.ia3_l.default": (KV, 1),
                    f"{name}.mlp.down_proj.ia3_l.default": (1, I)})
    return {**out, **peft_head(task)}


@pytest.mark.parametrize("task,options,shapes,count", [
    ("causal_lm", {"name": "prefix_tuning", "num_virtual_tokens": NVT}, prefix_shapes, NVT * L * 2 * KV),
    ("causal_lm", {"name": "prompt_tuning", "num_virtual_tokens": NVT}, prompt_shapes, NVT * H),
    ("causal_lm", {"name": "ia3"}, ia3_shapes, L * (2 * KV + I)),
    ("sequence_classification", {"name": "prompt_tuning", "num_virtual_tokens": NVT}, prompt_shapes,
     NVT * H + 2 * H),
    ("sequence_classification", {"name": "ia3"}, ia3_shapes, L * (2 * KV + I) + 2 * H),
], ids=["prefix-causal", "prompt-causal", "ia3-causal", "prompt-cls", "ia3-cls"])
def test_additive_peft(base_dir, tmp_path, task, options, shapes, count):
    """Counts from the config: prefix = tokens x layers x 2 x KV width, prompt = tokens x hidden, IA3 = one
    vector per targeted module per layer; + the head for classification. Planted bugs seen failing: a base
    weight left trainable; num_virtual_tokens + 1."""
    model = load_base(base_dir, task)
    strategy, model, trainable = run_case(model, task, options, shapes(task), count)
    out = str(tmp_path / "out")
    expected_logits = check_roundtrip(strategy, model, task, out)
    check_plain_peft_load(out, base_dir, task, expected_logits)


@pytest.mark.parametrize("task,options", [
    ("causal_lm", {}),
    ("causal_lm", {"adapter_locations": ["mlp"], "nonlinearity": "gelu"}),
    ("sequence_classification", {"nonlinearity": "silu"}),
])
def test_additive_bottleneck(base_dir, tmp_path, task, options):
    """Per block per location 2 x hidden x size + size + hidden, + the head for classification. Planted bugs
    seen failing: a base weight left trainable; adapter_size + 1."""
    model = load_base(base_dir, task)
    base_names = [n for n, _ in model.named_parameters()]
    cfg = {"name": "adapters", "adapter_size": 8, **options}
    locations = options.get("adapter_locations", ["attention", "mlp"])
    count = L * len(locations) * (2 * H * 8 + 8 + H) + head_count(task)
    strategy, model, trainable = run_case(model, task, cfg, adapter_shapes(task, 8, locations), count)
    # base parameter names unchanged; adapters are submodules of each block
    assert [n for n, _ in model.named_parameters() if "bottleneck_adapters" not in n] == base_names
    check_roundtrip(strategy, model, task, str(tmp_path / "out"))


def test_bottleneck_base_argument(tmp_path):
    """A model built in memory has no recorded base path: load_trained(path, base=...) supplies it.
    Planted bugs seen failing (through run_case): a base weight left trainable; adapter_size + 1."""
    torch.manual_seed(4)
    base = LlamaForCausalLM(tiny_config())
    base.save_pretrained(tmp_path / "base")
    strategy, model, _ = run_case(base, "causal_lm", {"name": "adapters", "adapter_size": 8},
                                  adapter_shapes("causal_lm", 8, ["attention", "mlp"]), L * 2 * (2 * H * 8 + 8 + H))
    with pytest.raises(ModelError, match="base model path is not recorded"):
        check_roundtrip(strategy, model, "causal_lm", str(tmp_path / "out"))
    check_roundtrip(strategy, model, "causal_lm", str(tmp_path / "out"), base=str(tmp_path / "base"))


# --------------------------------------------------------------------------- prompt


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_prompt_trains_nothing(base_dir, task):
    """Planted bug seen failing: the prompt strategy leaving a base weight trainable."""
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


# --------------------------------------------------------------------------- the engine's optimizer


@pytest.mark.parametrize("options", [{"name": "lora", "r": 4}, {"name": "selective", "layers": [-1]},
                                     {"name": "adapters", "adapter_size": 8}], ids=lambda o: o["name"])
def test_engine_optimizer_holds_exactly_the_trainable_parameters(base_dir, options):
    """build_optimizer (what `dft train` steps): every trainable parameter in exactly one group and no frozen
    one; weight decay on >= 2-D tensors only. Planted bugs seen failing: the optimizer built over all
    parameters; 1-D parameters (biases, norms) left out."""
    from distributed_ft.engine.config import TrainingConfig

    strategy = get_strategy(options["name"])
    cfg = parse_section(strategy.config_cls, options, "test.yaml", ("strategy",))
    model = strategy.apply(load_base(base_dir, "causal_lm"), cfg, "causal_lm")
    optimizer = build_optimizer(model, TrainingConfig(weight_decay=0.1))
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == len({id(p) for p in held})
    assert {id(p) for p in held} == {id(p) for p in model.parameters() if p.requires_grad}
    for group in optimizer.param_groups:
        assert group["weight_decay"] == (0.1 if group["params"][0].ndim >= 2 else 0.0)
        assert len({p.ndim >= 2 for p in group["params"]}) == 1
