#!/usr/bin/env python3
"""Counts one QLoRA training step's work on the GPU trainer, per kind, from the architecture's shapes and what
CUDADecoderTrainer.forwardBackward launches (forward, recomputation without down_proj's base product, backward),
and turns it into milliseconds at an assumed GEMM rate and memory bandwidth. docs/PERFORMANCE.md (session 7) holds
its output for the 1B and 8B shapes. Counts, not measurements: the profile (Nsight Compute) is the judge.

With --fold, also the LoRA traffic with the rank-r products folded into the base GEMMs (CUDATrainerMemoryOptions.foldLoRA,
Model/LoRAFoldLayout.swift): the forward and the recomputation no longer re-read and re-write y for q, k, v, gate, up,
down (o_proj stays apart), for K grown by each folded linear's tail (its x·Aᵀ and those before it in its group).

With --fold-backward, also the backward's fold (CUDATrainerMemoryOptions.foldLoRABackward, LoRAFoldLayout.swift's
second part): dx = [dy | s·dy·B]·[W ; A] for o_proj, gate_proj, up_proj and down_proj (their dy is the residual
gradient or gate/up, whose writers leave r spare columns), so dx is written once instead of re-read and re-written by
the rank-r add (2·2N·in bytes a linear), for the dx GEMM's K grown by r; and what folding q, k, v too would add (their
dy comes from the attention backward, which would have to write rows of out + r).

Usage: python3 scripts/count_step_work.py [--fold] [--fold-backward] [--rank R]
"""
import sys
FOLD = "--fold" in sys.argv
FOLD_BACKWARD = "--fold-backward" in sys.argv
R = int(sys.argv[sys.argv.index("--rank") + 1]) if "--rank" in sys.argv else 16

def shape(name, L, H, I, q, kv, V, N, hd, heads, B, S):
    lin = [(q,H),(kv,H),(kv,H),(H,q),(I,H),(I,H),(H,I)]  # (out,in)
    P = sum(o*i for o,i in lin)
    # base GEMM flops: forward 2NP, recompute 2N(P - down), backward dx 2NP
    down = H*I
    base = L*(2*N*P + 2*N*(P-down) + 2*N*P)
    head = 2*2*N*V*H
    # attention (causal) fwd 4*B*heads*S^2*hd/2, recompute fwd again, bwd 2.5x
    att = L*(4*B*heads*S*S*hd/2)*(1+1+2.5)
    # LoRA GEMMs: bytes (bf16) per linear: fwd: read x (xA), read+write y (beta=1) ; recompute same (down: xA only);
    # bwd: read dy twice (dB, dyB), read x (dA), read+write dx (dyB*A, beta=1)
    lora = 0
    for j,(o,i) in enumerate(lin):
        fwd = i + 2*o
        rec = i + (0 if j==6 else 2*o)
        bwd = 2*o + i + 2*i
        lora += 2*N*(fwd+rec+bwd)
    lora *= L
    # Folded (no dropout): per pass, each folded linear's x·Aᵀ reads x and writes r columns into it, its base GEMM reads
    # tail + r more columns of x and of the weight, and y is written once by the base GEMM: 2·o bytes per token saved.
    # Groups: q, k, v (tails 0, r, 2r); gate, up (0, r); down (0); o_proj apart. The weight scratch's tail (out × (tail
    # + r)) is written by lora_fold_tail and read by the GEMM: counted with the dequantization's bytes.
    tails = [0, R, 2*R, None, 0, R, 0]
    lora_folded = 0
    fold_flops = 0
    for j,(o,i) in enumerate(lin):
        t = tails[j]
        if t is None:
            fwd = i + 2*o; rec = i + 2*o
        else:
            fwd = i + (t + R)
            rec = i + (0 if j==6 else (t + R))
            fold_flops += 2*N*o*(t + R) * (1 if j==6 else 2)  # forward, and the recomputation but for down_proj's
        bwd = 2*o + i + 2*i
        lora_folded += 2*N*(fwd+rec+bwd)
    lora_folded *= L
    fold_flops *= L
    fold_tail_bytes = L*2*sum(o*((tails[j] or 0) + R)*2 for j,(o,i) in enumerate(lin) if tails[j] is not None)*2
    # CE: logits chunk written by GEMM, read+written by CE kernel, read by dNorm GEMM: 4 * N*V*2 bytes
    ce = 4*N*V*2
    # dequantization, 0.5 + 2 bytes per element (+ absmax codes): before, 20 per block (forward 7, recomputation 6,
    # backward 7); with kept block weights 14 (the backward dequantizes down_proj alone)
    dq_old = L*(P + (P-down) + P)*2.52
    dq_new = L*(P + (P-down) + down)*2.52
    # swiglu: fwd read gate, up write act (x2 fwd+rec), bwd read dh, gate, up, write dgate, dup
    sw = L*N*I*2*(3+3+5)
    # rmsnorm: 2 per block fwd (+rec) read x write y, bwd read x, dy, (dx accum r/w) ~ 4
    rms = L*N*H*2*(2*2*2 + 2*5)
    rope = L*N*(q+kv)*2*2*3
    # The backward's fold: per folded linear, dx's re-read and re-write by the rank-r add (2·i bytes a token each way)
    # go; the dy·B GEMM writes its r columns into dy's spare ones (as it wrote dyB); the dx GEMM's K grows by r; A's r
    # rows are copied under W (r·in read + written).
    backward_folds = {"o, gate, up, down": [3, 4, 5, 6], "all seven": list(range(7))}
    bwd_saved = {k: L*2*N*sum(2*lin[j][1] for j in js) for k, js in backward_folds.items()}
    bwd_flops = {k: L*2*N*R*sum(lin[j][1] for j in js) for k, js in backward_folds.items()}
    bwd_copy = {k: L*2*2*R*sum(lin[j][1] for j in js) for k, js in backward_folds.items()}
    return dict(name=name, base=base, head=head, att=att, lora=lora, ce=ce, dq_old=dq_old, dq_new=dq_new, sw=sw, rms=rms, rope=rope, N=N,
                lora_folded=lora_folded, fold_flops=fold_flops, fold_tail_bytes=fold_tail_bytes,
                bwd_saved=bwd_saved, bwd_flops=bwd_flops, bwd_copy=bwd_copy)

