// Which decoder variations the CUDA trainer and decode path compute. A model that needs another one is refused,
// by name, before anything is uploaded, rather than computed as a Llama block. (The GPU merge is per linear layer
// and computes any of them: a fused projection is one larger W + scale·B·A.)

extension DecoderConfig {
    /// Throws, naming every variation of this config the CUDA kernels do not compute; `what` is the work asked
    /// ("training", "generation").
    func checkCUDASupport(for what: String) throws {
        var missing: [String] = []
        if fusedProjections { missing.append("fused qkv_proj and gate_up_proj") }
        if rotaryDim != headDim {
            missing.append("partial rotary embeddings (partial_rotary_factor: \(rotaryDim) of \(headDim) head dimensions rotated)")
        }
        if ropeScaling.kind == .longrope { missing.append("longrope scaling (short_factor / long_factor)") }
        guard missing.isEmpty else {
            throw UsageError("the CUDA backend does not compute \(modelType) models yet: \(missing.joined(separator: ", ")); use --device cpu for \(what)")
        }
    }
}
