"""Compares merged model folders tensor by tensor (bf16 values as raw bits): python3 compare_merged.py A B [C ...].
Prints, for each folder after the first, the tensors that differ, how many values differ and by how many bf16 ulps."""
import sys, glob, os
from safetensors.torch import load_file

def load(folder):
    tensors = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(load_file(f))
    return tensors

base = load(sys.argv[1])
for other_path in sys.argv[2:]:
    other = load(other_path)
    assert base.keys() == other.keys(), f"tensor names differ: {sorted(base.keys() ^ other.keys())}"
    total = differing = worst = 0
    for name, a in base.items():
        b = other[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        ai, bi = a.contiguous().view(-1).view(__import__("torch").int16).int(), b.contiguous().view(-1).view(__import__("torch").int16).int()
        d = (ai - bi).abs()
        total += d.numel(); differing += int((d > 0).sum()); worst = max(worst, int(d.max()) if d.numel() else 0)
    print(f"{sys.argv[1]} vs {other_path}: {differing} of {total} values differ, worst {worst} ulp")
