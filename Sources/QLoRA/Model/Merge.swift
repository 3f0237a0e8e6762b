// Merging a LoRA adapter into its base: W' = W + scale·B·A, saved in bf16.
//
// The base is read from its original weights (dequantized only when the folder holds nothing
// but a 4-bit checkpoint), never re-quantized: the merged model is as exact as the files allow.

/// What a merge did, for the command to report.
public struct MergeReport: Sendable {
    public var mergedLayers: Int
    public var tensorsWritten: Int
    /// True when the base folder held only 4-bit weights, so the merge is of dequantized weights.
    public var fromQuantizedBase: Bool
}

public enum AdapterMerge {
    /// The files copied beside the merged weights when the base has them.
    static let companionFiles = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                                 "special_tokens_map.json", "tokenizer.model"]

    /// Writes `model` (with its LoRA adapters attached) merged into bf16 weights in `outputDirectory`.
    /// `baseDirectory` supplies config.json and the tokenizer files; the weights come from the model.
    /// `mergedWeight` computes each linear layer's fp32 W + scale·B·A (default: on the CPU, `mergedWeight(_:)`;
    /// `CUDAAdapterMerge.mergedWeight` on the GPU); the rounding to bf16 is the same either way.
    /// The names this writes: an existing output folder holding only these is replaced, anything else is refused.
    public static var outputFiles: Set<String> { Set(["model.safetensors", "config.json"] + companionFiles) }

    public static func write(model: DecoderModel, baseDirectory: String, fromQuantizedBase: Bool, to outputDirectory: String,
                             mergedWeight merge: ((Linear) throws -> [Float])? = nil) throws -> MergeReport {
        try FileSystem.refuseOverwrite(output: outputDirectory, option: "the merge output", inputs: [("base model", baseDirectory)])
        try FileSystem.checkReplaceable(outputDirectory, option: "the merge output", replaceable: outputFiles)
        var records: [TensorRecord] = []
        var merged = 0
        func add(_ name: String, _ values: UnsafeBufferPointer<Float>, _ shape: [Int]) {
            records.append(TensorRecord(name: name, dtype: .bf16, shape: shape, data: encodeFloats(values, as: .bf16)))
        }
        // Names as the base's files hold them (Gemma 3 multimodal: `language_model.model.…`, as transformers saves it).
        let c = model.config
        add(c.checkpointName(c.modulePrefix + "embed_tokens.weight"), UnsafeBufferPointer(model.embedding.storage),
            [model.embedding.rows, model.embedding.columns])
        for (l, block) in model.blocks.enumerated() {
            let prefix = c.layerPrefix(l)
            for (name, weight) in block.namedNorms(sandwich: c.sandwichNorms) {
                weight.withUnsafeBufferPointer { add(c.checkpointName(prefix + name), $0, [$0.count]) }
            }
            for layer in block.linears {
                let weight = try merge?(layer) ?? mergedWeight(layer)
                guard weight.count == layer.outFeatures * layer.inFeatures else {
                    throw UsageError("\(layer.name): the merged weight has \(weight.count) values, not \(layer.outFeatures * layer.inFeatures)")
                }
                // A base and adapter that are finite can still overflow here; such a folder would not load.
                try checkFinite(weight, tensor: layer.name + ".weight", origin: outputDirectory + " (merged weights)")
                if layer.lora != nil { merged += 1 }
                weight.withUnsafeBufferPointer { add(c.checkpointName(layer.name + ".weight"), $0, [layer.outFeatures, layer.inFeatures]) }
                if let bias = layer.bias { bias.withUnsafeBufferPointer { add(c.checkpointName(layer.name + ".bias"), $0, [$0.count]) } }
            }
        }
        model.finalNorm.withUnsafeBufferPointer { add(c.checkpointName(c.modulePrefix + "norm.weight"), $0, [$0.count]) }
        if model.head !== model.embedding {
            add(c.checkpointName("lm_head.weight"), UnsafeBufferPointer(model.head.storage), [model.head.rows, model.head.columns])
        }
        // A multimodal checkpoint's vision tower and projector are copied as stored, so the merged folder loads as the base did.
        if c.modulePrefix != "model.", !fromQuantizedBase {
            let base = try SafeTensorsCheckpoint(directory: baseDirectory)
            for name in base.names.sorted() where c.isOutsideTextModel(name) {
                let info = base.info(name)!
                records.append(TensorRecord(name: name, dtype: info.dtype, shape: info.shape, data: Array(try base.bytes(name))))
            }
        }
        // Written beside the target and renamed into place: an interrupted merge leaves the old folder or none.
        try FileSystem.writeDirectory(outputDirectory) { outputDirectory in
        try SafeTensorsWriter.write(records, metadata: ["format": "pt"], to: outputDirectory + "/model.safetensors")

        // config.json: the base's, without a quantization_config (the merged weights are bf16).
        var config = model.config.raw.object ?? JSONObject()
        config["quantization_config"] = nil
        config["torch_dtype"] = nil
        config["dtype"] = .string("bfloat16")
        try FileSystem.writeAtomically(outputDirectory + "/config.json", text: JSONValue.object(config).serialized(.init(indent: 2)) + "\n")
        for name in companionFiles where FileSystem.exists(baseDirectory + "/" + name) {
            try FileSystem.writeAtomically(outputDirectory + "/" + name, bytes: try FileSystem.readFile(baseDirectory + "/" + name))
        }
        }
        return MergeReport(mergedLayers: merged, tensorsWritten: records.count, fromQuantizedBase: fromQuantizedBase)
    }

    /// W + scale·B·A in fp32, as PEFT's merge computes it.
    static func mergedWeight(_ layer: Linear) -> [Float] {
        var w = layer.weight.values()
        guard let lora = layer.lora else { return w }
        // B·A: [out, r]·[r, in]
        let delta = Matrix(rows: layer.outFeatures, columns: layer.inFeatures)
        CPUMatmul.gemmNN(lora.b.pointer, lora.a.pointer, delta.pointer, m: layer.outFeatures, n: layer.inFeatures, k: lora.rank)
        for i in w.indices { w[i] += delta.pointer[i] * lora.scale }
        return w
    }
}
