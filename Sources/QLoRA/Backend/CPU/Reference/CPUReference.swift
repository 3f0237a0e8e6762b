// Naive CPU references for the CUDA ops: plain loops in fp32 (sums in Double where the GPU sums many terms),
// written to be obviously right rather than fast. The GPU check tool (qlora-gpu-check) compares every CUDA op
// against these on random inputs. This is not the CPU backend (that one is fast); it is the yardstick.
//
// Tensors are flat row-major [Float] arrays; bf16 tensors are given as the Float values of their bf16 bits.
// Each op family's formulas and derivations are in the matching kernel file (Backend/CUDA/Kernels/<op>.cu).

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// Reference implementations of the CUDA ops (see the file header).
public enum CPUReference {}