for s, step_ms, uns_ms in [(shape("llama-3.2-1b",16,2048,8192,2048,512,128256,8192,64,32,4,2048), 8192/47282*1e3, 8192/47732*1e3),
          (shape("llama-2-7b",32,4096,11008,4096,4096,32000,4096,128,32,2,2048), 4096/10583*1e3, 4096/10319*1e3),
          (shape("llama-3.1-8b",32,4096,14336,4096,1024,128256,4096,128,32,2,2048), 4096/10031*1e3, 4096/9733*1e3)]:
    gemm_rate=615e12; bw=2.8e12
    t = {}
    t['base GEMMs'] = s['base']/gemm_rate
    t['head GEMMs'] = s['head']/gemm_rate
    t['LoRA GEMMs (memory)'] = s['lora']/bw
    t['cross-entropy logits traffic'] = s['ce']/bw
    t['dequant (old, 1.6 TB/s)'] = s['dq_old']/1.6e12
    t['swiglu'] = s['sw']/bw
    t['rmsnorm'] = s['rms']/bw
    t['rope'] = s['rope']/bw
    print(s['name'], "step %.1f ms (Unsloth %.1f)"%(step_ms, uns_ms))
    tot=0
    for k,v in t.items():
        print("  %-32s %7.1f ms  %5.1f%%"%(k, v*1e3, v*1e3/step_ms*100)); tot+=v*1e3
    print("  attention FLOPs %.1f TFLOP (%.1f ms at 200 TFLOP/s)"%(s['att']/1e12, s['att']/200e12*1e3))
    print("  sum of the estimates above %.1f ms; base %.2f TFLOP, head %.2f TFLOP, LoRA %.1f GB, CE %.1f GB, dq old %.1f GB new %.1f GB"%(tot, s['base']/1e12, s['head']/1e12, s['lora']/1e9, s['ce']/1e9, s['dq_old']/1e9, s['dq_new']/1e9))
    if FOLD:
        saved = s['lora'] - s['lora_folded']
        print("  folded LoRA (r %d): LoRA GEMM traffic %.1f GB -> %.1f GB (%.1f GB saved, %.1f ms at %.1f TB/s, %.1f%% of the step);"
              % (R, s['lora']/1e9, s['lora_folded']/1e9, saved/1e9, saved/bw*1e3, bw/1e12, saved/bw*1e3/step_ms*100))
        print("  its cost: %.3f TFLOP more in the base GEMMs (%.1f ms at %.0f TFLOP/s, +%.2f%% of the base FLOPs), %.2f GB of weight tails (%.2f ms)"
              % (s['fold_flops']/1e12, s['fold_flops']/gemm_rate*1e3, gemm_rate/1e12, s['fold_flops']/s['base']*100,
                 s['fold_tail_bytes']/1e9, s['fold_tail_bytes']/bw*1e3))
    if FOLD_BACKWARD:
        for k in s['bwd_saved']:
            saved = s['bwd_saved'][k]
            print("  backward fold (%s, r %d): %.1f GB less LoRA traffic (%.1f ms at %.1f TB/s, %.1f%% of the step); its cost %.3f TFLOP "
                  "(%.2f ms at %.0f TFLOP/s), %.3f GB of A rows (%.2f ms)"
                  % (k, R, saved/1e9, saved/bw*1e3, bw/1e12, saved/bw*1e3/step_ms*100, s['bwd_flops'][k]/1e12,
                     s['bwd_flops'][k]/gemm_rate*1e3, gemm_rate/1e12, s['bwd_copy'][k]/1e9, s['bwd_copy'][k]/bw*1e3))
