"""A tiny seeded Llama with a word-level tokenizer trained on the spot, saved to a folder (safetensors)."""
from __future__ import annotations

from pathlib import Path

WORDS = ("the cat dog sat on a mat ran to park big small red blue green house tree sun moon "
         "one two three four five six seven eight nine ten and or with under over").split()
PROMPTS = [
    "the cat sat on",
    "a big red dog ran to the park with one small cat",
    "sun",
    "one two three four",
    "the blue house under the green tree and the moon over the big red mat",
    "seven eight",
    "a small dog",
]
REFERENCES = ["the mat", "and sat", "moon", "five six", "sun", "nine ten", "ran to the park"]


def build_tiny_llama(folder: str | Path, *, seed: int = 0, hidden: int = 32, layers: int = 2,
                     task: str = "causal_lm", num_labels: int = 2) -> Path:
    """Train a WordLevel tokenizer, build a seeded Llama (LM or sequence classification) and save both."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    folder = Path(folder)
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"])
    raw.train_from_iterator([" ".join(WORDS)] + PROMPTS + REFERENCES, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", bos_token="[BOS]",
                                        eos_token="[EOS]", unk_token="[UNK]")
    config = LlamaConfig(vocab_size=raw.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         num_labels=num_labels)
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if task == "causal_lm" else LlamaForSequenceClassification)(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
