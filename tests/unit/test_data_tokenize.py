"""Formats, loss masking, length limits, packing, collation and build_data with a small local tokenizer."""
from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from distributed_ft.data import DataConfig, build_data, collate, encode_prompt
from distributed_ft.data.builtin import builtin_corpus
from distributed_ft.data.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, simple_chat_prompt
from distributed_ft.errors import ConfigError, DataError

EXTRA_TEXT = ["What is the capital of France? Paris is the capital. Name a colour: red green blue.",
              "Below is an instruction that describes a task. ### Instruction: ### Input: ### Response:"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(*, bos_prefix: bool = False, pad_is_eos: bool = False) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator(builtin_corpus(seed=0) + EXTRA_TEXT, trainer=trainer)
    if bos_prefix:  # a Llama-like tokenizer that adds <s> in front of every text
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>" if pad_is_eos else "<pad>")


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    # `datasets` writes Arrow caches of loaded files; keep them out of the user's home.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data_cfg(**kw) -> DataConfig:
    return DataConfig.model_validate(kw)


def trained_part(tokenizer, example) -> str:
    """Decode the tokens whose label is not masked."""
    return tokenizer.decode([t for t in example["labels"] if t != -100])


QA = [{"question": "What is the capital of France?", "answer": " Paris"},
      {"question": "Name a colour:", "answer": " red"},
      {"question": "Name a colour:", "answer": " blue green"}]


def test_prompt_completion_with_column_mapping_masks_the_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    cfg = data_cfg(train=[{"path": path, "columns": {"prompt": "question", "completion": "answer"}}])
    bundle = build_data(cfg, tok, task_type="causal_lm", seed=0)
    assert bundle.tasks == ["qa"] and bundle.task_sizes == [3]
    for row, ex in zip(QA, bundle.train):
        prompt_len = len(encode_prompt(tok, row["question"]))
        assert ex["labels"][:prompt_len] == [-100] * prompt_len
        assert ex["input_ids"][:prompt_len] == encode_prompt(tok, row["question"])
        assert trained_part(tok, ex) == row["answer"].strip() + tok.eos_token
        assert ex["labels"][-1] == ex["input_ids"][-1] == tok.eos_token_id


def test_loss_on_all_trains_every_token(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    cfg = data_cfg(train=[{"path": path, "columns": {"prompt": "question", "completion": "answer"}}], loss_on="all")
    for ex in build_data(cfg, tok, task_type="causal_lm", seed=0).train:
        assert ex["labels"] == ex["input_ids"]


def test_eos_label_kept_when_pad_is_eos(tmp_path):
    tok = make_tokenizer(pad_is_eos=True)
    assert tok.pad_token_id == tok.eos_token_id
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    cfg = data_cfg(train=[{"path": path, "columns": {"prompt": "question", "completion": "answer"}}])
    examples = build_data(cfg, tok, task_type="causal_lm", seed=0).train
    batch = collate(examples, tok.pad_token_id)
    lengths = batch["attention_mask"].sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert batch["labels"][row, n - 1].item() == tok.eos_token_id  # the real EOS is trained
        assert (batch["labels"][row, n:] == -100).all()  # padding (same id) is not
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.eos_token_id).all()


def test_text_format_from_csv_trains_all_tokens(tmp_path, tok):
    path = tmp_path / "notes.csv"
    path.write_text("text,source\ncopy: a b c = a b c,x\nreverse: a b = b a,y\n")
    bundle = build_data(data_cfg(train=[{"path": str(path)}]), tok, task_type="causal_lm", seed=0)
    assert bundle.tasks == ["notes"]
    texts = ["copy: a b c = a b c", "reverse: a b = b a"]
    for text, ex in zip(texts, bundle.train):
        assert ex["input_ids"] == tok(text)["input_ids"] + [tok.eos_token_id]
        assert ex["labels"] == ex["input_ids"]


def test_instruction_format_from_parquet(tmp_path, tok):
    import pandas as pd

    rows = [{"instruction": "Name a colour", "input": "", "output": "red"},
            {"instruction": "Reverse", "input": "a b", "output": "b a"}]
    path = tmp_path / "alpaca.parquet"
    pd.DataFrame(rows).to_parquet(path)
    bundle = build_data(data_cfg(train=[{"path": str(path)}], validation_fraction=0.0), tok,
                        task_type="causal_lm", seed=0)
    first, second = bundle.train
    want_first = ALPACA_NO_INPUT.format(instruction="Name a colour")
    want_second = ALPACA_WITH_INPUT.format(instruction="Reverse", input="a b")
    assert first["input_ids"][:len(encode_prompt(tok, want_first))] == encode_prompt(tok, want_first)
    assert second["input_ids"][:len(encode_prompt(tok, want_second))] == encode_prompt(tok, want_second)
    assert trained_part(tok, second) == "b a" + tok.eos_token


CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour:"},
                  {"role": "assistant", "content": "red"}, {"role": "user", "content": "Another:"},
                  {"role": "assistant", "content": "blue"}]},
    {"messages": [{"role": "user", "content": "copy: a b ="}, {"role": "assistant", "content": "a b"}]},
]


