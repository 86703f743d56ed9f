"""A data step for the experiment tests: the engine tests' learnable synthetic shards, plus the same
training clips with shuffled labels (a planted difference).

    python3 tests/experiment/write_data.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

from af_train_tools.synthetic_shards import write_patterned_split

SIZES = {"train": 96, "val": 32, "test": 48}


def main(out: str) -> None:
    root = Path(out)
    for split, count in SIZES.items():
        write_patterned_split(root / split, count, split=split, multi_label=False)
    write_patterned_split(root / "train_shuffled", SIZES["train"], split="train", multi_label=False,
                          shuffle_labels=True)


if __name__ == "__main__":
    main(sys.argv[1])
