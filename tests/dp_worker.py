"""Run by torchrun from test_distributed.py: a failure on one rank only, at each point the
ranks meet. Each rank writes what it saw to OUT/rank-N.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kvw_ledger.distributed import World
from kvw_ledger.errors import DataError


def main(out: Path) -> None:
    world = World.from_env()
    seen: dict[str, object] = {}
    try:  # 1. a block that fails on rank 1 alone
        with world.together() as shared:
            shared.value = "from rank 0"
            if world.rank == 1:
                raise DataError("rank1.jsonl:3: not valid JSON")
        seen["together"] = "passed"
    except DataError as e:
        seen["together"] = [type(e).__name__, str(e), e.exit_code]
    try:  # 2. an all-reduce where rank 0 could not measure its share
        sums = torch.full((3,), float(world.rank + 1))
        world.all_reduce([sums], failed=world.rank == 0)
        seen["all_reduce"] = sums.tolist()
    except Exception as e:
        seen["all_reduce"] = [type(e).__name__, str(e)]
    sums = torch.full((3,), float(world.rank + 1))  # 3. and after that, a clean one
    world.all_reduce([sums])
    seen["sums"] = sums.tolist()
    seen["shared"] = shared.main
    (out / f"rank-{world.rank}.json").write_text(json.dumps(seen))
    world.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
