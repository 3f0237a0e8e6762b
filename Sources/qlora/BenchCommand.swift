import ArgumentParser
import QLoRA

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Time QLoRA training steps (and batch-1 decoding) on random weights of a real architecture; prints one JSON line."
    )

    @Option(help: "Architecture: \(Architecture.allCases.map(\.rawValue).joined(separator: ", ")).")
    var arch: String = "smollm2-135m"
    @Option(help: "Micro-batch size (rows).")
    var batch: Int = 1
    @Option(help: "Sequence length of each row.")
    var seq: Int = 256
    @Option(name: .customLong("lora-r"), help: "LoRA rank on the seven projections (alpha = 2r).")
    var loraR: Int = 16
    @Option(help: "Timed steps after one warm-up step.")
    var steps: Int = 2
    @Option(help: "Tokens to decode for the batch-1 decode measurement (0 to skip).")
    var decodeTokens: Int = 32

    func run() throws {
        guard let architecture = Architecture(rawValue: arch) else {
            throw ValidationError("unknown --arch '\(arch)' (choose from \(Architecture.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        let model = LlamaModel.random(config: architecture.config)
        try model.attachLoRA(LoRAConfig(rank: loraR, alpha: Double(2 * loraR), targetModules: LoRAConfig.llamaProjections), seed: 0)
        let training = try CPUBenchmark.training(model: model, batch: batch, sequenceLength: seq, steps: steps)
        for layer in model.linearLayers { layer.lora = nil }
        let decode = decodeTokens > 0 ? try CPUBenchmark.decode(model: model, promptLength: 16, tokens: decodeTokens) : 0
        print(#"{"device": "cpu", "arch": "\#(arch)", "batch": \#(batch), "seq": \#(seq), "lora_r": \#(loraR), "threads": \#(CPUParallelism.threads), "tokens_per_s": \#(rounded(training.tokensPerSecond)), "step_s": \#(rounded(training.stepSeconds)), "useful_tflops": \#(rounded(training.usefulTFLOPs * 1000) / 1000), "decode_tokens_per_s": \#(rounded(decode))}"#)
    }

    func rounded(_ x: Double) -> Double { (x * 100).rounded() / 100 }
}
