"""Regenerate benchmarks/hh_lengths.json: (prompt, chosen, rejected) token lengths of HH-RLHF
helpful-base test pairs, tokenized as training tokenizes them (SmolLM2 tokenizer, EOS included).

Only the lengths are kept (no text), so the GPU host, which has no data files, can build pairs of
the same shapes. Usage: python -m benchmarks.hh_lengths [--rows 512] [--data ../shared/data/...]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "hh-rlhf-helpful-base-test.jsonl.gz"


def main() -> None:
    from dpo import smollm2
    from dpo.data.sources import DataSpec, load_rows
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(smollm2.plain_copy(with_model=False))
    rows = load_rows(DataSpec(path=args.data))
    pairs, _ = data.prepare_pairs(tok, rows, max_length=None)
    lengths = [[len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)] for p in pairs]
    random.Random(args.seed).shuffle(lengths)
    out = {"source": Path(args.data).name, "tokenizer": "SmolLM2-135M-Instruct", "pairs_in_file": len(pairs),
           "lengths": lengths[: args.rows]}
    (HERE / "hh_lengths.json").write_text(json.dumps(out) + "\n")
    med = sorted(lengths)[len(lengths) // 2]
    print(f"wrote {len(out['lengths'])} of {len(lengths)} length triples; a median-ish triple: {med}")


if __name__ == "__main__":
    main()
