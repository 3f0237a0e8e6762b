"""Goldens for GradScaler (Sources/QLoRA/Training/GradScaler.swift): torch.amp.GradScaler on the CPU, driven by a
sequence of steps whose gradients are finite or not (flags: 1 = an inf or nan gradient); records the scale after
each update, whether the optimizer step was taken (the parameter changed), and the growth tracker. Output: Tests/Fixtures/grad-scaler/sequences.json.

    /work/pyenv/bin/python scripts/make_grad_scaler_fixture.py
"""
import json, math, random, torch

def run(flags, **kwargs):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", **kwargs)
    out = []
    for k, bad in enumerate(flags):
        opt.zero_grad()
        loss = (p * torch.tensor([1.0, 2.0])).sum()
        scaler.scale(loss).backward()
        if bad == "inf":
            p.grad[0] = math.inf
        elif bad == "nan":
            p.grad[1] = math.nan
        before = p.detach().clone()
        scaler.step(opt)
        scaler.update()
        taken = not torch.equal(before, p.detach())
        out.append({"scale": scaler.get_scale(), "stepped": taken, "growth_tracker": int(scaler._growth_tracker.item())})
    return out

rng = random.Random(15)
cases = []
# Short interval: growth, backoff, growth again; nan and inf both count as overflow.
flags = [None] * 7 + ["inf"] + [None] * 4 + ["nan", "inf"] + [None] * 9
cases.append({"name": "interval 3", "init_scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3,
              "flags": flags, "steps": run(flags, init_scale=1024.0, growth_interval=3)})
# torch's defaults (2^16, 2, 0.5, 2000): early overflows halve the scale, 2000 clean steps double it.
flags = ["inf"] * 3 + [None] * 2001 + ["nan"] + [None] * 5
cases.append({"name": "defaults", "init_scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "flags": flags, "steps": run(flags)})
# Random overflows with other factors.
flags = [("inf" if rng.random() < 0.2 else None) for _ in range(60)]
cases.append({"name": "random", "init_scale": 8.0, "growth_factor": 4.0, "backoff_factor": 0.25, "growth_interval": 2,
              "flags": flags, "steps": run(flags, init_scale=8.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=2)})
# Collapse: overflow every step from 2^16 drives the scale below 1 after 17 skips.
flags = ["inf"] * 20
cases.append({"name": "collapse", "init_scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "flags": flags, "steps": run(flags)})
# Compact: flags and stepped as strings of 0/1, scales and growth trackers as arrays.
for case in cases:
    case["flags"] = "".join("1" if f is not None else "0" for f in case["flags"])
    steps = case.pop("steps")
    case["scales"] = [s["scale"] for s in steps]
    case["stepped"] = "".join("1" if s["stepped"] else "0" for s in steps)
    case["growth_trackers"] = [s["growth_tracker"] for s in steps]
json.dump({"torch": torch.__version__, "cases": cases}, open("Tests/Fixtures/grad-scaler/sequences.json", "w"), separators=(",", ":"))
print({c["name"]: (c["scales"][-1], c["stepped"].count("0")) for c in cases})
