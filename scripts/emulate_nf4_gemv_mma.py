#!/usr/bin/env python3
"""Emulates decode.cu's nf4_gemv_mma lane by lane on the CPU (numpy), to check its index logic without a GPU.

Follows the kernel's per-lane arithmetic exactly: the 8 warps' column ranges (groups of 64 values, cycles of 4), each
lane's 8-byte loads of rows g and g + 8, the pair table (entry v = (NF4[v >> 4], NF4[v & 15]) as an mma A register),
the mma.sync m16n8k16 fragment layouts (A: a0..a3 = row g | g+8 at k 2t, 2t+1 | 2t+8, 2t+9; B: column g; C: c0..c3 =
rows g | g+8 at columns 2t, 2t+1), the column trick (group i of a cycle reaches columns 2i, 2i+1 only, so lane (g, t)
scales column 2t by group c0 + t's absmax), and the sums over lanes and warps. Exact NF4 values (the kernel rounds them
to h16; that rounding is the GPU check's business). Prints the max relative error against W x per shape and fails
above 1e-5. Two deliberate faults (x given to every lane; lane t scaling group t + 1) give errors of order 1.
Usage: scripts/emulate_nf4_gemv_mma.py   (needs numpy; about a minute)
"""
import numpy as np, sys
NF4=np.array([-1.0,-0.6961928009986877,-0.5250730514526367,-0.39491748809814453,-0.28444138169288635,-0.18477343022823334,-0.09105003625154495,0.0,0.07958029955625534,0.16093020141124725,0.24611230194568634,0.33791524171829224,0.44070982933044434,0.5626170039176941,0.7229568362236023,1.0],dtype=np.float32)
rng=np.random.default_rng(1)
def run(rows, cols, bs, WARPS=8):
    codes=rng.integers(0,16,size=(rows,cols))
    packed=(codes[:,0::2]<<4 | codes[:,1::2]).astype(np.uint8).reshape(-1)
    nblk=rows*cols//bs
    absmax=rng.uniform(0.01,1.0,size=nblk).astype(np.float32)
    W=NF4[codes]*np.repeat(absmax,bs).reshape(rows,cols)
    x=rng.uniform(-1,1,size=cols).astype(np.float32)
    ref=W@x
    out=np.zeros(rows)
    lut=[(NF4[v>>4],NF4[v&15]) for v in range(256)]
    groups=cols>>6
    per_warp=((groups+WARPS-1)//WARPS+3)&~3
    nblocks=(rows+15)//16
    for blk in range(nblocks):
        row0=blk*16
        partial=np.zeros((WARPS,16))
        for warp in range(WARPS):
            gb=min(groups,warp*per_warp); ge=min(groups,gb+per_warp)
            acc_a=np.zeros(32); acc_b=np.zeros(32)
            # per lane state
            def lane_rows(lane):
                g=lane>>2
                return min(row0+g,rows-1), min(row0+g+8,rows-1)
            c0=gb
            while c0<ge:
                C=np.zeros((32,4))
                for i in range(4):
                    kb=c0+i
                    if kb>=ge: continue
                    for s in range(4):
                        A=np.zeros((16,16)); B=np.zeros((16,8))
                        for lane in range(32):
                            g,t=lane>>2,lane&3
                            ra,rb=lane_rows(lane)
                            def byte(r,j): return packed[(r*cols)//2 + t*8 + kb*32 + j]
                            # a[0]: row g, k 2t,2t+1 from byte 2s of row ra ; a[1]: row g+8 ; a[2]: row g k 2t+8 from byte 2s+1 ; a[3]
                            for (reg,(m,kk,r,j)) in enumerate([(g,2*t,ra,2*s),(g+8,2*t,rb,2*s),(g,2*t+8,ra,2*s+1),(g+8,2*t+8,rb,2*s+1)]):
                                lo,hi=lut[byte(r,j)]
                                A[m,kk]=lo; A[m,kk+1]=hi
                            # B: b0: k 2t,2t+1 col g ; b1: k 2t+8.. ; x words 2s, 2s+1 of lane's 16 values (x[kb*64+t*16 ...])
                            if (g>>1)==i:
                                xs=x[kb*64+t*16: kb*64+t*16+16]
                            else:
                                xs=np.zeros(16)
                            B[2*t,g]=xs[4*s]; B[2*t+1,g]=xs[4*s+1]
                            B[2*t+8,g]=xs[4*s+2]; B[2*t+9,g]=xs[4*s+3]
                        D=A@B
                        for lane in range(32):
                            g,t=lane>>2,lane&3
                            C[lane]+= [D[g,2*t],D[g,2*t+1],D[g+8,2*t],D[g+8,2*t+1]]
                for lane in range(32):
                    g,t=lane>>2,lane&3
                    ra,rb=lane_rows(lane)
                    kb=c0+t
                    if kb<ge:
                        ba=(ra*cols+kb*64)//bs; bb=(rb*cols+kb*64)//bs
                        acc_a[lane]+=C[lane,0]*absmax[ba]; acc_b[lane]+=C[lane,2]*absmax[bb]
                c0+=4
            for lane in range(0,32,4):
                g=lane>>2
                partial[warp,g]=acc_a[lane:lane+4].sum(); partial[warp,g+8]=acc_b[lane:lane+4].sum()
        for r in range(16):
            if row0+r<rows: out[row0+r]=partial[:,r].sum()
    err=np.abs(out-ref).max()/np.abs(ref).max()
    print(rows,cols,bs,"max rel err",err)
    return err
for shape in [(20,1024,64),(5,64,64),(17,64*37,64),(18,4096,128),(3,64*6,64)]:
    assert run(*shape)<1e-5