def test_chat_without_template_uses_simple_template(tmp_path, tok):
    assert not tok.chat_template
    path = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = data_cfg(train=[{"path": path}], validation=[{"path": path}])
    bundle = build_data(cfg, tok, task_type="causal_lm", seed=0)
    want_prompt = simple_chat_prompt(CHATS[0]["messages"][:4])
    assert want_prompt.endswith("<|user|>\nAnother:\n<|assistant|>\n")
    assert bundle.eval_records[0] == {"task": "chat", "prompt": want_prompt, "reference": "blue"}
    assert trained_part(tok, bundle.train[0]) == "blue" + tok.eos_token
    assert bundle.train[0]["input_ids"][:len(encode_prompt(tok, want_prompt))] == encode_prompt(tok, want_prompt)


def test_chat_with_template_uses_apply_chat_template_without_double_bos(tmp_path):
    tok = make_tokenizer(bos_prefix=True)
    tok.chat_template = CHAT_TEMPLATE
    path = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = data_cfg(train=[{"path": path}], validation=[{"path": path}])
    bundle = build_data(cfg, tok, task_type="causal_lm", seed=0)
    for chat, record, ex in zip(CHATS, bundle.eval_records, bundle.train):
        history = chat["messages"][:-1]
        want = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        assert record["prompt"] == want and want.startswith("<s>") and want.endswith("<|assistant|>")
        assert record["reference"] == chat["messages"][-1]["content"]
        assert ex["input_ids"][:2].count(tok.bos_token_id) == 1  # the template's <s>, not a second one
        assert trained_part(tok, ex) == chat["messages"][-1]["content"] + tok.eos_token


def test_bos_prefix_is_added_to_plain_prompts_and_masked(tmp_path):
    tok = make_tokenizer(bos_prefix=True)
    path = write_jsonl(tmp_path / "qa.jsonl", QA[:1])
    bundle = build_data(data_cfg(train=[{"path": path, "columns": {"prompt": "question", "completion": "answer"}}]),
                        tok, task_type="causal_lm", seed=0)
    ex = bundle.train[0]
    assert ex["input_ids"][0] == tok.bos_token_id and ex["labels"][0] == -100
    assert encode_prompt(tok, QA[0]["question"]) == tok(QA[0]["question"])["input_ids"]


def test_classification_with_named_labels_and_regression(tmp_path, tok):
    rows = [{"sentence": "red green", "tag": "colour"}, {"sentence": "a b c", "tag": "letters"},
            {"sentence": "blue", "tag": "colour"}]
    path = write_jsonl(tmp_path / "tags.jsonl", rows)
    cfg = data_cfg(train=[{"path": path, "format": "classification", "columns": {"text": "sentence", "label": "tag"}}])
    bundle = build_data(cfg, tok, task_type="sequence_classification", seed=0)
    assert bundle.label_names == ["colour", "letters"] and bundle.num_labels == 2
    assert [ex["label"] for ex in bundle.train] == [0, 1, 0]
    batch = collate(bundle.train, tok.pad_token_id)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1, 0]

    reg = tmp_path / "scores.csv"
    reg.write_text("text,value\na b c,3\na,1.5\n")
    bundle = build_data(data_cfg(train=[{"path": str(reg)}]), tok, task_type="regression", seed=0)
    batch = collate(bundle.train, tok.pad_token_id)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [3.0, 1.5]
    assert batch["input_ids"][0, :len(tok("a b c")["input_ids"])].tolist() == tok("a b c")["input_ids"]


