#!/usr/bin/env python3
"""Total GPU time per kernel from Nsight Compute's text output (`ncu --metrics gpu__time_duration.sum`, with or
without `--print-summary per-kernel`), and, given two files, the difference kernel by kernel.

Usage: kernel_times.py A.txt [B.txt]   (B minus A, largest differences first)
"""
import re
import sys
from collections import defaultdict

UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6, "ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
HEADER = re.compile(r"^\s{0,4}(\S[^(]*?)\s*\(.*(?:Context|Device) \d+.*?(?:Invocations (\d+))?\s*$")


def kernel_times(path):
    """{kernel name: (total µs, launches)} of one ncu report."""
    totals = defaultdict(lambda: [0.0, 0])
    name, launches = None, 1
    for line in open(path, errors="replace"):
        header = HEADER.match(line)
        if header:
            name, launches = header.group(1).strip(), int(header.group(2) or 1)
            continue
        if name and "gpu__time_duration.sum" in line:
            fields = line.split()
            unit, value = fields[1], float(fields[-1].replace(",", ""))  # the average (summary) or the value
            totals[name][0] += value * UNITS.get(unit, 1.0) * launches
            totals[name][1] += launches
            name = None
    return {k: tuple(v) for k, v in totals.items()}


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    a = kernel_times(sys.argv[1])
    if len(sys.argv) == 2:
        total = sum(t for t, _ in a.values())
        print(f"{total / 1e3:10.3f} ms in {sum(n for _, n in a.values())} launches")
        for k, (t, n) in sorted(a.items(), key=lambda kv: -kv[1][0]):
            print(f"{t / 1e3:10.3f} ms {n:6d}  {k}")
        return
    b = kernel_times(sys.argv[2])
    ta, tb = sum(t for t, _ in a.values()), sum(t for t, _ in b.values())
    print(f"A {ta / 1e3:.3f} ms, B {tb / 1e3:.3f} ms, B - A {(tb - ta) / 1e3:+.3f} ms ({(tb / ta - 1) * 100:+.1f}%)")
    for k in sorted(set(a) | set(b), key=lambda k: -abs(b.get(k, (0, 0))[0] - a.get(k, (0, 0))[0])):
        (t1, n1), (t2, n2) = a.get(k, (0.0, 0)), b.get(k, (0.0, 0))
        if abs(t2 - t1) < 1:
            continue
        print(f"{(t2 - t1) / 1e3:+10.3f} ms  A {t1 / 1e3:8.3f} ms ({n1:4d})  B {t2 / 1e3:8.3f} ms ({n2:4d})  {k}")


if __name__ == "__main__":
    main()
