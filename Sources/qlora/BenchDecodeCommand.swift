import ArgumentParser
import QLoRA

/// Batch-1 decode speed on the GPU with random NF4 weights of a real architecture and an unmerged LoRA adapter,
/// against the memory-bandwidth limit (weight bytes read per token over the measured device copy bandwidth); with
/// --batch, also batched generation of many prompts (CUDABatchedInference) and its speed-up over batch-1.
struct BenchDecodeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-decode",
        abstract: "Time batch-1 decode on the GPU (random NF4 weights, unmerged LoRA; --batch: batched generation too) and print one JSON line."
    )

    @Option(help: "Where to run: cuda (the only device this benchmark supports) or auto.")
    var device: String = "cuda"

    @Option(help: "Architecture shape: \(Architecture.allCases.map(\.rawValue).joined(separator: ", ")).")
    var arch: String = Architecture.llama3_1_8b.rawValue

    @Option(parsing: .unconditional, help: "LoRA rank on all seven projections (0: no adapter).")
    var loraR: Int = 16

    @Option(parsing: .unconditional, help: "Tokens to decode (timed).")
    var tokens: Int = 128

    @Option(parsing: .unconditional, help: "Prompt tokens prefilled before decoding.")
    var promptTokens: Int = 16

    @Flag(help: "Launch the decode kernels one by one instead of replaying a CUDA graph.")
    var noGraph = false

    @Option(help: "The fused NF4 GEMV: rows (4 rows per warp, x in shared memory), mma (pair lookup + tensor cores; rows where a shape does not allow it) or splitk (columns split over warps).")
    var gemv: String = "rows"

    @Option(parsing: .unconditional, help: "Also time batched generation with this many sequence slots (0: batch-1 only): --prompts random prompts of --prompt-tokens, --tokens new tokens each, greedy.")
    var batch: Int = 0

    @Option(parsing: .unconditional, help: "Prompts of the batched run (with --batch).")
    var prompts: Int = 1000

    @Option(parsing: .unconditional, help: "Batched steps of at most this many rows use the fused NF4 small-GEMM (passes of 64 rows); larger ones dequantize + cuBLASLt (0: always).")
    var fusedRows: Int = 256

    @Flag(help: "Also time each kernel kind (events between plain launches) and print a breakdown on stderr.")
    var profile = false

    func run() throws {
        // Checked before anything touches the GPU (`fused` was removed in session 10: docs/PERFORMANCE.md).
        guard let kernel = CUDAInference.GEMVKernel(rawValue: gemv) else {
            throw ValidationError("unknown --gemv '\(gemv)' (choose from \(CUDAInference.GEMVKernel.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        guard device == "cuda" || device == "auto" else { throw ValidationError("bench-decode runs on the GPU: use --device cuda") }
        guard let architecture = Architecture(rawValue: arch) else {
            throw ValidationError("unknown architecture '\(arch)' (choose from \(Architecture.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        guard tokens > 0, promptTokens > 0 else { throw ValidationError("--tokens and --prompt-tokens must be positive") }
        guard batch >= 0, prompts > 0, fusedRows >= 0 else { throw ValidationError("--batch and --fused-rows must be non-negative, --prompts positive") }
        try architecture.config.checkCUDASupport(what: "bench-decode --arch \(arch)")
        guard loraR >= 0 else { throw ValidationError("--lora-r must be a non-negative integer (0: no adapter), got \(loraR)") }
        let ctx = try CUDAContext()
        let dev = ctx.device
        printError("device: cuda (\(dev.name))")
        let config = architecture.config
        let inference = try CUDAInference(context: ctx, randomConfig: config, loraRank: loraR, capacity: promptTokens + tokens + 8)
        inference.useGraph = !noGraph
        inference.gemvKernel = kernel

        // Copy bandwidth: 1 GiB device to device, bytes read + written, median of 10.
        let bytes = 1 << 30
        let src = try ctx.allocator.buffer(UInt8.self, count: bytes), dst = try ctx.allocator.buffer(UInt8.self, count: bytes)
        try src.fill(byte: 0x5A)
        let start = try CUDAEvent(device: dev), end = try CUDAEvent(device: dev)
        var copyTimes: [Double] = []
        for i in 0..<12 {
            try start.record(on: dev.stream)
            try dev.copy(deviceTo: dst.pointer, from: src.pointer, bytes: bytes)
            try end.record(on: dev.stream)
            try end.synchronize()
            if i >= 2 { copyTimes.append(try end.milliseconds(since: start)) }
        }
        let copyMs = copyTimes.sorted()[copyTimes.count / 2]
        let bandwidth = 2 * Double(bytes) / (copyMs / 1000)

        var rng = SeededGenerator(seed: 7)
        let prompt = (0..<promptTokens).map { _ in Int(rng.next() % UInt64(config.vocabularySize)) }
        func argmax(_ x: [Float]) -> Int {
            var best = 0
            for i in x.indices where x[i] > x[best] { best = i }
            return best
        }
        // Warm-up (graph capture, first launches), then the timed run.
        var logits = try inference.forward(tokens: prompt, lastOnly: true)
        for _ in 0..<4 { logits = try inference.forward(tokens: [argmax(logits)], lastOnly: true) }
        inference.reset()
        let prefillStart = monotonicSeconds()
        logits = try inference.forward(tokens: prompt, lastOnly: true)
        let prefillSeconds = monotonicSeconds() - prefillStart
        let decodeStart = monotonicSeconds()
        for _ in 0..<tokens { logits = try inference.forward(tokens: [argmax(logits)], lastOnly: true) }
        let decodeSeconds = monotonicSeconds() - decodeStart
        let tokensPerSecond = Double(tokens) / decodeSeconds
        let weightBytes = Double(inference.weightBytesPerToken)
        let limit = bandwidth / weightBytes
        func r(_ x: Double, _ digits: Double = 1000) -> Double { (x * digits).rounded() / digits }
        var batchedFields: [(String, JSONValue)] = []
        if batch > 0 {
            // Batched: the same weights, `batch` slots refilled as sequences end, prefill included in the time.
            let batched = try CUDABatchedInference(weights: inference, slots: batch, capacity: promptTokens + tokens)
            batched.fusedRowLimit = fusedRows
            let batchPrompts = (0..<prompts).map { _ in (0..<promptTokens).map { _ in Int(rng.next() % UInt64(config.vocabularySize)) } }
            let greedy = [SamplingOptions](repeating: SamplingOptions(), count: prompts)
            _ = try batched.generate(prompts: Array(batchPrompts.prefix(batch)), sampling: Array(greedy.prefix(batch)), maxTokens: 2, stopIDs: [])
            let result = try batched.generate(prompts: batchPrompts, sampling: greedy, maxTokens: tokens, stopIDs: [])
            batchedFields = [
                ("batch_slots", .int(Int64(batch))), ("batch_prompts", .int(Int64(prompts))), ("fused_rows", .int(Int64(fusedRows))),
                ("batched_tokens_per_s", .double(r(result.tokensPerSecond, 10))), ("batched_seconds", .double(r(result.seconds))),
                ("batched_speedup", .double(r(result.tokensPerSecond / tokensPerSecond, 100))),
                ("batched_kv_cache_bytes", .int(Int64(batched.kvCacheBytes))),
            ]
        }
        let fields: [(String, JSONValue)] = [
            ("arch", .string(arch)), ("device", .string(dev.name)), ("lora_r", .int(Int64(loraR))), ("prompt_tokens", .int(Int64(promptTokens))),
            ("tokens", .int(Int64(tokens))), ("cuda_graph", .bool(!noGraph)), ("gemv", .string(gemv)),
            ("decode_tokens_per_s", .double(r(tokensPerSecond, 10))), ("ms_per_token", .double(r(1000 / tokensPerSecond))),
            ("prefill_tokens_per_s", .double(r(Double(promptTokens) / prefillSeconds, 10))),
            ("nf4_weight_bytes_per_token", .int(Int64(inference.nf4BytesPerToken))),
            ("weight_bytes_per_token", .int(Int64(inference.weightBytesPerToken))),
            ("copy_bandwidth_gb_s", .double(r(bandwidth / 1e9, 10))),
            ("limit_tokens_per_s", .double(r(limit, 10))),
            ("fraction_of_limit", .double(r(tokensPerSecond / limit))),
            ("kv_cache_bytes", .int(Int64(inference.kvCacheBytes))),
            ("peak_gpu_bytes", .int(Int64(ctx.allocator.peakBytes))),
        ] + batchedFields
        print(JSONValue.object(JSONObject(fields)).serialized())
        if profile {
            inference.reset()
            _ = try inference.forward(tokens: prompt, lastOnly: true)
            let rows = try inference.profileDecode(tokens: min(32, tokens))
            let total = rows.reduce(0) { $0 + $1.milliseconds }
            printError("decode profile (ms per token, plain launches with events; total \(String(cFormat: "%.3f", total)) ms):")
            for r in rows.sorted(by: { $0.milliseconds > $1.milliseconds }) {
                let name = r.name + String(repeating: " ", count: max(0, 28 - r.name.count))
                printError("  " + name + String(cFormat: " %8.3f ms  %5.1f%%  %d launches", r.milliseconds, 100 * r.milliseconds / total, r.launches))
            }
        }
    }
}
