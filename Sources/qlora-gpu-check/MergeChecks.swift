// GPU merge checks (`--only merge`):
//   merge: nf4 dequantize fp32   the merge's fp32 NF4 dequantization (nf4_dequantize_double_quant_f32) against
//                                `QuantizedWeight.dequantize()`: every weight of the bnb fixture (dtype fp32) and a
//                                random bf16-dtype weight, bit for bit (0 mismatches allowed)
//   merge: <base> vs CPU         `AdapterMerge.write` with `CUDAAdapterMerge` against the CPU merge, on the tiny-llama
//                                fixture's dense base and its bnb NF4 base, with a random adapter (the fixture adapter's
//                                shapes, A and B uniform in ±0.1, so scale·B·A is about as large as W): same files,
//                                same config.json, same tensor names and shapes, and every bf16 value within one ulp of
//                                the CPU's plus what fp32 arithmetic allows. Why: both add the same fp32 terms, but B·A's
//                                r products are summed in another order and the GEMM's epilogue rounds scale·sum + W its
//                                own way, so the fp32 results may differ by a few fp32 ulps of the terms (|W| and
//                                scale·Σ|B||A|), and the rounding to bf16 can then go the other way. Where the terms
//                                nearly cancel, those fp32 ulps are many bf16 ulps of the small result (seen once: 16
//                                ulps in 625 280 values), so the bound is 1 bf16 ulp of the result + 2⁻¹⁸ of the terms.
//                                Values outside it fail; flips beyond bit-identity are counted and must stay under 1%
//                                of the elements (expected: well under 0.1%). Tensors the merge copies must be identical.

import QLoRA
#if canImport(Glibc)
import Glibc
#endif

/// A bf16 value's position on the number line in ulps (±0 are both 0), for ulp distances.
func bf16Ordinal(_ x: Float) -> Int {
    let bits = Int(floatToBF16(x))
    return bits & 0x8000 != 0 ? -(bits & 0x7fff) : bits
}

/// The distance from x to the next bf16 value away from zero.
func bf16Ulp(_ x: Float) -> Float {
    let r = roundToBF16(abs(x))
    return bf16ToFloat(floatToBF16(r) &+ 1) - r
}

/// |W| + |scale|·Σₖ|B[i,k]|·|A[k,j]| for each element of a merged linear weight: the size of the terms whose sum the
/// merge rounds, which bounds how far two fp32 evaluations of the sum can drift apart.
func mergeTermMagnitudes(_ layer: Linear) throws -> [Float] {
    var m = try layer.weight.values().map(abs)
    guard let lora = layer.lora else { return m }
    let rows = lora.b.rows, rank = lora.a.rows, cols = lora.a.columns
    for i in 0..<rows {
        for k in 0..<rank {
            let b = abs(lora.scale * lora.b.pointer[i * rank + k])
            for j in 0..<cols { m[i * cols + j] += b * abs(lora.a.pointer[k * cols + j]) }
        }
    }
    return m
}

