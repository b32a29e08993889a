"""Harvest tokens/s of the demo model with the early stop vs a full forward, interleaved in one run.

python scripts/harvest_speed.py [--model minilm] [--layer 3] [--batches 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bilae.data import ActivationDataModule
from bilae.hooks import Harvester
from bilae.lm import load_lm


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    model, tokenizer = load_lm(args.model)
    harvester = Harvester(model, tokenizer, args.layer)
    data = ActivationDataModule(tokenizer, "pydoc", n_ctx=128, batch_size=16, val_sequences=0)
    data.setup("fit")
    batches = [b for b, _ in zip(data.train_dataloader(), range(args.batches))]
    early, full = [], []
    with torch.no_grad():
        for batch in batches:  # interleaved: the same batch through both paths, back to back
            start = time.perf_counter()
            harvester(batch["input_ids"], batch["attention_mask"])
            early.append(time.perf_counter() - start)
            start = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            full.append(time.perf_counter() - start)
    tokens = batches[0]["input_ids"].numel()
    e, f = statistics.median(early[1:]), statistics.median(full[1:])
    print(
        f"{args.model} layer {args.layer} of {harvester.n_layers}, {tokens} tokens per batch, median of {len(batches) - 1}"
    )
    print(
        f"early stop: {tokens / e:,.0f} tokens/s   full forward: {tokens / f:,.0f} tokens/s   ratio {f / e:.2f}"
    )


if __name__ == "__main__":
    main()