def test_overlong_truncate_keeps_completion_and_prompt_tail(tmp_path, tok):
    long_prompt = "copy: " + " ".join("abcdefghijklmnopqrst") + " ="
    rows = [{"prompt": long_prompt, "completion": " a b"}, {"prompt": "copy: a =", "completion": " a"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    prompt_ids = encode_prompt(tok, long_prompt)
    completion_part = tok(long_prompt + " a b")["input_ids"][len(prompt_ids):] + [tok.eos_token_id]
    max_length = len(completion_part) + 5
    bundle = build_data(data_cfg(train=[{"path": path}], max_length=max_length), tok, task_type="causal_lm", seed=0)
    assert bundle.stats["long"] == {"kept": 2, "truncated": 1, "dropped_overlong": 0, "dropped_empty": 0}
    ex = bundle.train[0]
    assert len(ex["input_ids"]) == max_length
    assert ex["input_ids"] == prompt_ids[-5:] + completion_part
    assert trained_part(tok, ex) == "a b" + tok.eos_token

    bundle = build_data(data_cfg(train=[{"path": path}], max_length=max_length, overlong="drop"), tok,
                        task_type="causal_lm", seed=0)
    assert bundle.stats["long"] == {"kept": 1, "truncated": 0, "dropped_overlong": 1, "dropped_empty": 0}
    assert len(bundle.train) == 1


def test_overlong_classification_is_cut_on_the_right(tmp_path, tok):
    path = write_jsonl(tmp_path / "cls.jsonl", [{"text": "a b c d e f g h", "label": 1}, {"text": "a", "label": 0}])
    bundle = build_data(data_cfg(train=[{"path": path}], max_length=3), tok, task_type="sequence_classification",
                        seed=0)
    assert bundle.train[0]["input_ids"] == tok("a b c d e f g h")["input_ids"][:3]
    assert bundle.stats["cls"]["truncated"] == 1 and bundle.num_labels == 2


def test_empty_examples_are_dropped_and_counted(tmp_path, tok):
    rows = [{"prompt": "copy: a =", "completion": " a"}, {"prompt": "copy: b =", "completion": ""},
            {"prompt": "copy: c =", "completion": "   "}, {"prompt": "copy: d =", "completion": None}]
    path = write_jsonl(tmp_path / "gaps.jsonl", rows)
    bundle = build_data(data_cfg(train=[{"path": path}]), tok, task_type="causal_lm", seed=0)
    assert bundle.stats["gaps"] == {"kept": 1, "truncated": 0, "dropped_overlong": 0, "dropped_empty": 3}
    chats = [CHATS[1], {"messages": [{"role": "user", "content": "no answer"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", chats)
    bundle = build_data(data_cfg(train=[{"path": path}]), tok, task_type="causal_lm", seed=0)
    assert bundle.stats["chat"]["dropped_empty"] == 1 and bundle.stats["chat"]["kept"] == 1


def test_packing_concatenates_whole_examples_and_resets_positions(tok):
    cfg = data_cfg(train=[{"builtin": "copy", "num_examples": 50}], max_length=64)
    plain = build_data(cfg, tok, task_type="causal_lm", seed=3)
    packed = build_data(cfg.model_copy(update={"packing": True}), tok, task_type="causal_lm", seed=3)
    assert packed.stats["copy"]["sequences"] == len(packed.train) < len(plain.train)
    assert [t for ex in packed.train for t in ex["input_ids"]] == [t for ex in plain.train for t in ex["input_ids"]]
    starts = 0
    for ex in packed.train:
        assert len(ex["input_ids"]) <= 64
        assert len(ex["position_ids"]) == len(ex["input_ids"]) == len(ex["labels"])
        starts += ex["position_ids"].count(0)
    assert starts == len(plain.train)
    # Labels equal the unpacked labels except the first token of each example, which is masked.
    flat_plain = [lab for ex in plain.train for lab in [-100] + ex["labels"][1:]]
    assert [lab for ex in packed.train for lab in ex["labels"]] == flat_plain
    batch = collate(packed.train[:3], tok.pad_token_id)
    first = packed.train[0]
    assert batch["position_ids"][0, :len(first["input_ids"])].tolist() == first["position_ids"]
    with pytest.raises(ConfigError, match="packing"):
        build_data(data_cfg(train=[{"builtin": "parity"}], packing=True), tok,
                   task_type="sequence_classification", seed=0)



@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(tok, attention):
    """Each packed example gets the logits it gets alone, whatever precedes it in its row, padding included."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distributed_ft.data.collate import model_inputs

    cfg = data_cfg(train=[{"builtin": "copy", "num_examples": 12}], max_length=64)
    plain = build_data(cfg, tok, task_type="causal_lm", seed=3)
    packed = build_data(cfg.model_copy(update={"packing": True}), tok, task_type="causal_lm", seed=3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         attn_implementation=attention)).train()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ex["input_ids"]])).logits[0] for ex in plain.train]
        batch = collate(packed.train[:3], tok.pad_token_id)  # rows of different lengths: right padding
        logits = model(**model_inputs(batch)).logits
    checked = 0
    for row, ex in enumerate(packed.train[:3]):
        starts = [i for i, pos in enumerate(ex["position_ids"]) if pos == 0] + [len(ex["input_ids"])]
        for begin, end in zip(starts, starts[1:]):
            torch.testing.assert_close(logits[row, begin:end], alone[checked], atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked > 3 and len({len(ex["input_ids"]) for ex in packed.train[:3]}) > 1

def test_collate_right_pads_with_masks(tok):
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "task_id": 0},
                {"input_ids": [8], "labels": [8], "task_id": 1}]
    batch = collate(examples, pad_token_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["task_ids"].tolist() == [0, 1] and "position_ids" not in batch


def test_multitask_builtins_validation_fraction_is_disjoint_and_deterministic(tok):
    names = ["arithmetic", "reverse", "sort", "copy", "parity", "count"]
    cfg = data_cfg(train=[{"builtin": n, "num_examples": 100, "weight": 1 + i} for i, n in enumerate(names)],
                   validation_fraction=0.1, max_length=64)
    a = build_data(cfg, tok, task_type="causal_lm", seed=7)
    b = build_data(cfg, tok, task_type="causal_lm", seed=7)
    assert a.train == b.train and a.eval_records == b.eval_records
    assert a.tasks == names and a.task_sizes == [90] * 6 and a.weights == [1, 2, 3, 4, 5, 6]
    assert len(a.eval_records) == 60 and [r["task"] for r in a.eval_records] == [n for n in names for _ in range(10)]
    # Train examples are stored task by task, in the order of data.train: the sampler indexes them so.
    assert [ex["task_id"] for ex in a.train] == [t for t in range(6) for _ in range(90)]
    train_prompts = {tok.decode(ex["input_ids"][:ex["labels"].index(next(x for x in ex["labels"] if x != -100))])
                     for ex in a.train}
    held = [r["prompt"] for r in a.eval_records]
    assert not any(p in train_prompts for p in held)
    c = build_data(cfg, tok, task_type="causal_lm", seed=8)
    assert c.eval_records != a.eval_records
    sampler = a.sampler(seed=1)
    assert all(0 <= i < len(a.train) for i in sampler.next_indices(500))


def test_builtin_validation_specs_exclude_training_inputs(tok):
    cfg = data_cfg(train=[{"builtin": "parity", "num_examples": 500}],
                   validation=[{"builtin": "parity", "num_examples": 300}])
    bundle = build_data(cfg, tok, task_type="sequence_classification", seed=0)
    train_texts = {tok.decode(ex["input_ids"]) for ex in bundle.train}
    assert bundle.num_labels == 2 and bundle.eval_records
    assert not any(r["text"] in train_texts for r in bundle.eval_records)
    assert all(r["label"] == r["text"].split()[-1].count("1") % 2 for r in bundle.eval_records)
    with pytest.raises(DataError, match="builtin 'arithmetic' is a causal_lm task"):
        build_data(data_cfg(train=[{"builtin": "arithmetic"}]), tok, task_type="sequence_classification", seed=0)


def test_validation_only_task_is_evaluated_under_its_own_name(tmp_path, tok):
    path = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "copy: a b =", "completion": " a b"}])
    cfg = data_cfg(train=[{"builtin": "copy", "num_examples": 20}, {"builtin": "sort", "num_examples": 20}],
                   validation=[{"path": path}, {"builtin": "sort", "num_examples": 5}])
    bundle = build_data(cfg, tok, task_type="causal_lm", seed=0)
    assert bundle.tasks == ["copy", "sort"]
    assert [r["task"] for r in bundle.eval_records] == ["held"] + ["sort"] * 5
    assert bundle.validation_stats["held"]["kept"] == 1 and bundle.validation_stats["sort"]["kept"] == 5


def test_prompt_tokens_match_generation_when_the_boundary_merges(tmp_path, tok):
    # A trailing space would merge with the completion's first token ("▁a"); the prompt must still be
    # tokenized exactly as generation will see it, and the completion appended on its own.
    path = write_jsonl(tmp_path / "space.jsonl", [{"prompt": "copy: a = ", "completion": "a"}])
    ex = build_data(data_cfg(train=[{"path": path}]), tok, task_type="causal_lm", seed=0).train[0]
    prompt_ids = encode_prompt(tok, "copy: a = ")
    assert tok("copy: a = a")["input_ids"][:len(prompt_ids)] != prompt_ids  # the merge really happens
    assert ex["input_ids"][:len(prompt_ids)] == prompt_ids
    assert trained_part(tok, ex) == "a" + tok.eos_token