func runMergeChecks(_ ctx: CUDAContext) {
    let directory = fixtureDirectory()

    group("merge: nf4 dequantize fp32") {
        let nf4 = try ModelLoader.load(directory + "/base-bnb-nf4", quantization: .none).model
        var weights: [(String, QuantizedWeight)] = []
        for layer in nf4.linearLayers {
            guard case .quantized(let q) = layer.weight.storage else { continue }
            weights.append((layer.name, q))
        }
        checkTrue("merge: the bnb fixture loads as NF4", weights.count == nf4.linearLayers.count && !weights.isEmpty,
                  "\(weights.count) of \(nf4.linearLayers.count) linear layers are 4-bit")
        let (rows, cols) = (300, 1000)  // 300 000 elements: 4688 blocks of 64, the last partial; 19 nested blocks
        let random = try QuantizedWeight.quantize(rng.floats(rows * cols, -0.1, 0.1), shape: [rows, cols], dtype: .bf16)
        weights.append(("random \(rows)x\(cols), dtype bf16", random))
        let map = try upload(DoubleQuantizedAbsmax.signedDynamicMap)
        for (name, q) in weights {
            let w = try CUDANF4Weight(q, allocator: A, signedDynamicMap: map)
            let out = try poisoned(Float.self, w.count)
            try ctx.dequantize(w, into: out, roundingToBF16: q.dtype == .bf16)
            let gpu = try out.download(), cpu = q.dequantize()
            let mismatches = zip(gpu, cpu).filter { $0.bitPattern != $1.bitPattern }.count
            checkTrue("merge: nf4 -> fp32 \(name.hasPrefix("model.layers.") ? String(name.dropFirst("model.layers.".count)) : name)",
                      mismatches == 0 && gpu.count == cpu.count, "\(mismatches) of \(cpu.count) values differ from the CPU's bits")
        }
    }

    let merge: CUDAAdapterMerge
    do { merge = try CUDAAdapterMerge(context: ctx) } catch {
        group("merge") { throw error }
        return
    }
    for base in ["base", "base-bnb-nf4"] {
        group("merge: \(base) vs CPU") {
            let loaded = try ModelLoader.load(directory + "/" + base, quantization: .none)
            let model = loaded.model
            let peft = try PEFTAdapter.load(directory: directory + "/adapter", into: model)
            var adapted = 0
            for layer in model.linearLayers {
                guard let lora = layer.lora else { continue }
                for i in 0..<lora.a.count { lora.a.storage[i] = rng.uniform(-0.1, 0.1) }
                for i in 0..<lora.b.count { lora.b.storage[i] = rng.uniform(-0.1, 0.1) }
                adapted += 1
            }
            let out = "/tmp/qlora-gpu-check-merge-\(base)-\(getpid())"
            let cpuReport = try AdapterMerge.write(model: model, baseDirectory: loaded.directory,
                                                   fromQuantizedBase: loaded.isPreQuantized, to: out + "-cpu")
            let gpuReport = try AdapterMerge.write(model: model, baseDirectory: loaded.directory,
                                                   fromQuantizedBase: loaded.isPreQuantized, to: out + "-cuda",
                                                   mergedWeight: merge.mergedWeight)
            checkTrue("merge \(base): same report", cpuReport.mergedLayers == gpuReport.mergedLayers && gpuReport.mergedLayers == adapted
                      && cpuReport.tensorsWritten == gpuReport.tensorsWritten,
                      "\(gpuReport.mergedLayers) layers merged (r=\(peft.rank)), \(gpuReport.tensorsWritten) tensors")
            let cpuFiles = try FileSystem.listDirectory(out + "-cpu").sorted(), gpuFiles = try FileSystem.listDirectory(out + "-cuda").sorted()
            checkTrue("merge \(base): same files", cpuFiles == gpuFiles, gpuFiles.joined(separator: ", "))
            checkTrue("merge \(base): same config.json",
                      try FileSystem.readText(out + "-cpu/config.json") == FileSystem.readText(out + "-cuda/config.json"))
            let cpu = try SafeTensorsFile(path: out + "-cpu/model.safetensors")
            let gpu = try SafeTensorsFile(path: out + "-cuda/model.safetensors")
            let cpuKeys = cpu.tensors.map { "\($0.name) \($0.dtype) \($0.shape)" }.sorted()
            let gpuKeys = gpu.tensors.map { "\($0.name) \($0.dtype) \($0.shape)" }.sorted()
            checkTrue("merge \(base): same tensor names, dtypes, shapes", cpuKeys == gpuKeys, "\(gpuKeys.count) tensors")
            var elements = 0, flips = 0, beyond = 0, worst = 0, changed = 0, projected = 0
            var worstName = ""
            for info in cpu.tensors {
                let c = try cpu.floats(info.name), g = try gpu.floats(info.name)
                guard c.count == g.count else {
                    checkTrue("merge \(base): \(info.name) has the CPU's length", false, "\(g.count) vs \(c.count)")
                    continue
                }
                elements += c.count
                let layer = model.linearLayers.first { $0.name + ".weight" == info.name }
                let terms = try layer.map { try mergeTermMagnitudes($0) }
                for i in c.indices where c[i].bitPattern != g[i].bitPattern {
                    let distance = abs(bf16Ordinal(c[i]) - bf16Ordinal(g[i]))
                    let allowed = bf16Ulp(max(abs(c[i]), abs(g[i]))) + (terms.map { $0[i] * 0x1p-18 } ?? 0)
                    if c[i].isNaN || g[i].isNaN || terms == nil || abs(c[i] - g[i]) > allowed { beyond += 1 } else { flips += 1 }
                    if distance > worst { worst = distance; worstName = info.name }
                }
                // The adapter must actually have changed the weights it touches (else the check proves little).
                if info.name.hasSuffix("_proj.weight") {
                    let baseLayer = model.linearLayers.first { $0.name + ".weight" == info.name }
                    if let baseValues = baseLayer?.weight.values(), baseValues.count == c.count {
                        changed += zip(baseValues, c).filter { roundToBF16($0) != $1 }.count
                        projected += c.count
                    }
                }
            }
            checkTrue("merge \(base): the adapter changes the weights", changed > projected / 2,
                      "\(changed) of \(projected) projection values differ from the base's")
            checkTrue("merge \(base): no value beyond 1 bf16 ulp + fp32 rounding of the terms", beyond == 0 && elements > 0,
                      "\(beyond) of \(elements)\(worst > 1 ? ", worst \(worst) ulps in \(worstName)" : "")")
            check("merge \(base): 1-ulp flips (fraction)", Double(flips) / Double(max(elements, 1)), 1e-2,
                  "\(flips) of \(elements) values")
        }
    }
}
