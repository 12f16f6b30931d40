"""The benchmark's model shapes and its pairs, built the same way in every process.

Models are random-init (speed and memory do not depend on weight values). Pairs are text of
space-separated words over a word-level vocabulary, one token per word, so that each pair has
exactly the token lengths of a real HH-RLHF helpful-base pair (benchmarks/hh_lengths.json) for
every system, TRL's tokenization included.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
H100_BF16_DENSE_PEAK = 989.4e12  # FLOP/s: the denominator of every MFU in the results
WORDS = 8000  # word-level vocabulary: ids 4 .. 4+WORDS; the model's vocabulary is larger, which is fine


@dataclass(frozen=True)
class Shape:
    name: str
    config: dict
    load_in_4bit: bool

    def matmul_params(self) -> int:
        """Parameters that take part in matmuls per token (all linear layers and the LM head)."""
        c = self.config
        h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
        return layers * per_layer + c["vocab_size"] * h


LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
SHAPES = {
    "llama3-8b-qlora": Shape("llama3-8b-qlora", dict(LLAMA3, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                             tie_word_embeddings=False), load_in_4bit=True),
    "llama3.2-1b-lora": Shape("llama3.2-1b-lora", dict(LLAMA3, hidden_size=2048, intermediate_size=8192,
                              num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                              tie_word_embeddings=True), load_in_4bit=False),
    # For the CPU smoke run of the harness itself.
    "tiny": Shape("tiny", dict(LLAMA3, vocab_size=WORDS + 4, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
                  load_in_4bit=False),
}


def word_tokenizer():
    """A word-level tokenizer: <pad>=0 <s>=1 </s>=2 <unk>=3, then w0..w{WORDS-1}; split on spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(WORDS)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model(shape: Shape, out: str, device: str = "cuda") -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the saved dtype: an 8B model in float32 would need 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape.config))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out)
    word_tokenizer().save_pretrained(out)


def length_table() -> list[list[int]]:
    return json.loads((HERE / "hh_lengths.json").read_text())["lengths"]


def pair_rows(n: int, seed: int = 0, max_length: int = 1024) -> list[dict]:
    """n plain-text pairs with HH's token lengths (EOS included in the completion lengths)."""
    rng = random.Random(seed)
    table = length_table()
    rows = []
    for i in range(n):
        p, c, r = table[i % len(table)]

        def words(k):
            return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(k))

        # The completion's last token is EOS, written out so TRL adds none; prompts stay < max_length.
        p = min(p, max_length - 2)
        rows.append({"prompt": words(p), "chosen": " " + words(max(c - 1, 1)) + " </s>",
                     "rejected": " " + words(max(r - 1, 1)) + " </s>"})
    return rows
