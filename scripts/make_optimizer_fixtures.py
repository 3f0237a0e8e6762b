#!/usr/bin/env python3
"""Reference data for the optimizer, schedule and clipping tests (Tests/Fixtures/optimizers/).

Run from the repository root:  python3 scripts/make_optimizer_fixtures.py
Needs numpy and torch (CPU wheel); bitsandbytes (pip) only to cross-check the dynamic maps.

Writes:
  adamw_torch.safetensors   torch.optim.AdamW (single-tensor path) over 5 steps on random data.
  adamw_8bit.safetensors    A plain numpy float32 re-implementation of bitsandbytes' CUDA kernel
                            kOptimizerStatic8bit2StateBlockwise (blocksize 256, dynamic maps, the
                            binary-search quantizer quantize_2D and its sign fix) plus the 32-bit
                            kernel kOptimizer32bit2State used for tensors under 4096 elements.
  schedules.json            transformers' get_scheduler lr_lambda formulas times the base lr.
  clip.safetensors          torch.nn.utils.clip_grad_norm_ on random gradients.
"""
import ctypes
import json
import math
import os
import struct

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fixtures", "optimizers")
f32 = np.float32
libm = ctypes.CDLL("libm.so.6")
libm.powf.restype = ctypes.c_float
libm.powf.argtypes = [ctypes.c_float, ctypes.c_float]


def powf(a, b):
    """The C library's powf, the same function the Swift code calls."""
    return f32(libm.powf(float(a), float(b)))


