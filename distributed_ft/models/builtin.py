"""The built-in tiny model: a small Llama built from a config, with a tokenizer trained locally.

It is written once into a cache folder and always loaded back through `from_pretrained`,
so the quickstart and the tests exercise the same loading path as a real model, with no download.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
COMPLETE_MARKER = ".complete"
# Everything the built-in folder is made from; the cache key hashes it with the tokenizer corpus,
# so a change to either builds a new folder instead of reusing a stale one.
TINY_CONFIG = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
TOKENIZER_VOCAB = 512
INIT_SEED = 0
# Bumped when the folder's layout changes, so caches written by an older build are rebuilt.
FOLDER_VERSION = 2


def cache_root() -> Path:
    return Path(os.environ.get("DFT_CACHE_DIR", Path.home() / ".cache" / "distributed_ft"))


def builtin_model_path(name: str = "tiny") -> Path:
    """Return the folder of a built-in model, building it first if it is not cached yet."""
    if name != "tiny":
        raise ValueError(f"unknown built-in model {name!r}")
    target = cache_root() / "builtin" / f"tiny-{_recipe_hash()}"
    if not (target / COMPLETE_MARKER).is_file():
        _build_atomically(target)
    return target


def _recipe_hash() -> str:
    import hashlib
    import json

    from distributed_ft.data.builtin import builtin_corpus

    recipe = json.dumps([FOLDER_VERSION, TINY_CONFIG, TOKENIZER_VOCAB, INIT_SEED, SPECIAL_TOKENS,
                         builtin_corpus(seed=0)])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def _build_atomically(target: Path) -> None:
    # Every rank may get here at once; each builds the same deterministic folder in a private
    # temporary directory, marks it complete, and the first rename wins. A folder without the
    # marker (left by an interrupted older build) is replaced.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        _build_tiny(tmp)
        (tmp / COMPLETE_MARKER).write_text("complete\n")
        for _ in range(3):
            try:
                os.rename(tmp, target)
                return
            except OSError:
                if (target / COMPLETE_MARKER).is_file():
                    return
                shutil.rmtree(target, ignore_errors=True)
        raise OSError(f"could not create the built-in model folder {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_builtin_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from distributed_ft.data.builtin import builtin_corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS, min_frequency=2)
    tok.train_from_iterator(builtin_corpus(seed=0), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", model_max_length=512)


def _build_tiny(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_builtin_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_CONFIG)
    with torch.random.fork_rng(devices=[]):  # the run's set_seed stream stays as it was
        torch.manual_seed(INIT_SEED)
        model = LlamaForCausalLM(config)
    # Written directly rather than with model.save_pretrained, which writes nothing on ranks other
    # than 0 once a process group exists, and every rank may be the one building this folder. The
    # config records the architecture as save_pretrained would (TRL builds reference models from it).
    model.config.architectures = [type(model).__name__]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()]
    if missing:
        raise OSError(f"building the built-in model wrote no {', '.join(missing)} in {folder}")
