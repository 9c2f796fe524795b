"""train.py with a record of the pairs each micro-batch trains on: `accelerate launch tests/record_pairs.py <train.py
arguments>` with PAIRS_LOG=<folder> writes <folder>/rank<R>.jsonl, one line per micro-batch: each pair's fingerprint
(a hash of its pixels, which are keyed by (seed, epoch, index) and so the same on any number of processes)."""

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


def install(log_dir, rank: int):
    """Wrap train.compute_loss (called once per micro-batch) to append the batch's fingerprints to rank<rank>.jsonl."""
    compute_loss = train.compute_loss

    def recording(args, batch, *rest, **kwargs):
        fingerprints = [hashlib.sha1(pixels.cpu().numpy().tobytes()).hexdigest()[:16] for pixels in batch["pixel_values"]]
        with open(Path(log_dir) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(fingerprints) + "\n")
        return compute_loss(args, batch, *rest, **kwargs)

    train.compute_loss = recording
    return compute_loss


def updates(log_dir, processes: int, accumulation: int) -> list[list[str]]:
    """The sorted fingerprints of each update: micro-batches i*A .. i*A+A-1 of every rank form update i."""
    ranks = [[json.loads(line) for line in (Path(log_dir) / f"rank{r}.jsonl").read_text().splitlines()]
             for r in range(processes)]
    assert len({len(batches) for batches in ranks}) == 1, "the ranks trained on different numbers of micro-batches"
    steps = len(ranks[0]) // accumulation
    return [sorted(pair for batches in ranks for batch in batches[i * accumulation:(i + 1) * accumulation] for pair in batch)
            for i in range(steps)]


if __name__ == "__main__":
    install(os.environ["PAIRS_LOG"], int(os.environ.get("RANK", 0)))
    train.main(sys.argv[1:])