def write_safetensors(path, tensors, metadata=None):
    """tensors: list of (name, numpy array) in order."""
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    kinds = {np.dtype("float32"): "F32", np.dtype("uint8"): "U8", np.dtype("float64"): "F64", np.dtype("int64"): "I64"}
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr)
        data = arr.tobytes()
        header[name] = {"dtype": kinds[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


# ---------------------------------------------------------------- torch AdamW

def make_adamw_torch():
    g = torch.Generator().manual_seed(1234)
    shapes = {"layer.0.lora_A": (8, 24), "layer.0.lora_B": (24, 8), "bias": (5,)}
    lrs = [1e-3, 2e-3, 5e-4, 1e-3, 3e-3]
    wd = 0.01
    params = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    out = [(f"init.{n}", p.numpy().copy()) for n, p in params.items()]
    ps = [torch.nn.Parameter(p.clone()) for p in params.values()]
    opt = torch.optim.AdamW(ps, lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, foreach=False, fused=False)
    for step, lr in enumerate(lrs, start=1):
        for group in opt.param_groups:
            group["lr"] = lr
        for n, p in zip(params, ps):
            grad = torch.randn(p.shape, generator=g) * (0.1 if n == "bias" else 1.0)
            if step == 3 and n == "bias":
                grad[0] = 0.0
            p.grad = grad
            out.append((f"step{step}.grad.{n}", grad.numpy().copy()))
        opt.step()
        for n, p in zip(params, ps):
            out.append((f"step{step}.param.{n}", p.detach().numpy().copy()))
    for n, p in zip(params, ps):
        st = opt.state[p]
        out.append((f"final.exp_avg.{n}", st["exp_avg"].numpy().copy()))
        out.append((f"final.exp_avg_sq.{n}", st["exp_avg_sq"].numpy().copy()))
    meta = {"lrs": json.dumps(lrs), "weight_decay": repr(wd), "betas": "[0.9, 0.999]", "eps": "1e-08",
            "names": json.dumps(list(shapes)), "torch": torch.__version__}
    write_safetensors(os.path.join(OUT, "adamw_torch.safetensors"), out, meta)


# ---------------------------------------------------------------- bitsandbytes 8-bit

def create_dynamic_map(signed):
    """bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8), via torch."""
    data = []
    non_sign_bits, max_exp = 7, 7
    for i in range(max_exp):
        items = int(2 ** (i + non_sign_bits - max_exp) + 1 if signed else 2 ** (i + non_sign_bits - max_exp + 1) + 1)
        b = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (256 - len(data))
    data.sort()
    return np.array(data, dtype=f32)


def quantize_2d(x, code, signed):
    """bitsandbytes' quantize_2D (kernels.cu): 7-step binary search, then the nearer neighbour by midpoint."""
    x = x.astype(f32)
    n = x.shape[0]
    pivot = np.full(n, 127, np.int64)
    upper_pivot = np.full(n, 255, np.int64)
    lower_pivot = np.zeros(n, np.int64)
    lower = np.full(n, -1.0 if signed else 0.0, f32)
    upper = np.ones(n, f32)
    val = code[pivot]
    i = 64
    while i > 0:
        gt = x > val
        lower_pivot = np.where(gt, pivot, lower_pivot)
        lower = np.where(gt, val, lower)
        upper_pivot = np.where(gt, upper_pivot, pivot)
        upper = np.where(gt, upper, val)
        pivot = np.where(gt, pivot + i, pivot - i)
        val = code[pivot]
        i >>= 1
    gt = x > val
    mid_up = (upper + val) * f32(0.5)
    mid_lo = (lower + val) * f32(0.5)
    return np.where(gt, np.where(x > mid_up, upper_pivot, pivot), np.where(x < mid_lo, lower_pivot, pivot))


def adam8bit_step(p, g, c1, c2, absmax1, absmax2, step, lr, beta1, beta2, eps, wd, code1, code2):
    """One kOptimizerStatic8bit2StateBlockwise<ADAM> call on float32 data, block by block."""
    lr, beta1, beta2, eps, wd = f32(lr), f32(beta1), f32(beta2), f32(eps), f32(wd)
    correction1 = f32(1) - powf(beta1, step)
    correction2 = np.sqrt(f32(1) - powf(beta2, step))
    step_size = (-lr * correction2) / correction1
    n = p.shape[0]
    p, c1, c2 = p.copy(), c1.copy(), c2.copy()
    absmax1, absmax2 = absmax1.copy(), absmax2.copy()
    for b in range(0, (n + 255) // 256):
        sl = slice(b * 256, min(n, b * 256 + 256))
        gv = g[sl]
        finite = np.isfinite(gv)
        s2 = code2[c2[sl]] * absmax2[b]
        s2 = s2 * beta2 + ((f32(1) - beta2) * gv) * gv
        s1 = code1[c1[sl]] * absmax1[b]
        s1 = s1 * beta1 + (f32(1) - beta1) * gv
        s1 = np.where(finite, s1, f32(0)).astype(f32)
        s2 = np.where(finite, s2, f32(0)).astype(f32)
        m1 = np.max(np.abs(s1)) if s1.size else f32(0)
        m2 = np.max(np.abs(s2)) if s2.size else f32(0)
        if sl.stop - sl.start < 256:
            # The kernel pads a partial block with g = 0, state1 code 128 and state2 code 0; they join the max.
            pad1 = (code1[128] * absmax1[b]) * beta1 + (f32(1) - beta1) * f32(0)
            pad2 = (code2[0] * absmax2[b]) * beta2 + ((f32(1) - beta2) * f32(0)) * f32(0)
            m1 = max(m1, abs(pad1))
            m2 = max(m2, abs(pad2))
        m1, m2 = f32(m1), f32(m2)
        absmax1[b], absmax2[b] = m1, m2
        pv = p[sl]
        newp = pv + step_size * (s1 / (np.sqrt(s2) + correction2 * eps))
        if wd > 0:
            newp = newp * (f32(1) - lr * wd)
        p[sl] = np.where(finite, newp, pv)
        with np.errstate(divide="ignore", invalid="ignore"):
            q1 = quantize_2d(s1 / m1, code1, True)
            q2 = quantize_2d(s2 / m2, code2, False)
        fix = np.signbit(code1[q1]) != np.signbit(s1)
        q1 = np.where(fix, np.where(s1 > 0, q1 + 1, q1 - 1), q1) & 0xFF
        c1[sl] = q1.astype(np.uint8)
        c2[sl] = q2.astype(np.uint8)
    return p, c1, c2, absmax1, absmax2


def adam32_bnb_step(p, g, s1, s2, step, lr, beta1, beta2, eps, wd):
    """kOptimizer32bit2State<ADAM> (update_scale 1, skip_zeros off) on float32 data."""
    lr, beta1, beta2, eps, wd = f32(lr), f32(beta1), f32(beta2), f32(eps), f32(wd)
    correction1 = f32(1) - powf(beta1, step)
    correction2 = np.sqrt(f32(1) - powf(beta2, step))
    step_size = (-lr * correction2) / correction1
    s1 = s1 * beta1 + ((f32(1) - beta1) * g)
    s2 = s2 * beta2 + ((f32(1) - beta2) * (g * g))
    p = p + step_size * (s1 / (np.sqrt(s2) + eps * correction2))
    if wd > 0:
        p = p * (f32(1) - lr * wd)
    return p.astype(f32), s1.astype(f32), s2.astype(f32)


def make_adamw_8bit():
    code1, code2 = create_dynamic_map(True), create_dynamic_map(False)
    try:
        import bitsandbytes.functional as F
        assert np.array_equal(F.create_dynamic_map(signed=True).numpy(), code1)
        assert np.array_equal(F.create_dynamic_map(signed=False).numpy(), code2)
        print("dynamic maps equal bitsandbytes'")
    except ImportError:
        print("bitsandbytes not installed: maps not cross-checked")
    rng = np.random.default_rng(7)
    n_big, n_small = 4096 + 904, 300   # 20 blocks, the last one partial; the small one keeps fp32 state
    lrs = [1e-3, 2e-3, 1e-3, 5e-4, 2e-3]
    beta1, beta2, eps, wd = 0.9, 0.999, 1e-8, 0.01
    p = rng.standard_normal(n_big).astype(f32)
    ps = rng.standard_normal(n_small).astype(f32)
    c1 = np.zeros(n_big, np.uint8)
    c2 = np.zeros(n_big, np.uint8)
    a1 = np.zeros(20, f32)
    a2 = np.zeros(20, f32)
    s1 = np.zeros(n_small, f32)
    s2 = np.zeros(n_small, f32)
    out = [("code.signed", code1), ("code.unsigned", code2), ("init.big", p), ("init.small", ps)]
    for step, lr in enumerate(lrs, start=1):
        scale = np.exp(rng.uniform(-6, 1, n_big)).astype(f32)   # magnitudes over decades, as real gradients
        g = (rng.standard_normal(n_big).astype(f32) * scale).astype(f32)
        g[256:512] = 0.0 if step == 2 else g[256:512]          # an all-zero block: absmax 0
        if step == 4:
            g[10] = np.inf                                     # non-finite: state zeroed, parameter kept
            g[11] = np.nan
        gs = rng.standard_normal(n_small).astype(f32)
        p, c1, c2, a1, a2 = adam8bit_step(p, g, c1, c2, a1, a2, step, lr, beta1, beta2, eps, wd, code1, code2)
        ps, s1, s2 = adam32_bnb_step(ps, gs, s1, s2, step, lr, beta1, beta2, eps, wd)
        out += [(f"step{step}.grad.big", g), (f"step{step}.grad.small", gs),
                (f"step{step}.param.big", p), (f"step{step}.state1.big", c1), (f"step{step}.state2.big", c2),
                (f"step{step}.absmax1.big", a1), (f"step{step}.absmax2.big", a2),
                (f"step{step}.param.small", ps), (f"step{step}.exp_avg.small", s1), (f"step{step}.exp_avg_sq.small", s2)]
    meta = {"lrs": json.dumps(lrs), "weight_decay": repr(wd), "betas": "[0.9, 0.999]", "eps": "1e-08"}
    write_safetensors(os.path.join(OUT, "adamw_8bit.safetensors"), out, meta)


# ---------------------------------------------------------------- schedules (transformers.optimization)

def lam(kind, step, warmup, total, num_cycles=0.5):
    if kind == "constant":
        return 1.0
    if kind == "constant_with_warmup":
        if step < warmup:
            return float(step) / float(max(1.0, warmup))
        return 1.0
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    if kind == "cosine":
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))
    raise ValueError(kind)


def make_schedules():
    cases = []
    for kind in ["constant", "constant_with_warmup", "linear", "cosine"]:
        for total, warmup_steps, warmup_ratio in [(100, 10, None), (37, None, 0.03), (250, None, 0.1), (7, 0, None), (5, 9, None)]:
            warmup = warmup_steps if warmup_steps is not None else math.ceil(total * warmup_ratio)
            base = 2e-4
            cases.append({"kind": kind, "total": total, "warmup_steps": warmup_steps, "warmup_ratio": warmup_ratio,
                          "resolved_warmup": warmup, "base_lr": base,
                          "lrs": [base * lam(kind, s, warmup, total) for s in range(total + 3)]})
    with open(os.path.join(OUT, "schedules.json"), "w") as f:
        json.dump({"source": "transformers.optimization lr_lambda formulas times base_lr (LambdaLR); "
                             "lrs[s] is the rate after s scheduler steps", "cases": cases}, f, indent=1)


# ---------------------------------------------------------------- clipping

def make_clip():
    g = torch.Generator().manual_seed(99)
    grads = [torch.randn(s, generator=g) * 3 for s in [(13, 7), (100,), (4, 4)]]
    out = []
    for i, gr in enumerate(grads):
        out.append((f"grad{i}", gr.numpy().copy()))
    norms = []
    for max_norm in [1.0, 1000.0]:
        ps = [torch.nn.Parameter(torch.zeros_like(gr)) for gr in grads]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        total = torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=False)
        norms.append(total.item())
        for i, p in enumerate(ps):
            out.append((f"clipped{int(max_norm)}.grad{i}", p.grad.numpy().copy()))
    write_safetensors(os.path.join(OUT, "clip.safetensors"), out, {"total_norm": json.dumps(norms)})


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    make_adamw_torch()
    make_adamw_8bit()
    make_schedules()
    make_clip()
    print("wrote", OUT)
