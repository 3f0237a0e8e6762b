#!/usr/bin/env python3
"""Compiles CUDA kernel files with NVRTC as the backend does, without building Swift (for quick kernel edits).

Usage: scripts/nvrtc_check.py [--targets sm_80,sm_90a,...] [--dtype bf16|fp16|both] [--ptxas-verbose] FILE.cu ...
Uses the NVRTC of scripts/compile_kernels.sh (.build/nvrtc) or $NVRTC_LIB. Options as NVRTC.swift's
`options(for:computeDType:)`: -arch, -std=c++17, -default-device, -DQLORA_NVRTC=1 (and -DQLORA_HALF=1 for fp16);
--ptxas-verbose adds --ptxas-options=-v and prints each kernel's registers, spill stores/loads and shared memory
(sm_ targets only: compute_ targets stop at PTX);
qlora_prelude.cuh is passed as an in-memory header. `scripts/compile_kernels.sh` remains the authoritative check.
"""
import ctypes, glob, os, sys, argparse

def load_nvrtc():
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.environ.get("NVRTC_LIB", "")] + glob.glob(os.path.join(here, "..", ".build", "nvrtc", "nvidia", "cu13", "lib", "libnvrtc.so*")) \
        + glob.glob("/work/main/.build/nvrtc/nvidia/cu13/lib/libnvrtc.so*") + glob.glob("/tmp/nvrtc/nvidia/cu13/lib/libnvrtc.so*")
    for c in candidates:
        if c and os.path.exists(c):
            d = os.path.dirname(os.path.abspath(c))
            for b in glob.glob(os.path.join(d, "libnvrtc-builtins.so*")):
                ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)  # NVRTC dlopens its builtins by name
            return ctypes.CDLL(c)
    sys.exit("libnvrtc not found: run scripts/compile_kernels.sh once (it downloads NVRTC into .build/nvrtc) or set NVRTC_LIB")

def compile_one(lib, path, arch, half, ptxas_verbose=False):
    src = open(path, "rb").read()
    kdir = os.path.dirname(os.path.abspath(path))
    hdr_names, hdr_srcs = [], []
    for h in sorted(glob.glob(os.path.join(kdir, "*.cuh"))):
        hdr_names.append(os.path.basename(h).encode()); hdr_srcs.append(open(h, "rb").read())
    prog = ctypes.c_void_p()
    n = len(hdr_names)
    srcs = (ctypes.c_char_p * n)(*hdr_srcs); names = (ctypes.c_char_p * n)(*hdr_names)
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(), n, srcs, names)
    assert rc == 0, rc
    opts = [f"-arch={arch}", "-std=c++17", "-default-device", "-DQLORA_NVRTC=1"] + (["-DQLORA_HALF=1"] if half else []) \
        + (["--ptxas-options=-v"] if ptxas_verbose and arch.startswith("sm_") else [])
    copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), copts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    text = log.value.decode(errors="replace").strip()
    return rc == 0, text

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--targets", default="sm_80,sm_90a")
    p.add_argument("--dtype", default="both", choices=["bf16", "fp16", "both"])
    p.add_argument("--ptxas-verbose", action="store_true", help="print ptxas' registers and spills per kernel")
    p.add_argument("files", nargs="+")
    a = p.parse_args()
    lib = load_nvrtc()
    failed = 0
    for f in a.files:
        for arch in a.targets.split(","):
            for half in ([False, True] if a.dtype == "both" else [a.dtype == "fp16"]):
                if not half and arch.endswith("_75"):
                    continue  # Turing runs the fp16 path only
                ok, log = compile_one(lib, f, arch, half, a.ptxas_verbose)
                tag = f"{os.path.basename(f)} {arch} {'fp16' if half else 'bf16'}"
                print(("ok   " if ok else "FAIL ") + tag)
                if log and (not ok or "warning" in log or a.ptxas_verbose):
                    print(log)
                failed += not ok
    print(f"{failed} failed")
    sys.exit(1 if failed else 0)

main()
