#!/usr/bin/env python3
"""Writes Tests/Fixtures/distributed-sampler/goldens.json: the indices torch's DistributedSampler gives every rank.

For each case (dataset size n, world size w, shuffle, seed, epoch) the file holds the order the sampler shards
(0..n-1, or with shuffle the torch.randperm the sampler draws for seed + epoch) and each rank's indices. The Swift
test shards that order with DistributedSampling.shard and must get the same indices (torch's permutation generator is
not ours to copy: the trainer shuffles with its own; what must agree is the padding and the striding).
Run: /work/pyenv/bin/python scripts/make_distributed_sampler_fixture.py
"""
import json
import os

import torch
from torch.utils.data import DistributedSampler


def main():
    cases = []
    for n, w, shuffle, seed, epoch in [
        (8, 2, False, 0, 0), (10, 4, False, 0, 0), (7, 3, True, 5, 0), (7, 3, True, 5, 1),
        (2, 7, False, 0, 0), (3, 8, True, 1, 2), (16, 4, True, 42, 3), (1, 2, False, 0, 0), (13, 1, True, 9, 0),
    ]:
        if shuffle:
            g = torch.Generator()
            g.manual_seed(seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        ranks = []
        for r in range(w):
            sampler = DistributedSampler(list(range(n)), num_replicas=w, rank=r, shuffle=shuffle, seed=seed, drop_last=False)
            sampler.set_epoch(epoch)
            ranks.append(list(sampler))
        cases.append({"n": n, "world_size": w, "shuffle": shuffle, "seed": seed, "epoch": epoch, "order": order, "ranks": ranks})
    out = os.path.join(os.path.dirname(__file__), "..", "Tests", "Fixtures", "distributed-sampler", "goldens.json")
    with open(out, "w") as f:
        json.dump({"torch": torch.__version__, "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {os.path.normpath(out)}")


if __name__ == "__main__":
    main()
