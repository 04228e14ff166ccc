"""Tiny random-init Llama models with a byte-level tokenizer, and a tiny task, for fast tests and benchmarks.

Built from a config, deterministic for a seed, and written as an ordinary Hugging Face folder,
so they go through exactly the same loading path as a real pretrained model.
"""

from __future__ import annotations

import random
from pathlib import Path


def arithmetic_rows(count: int, seed: int, largest: int = 9) -> list[dict]:
    """Instruction rows "add A and B" -> "A+B" with 0 <= A, B <= largest: a task a tiny model learns in steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, largest), rng.randint(0, largest)
        rows.append({"instruction": f"add {a} and {b}", "output": str(a + b)})
    return rows


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer():
    """A byte-level tokenizer: 256 byte tokens, no merges, ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny_llama(
    directory: str | Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 2048,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a random-init Llama (default 2 layers, 64 wide) and its tokenizer to ``directory``, its
    weights stored in ``dtype`` (built in it too: a 1B model in bfloat16 never needs 4 GB here)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    directory = Path(directory)
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
