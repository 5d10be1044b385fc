"""Data pipeline throughput: reading, sampling, splitting, tokenizing and packing into windows (the data
module's setup, from an empty cache), as tokens/s, with the packing efficiency.

    python benchmarks/data.py [--data-dir DIR] [--kinds pretrain sft]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, write
from minillm.config import DataConfig, TokenizerConfig
from minillm.data.datamodule import MiniLLMDataModule, corpus_tokenizer, find_files, resolve_data_dir
from minillm.data.kinds import PRETRAIN, SFT, kind_named


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--kinds", nargs="+", default=["pretrain", "sft"])
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--out-dir", default="outputs/bench")
    args = parser.parse_args(argv)
    data_dir = resolve_data_dir(DataConfig(dir=args.data_dir))
    tokenizer = corpus_tokenizer(find_files(data_dir, PRETRAIN), TokenizerConfig(vocab_size=args.vocab_size))
    rows = []
    for name in args.kinds:
        kind = kind_named(name)
        files = find_files(data_dir, kind)
        with tempfile.TemporaryDirectory() as cache:  # from an empty cache: nothing reused
            config = DataConfig(dir=str(data_dir), cache_dir=cache, packing=kind is SFT)
            module = MiniLLMDataModule(config, files, tokenizer, args.block_size, seed=0, kind=kind)
            start = time.perf_counter()
            module.setup("fit")
            seconds = time.perf_counter() - start
        tokens = module.stats["train_tokens"] + sum(s["val_tokens"] for s in module.stats["sources"].values())
        rows.append(
            {
                "kind": kind.name,
                "files": len(files),
                "tokens": tokens,
                "seconds": seconds,
                "tokens/s": tokens / seconds,
                "packing efficiency": module.stats["packing_efficiency"],
                "train rows": module.stats["train_rows"],
            }
        )
    print_table(rows, list(rows[0]))
    payload = {"data_dir": str(data_dir), "block_size": args.block_size, "rows": rows}
    write("data", payload, Path(args.out_dir))
    return payload


if __name__ == "__main__":
    main()
