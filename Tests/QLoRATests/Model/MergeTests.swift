import XCTest
@testable import QLoRA

final class MergeTests: XCTestCase {
    func testMergedCheckpointEqualsPEFTMergeWithinBF16Rounding() throws {
        let model = try LlamaForwardTests.loadTinyLlama()
        try PEFTAdapter.load(directory: TestFixtures.path("tiny-llama/adapter"), into: model)
        let out = try TestFixtures.temporaryDirectory()
        let report = try AdapterMerge.write(model: model, baseDirectory: TestFixtures.path("tiny-llama/base"), fromQuantizedBase: false, to: out)
        XCTAssertEqual(report.mergedLayers, 14)
        let ours = try SafeTensorsFile(path: out + "/model.safetensors")
        let reference = try SafeTensorsFile(path: TestFixtures.path("tiny-llama/merged-bf16/model.safetensors"))
        XCTAssertEqual(ours.names.sorted(), reference.names.sorted())
        var identical = 0, total = 0
        for t in reference.tensors {
            XCTAssertEqual(ours.info(t.name)?.dtype, t.dtype, t.name)
            XCTAssertEqual(ours.info(t.name)?.shape, t.shape, t.name)
            let a = try ours.floats(t.name), b = try reference.floats(t.name)
            for i in a.indices {
                total += 1
                if a[i] == b[i] { identical += 1; continue }
                // At most one bf16 step apart (rounding of the same fp32 sum).
                XCTAssertLessThanOrEqual(abs(a[i] - b[i]), abs(b[i]) * Float(1.0 / 128), "\(t.name)[\(i)]: \(a[i]) vs \(b[i])")
            }
        }
        XCTAssertGreaterThan(Double(identical) / Double(total), 0.99, "\(identical) of \(total) identical")
        // The merged folder loads as a plain model and gives the adapter's logits.
        let merged = try DecoderModel(config: try DecoderConfig(directory: out), weights: try SafeTensorsCheckpoint(directory: out))
        let row = try LlamaForwardTests.inputRows()[0]
        let logits = try merged.forward(tokens: row, cache: KVCache(config: merged.config, capacity: row.count))
        let reference2 = Array(try LlamaForwardTests.expected().floats("logits_bf16base_lora").prefix(logits.count))
        XCTAssertLessThan(relativeError(logits, reference2), 1e-2)
    }

    /// The per-layer function `write` takes (the GPU merge's seam): its values are what is written, and a result of
    /// the wrong length is refused with the layer's name.
    func testWriteTakesTheMergedWeightsFromTheGivenFunction() throws {
        let model = try LlamaForwardTests.loadTinyLlama()
        try PEFTAdapter.load(directory: TestFixtures.path("tiny-llama/adapter"), into: model)
        let base = TestFixtures.path("tiny-llama/base")
        let plain = try TestFixtures.temporaryDirectory(), given = try TestFixtures.temporaryDirectory()
        _ = try AdapterMerge.write(model: model, baseDirectory: base, fromQuantizedBase: false, to: plain)
        var calls = 0
        _ = try AdapterMerge.write(model: model, baseDirectory: base, fromQuantizedBase: false, to: given) { layer in
            calls += 1
            return AdapterMerge.mergedWeight(layer)
        }
        XCTAssertEqual(calls, model.linearLayers.count)
        XCTAssertEqual(try FileSystem.readFile(plain + "/model.safetensors"), try FileSystem.readFile(given + "/model.safetensors"))
        XCTAssertThrowsError(try AdapterMerge.write(model: model, baseDirectory: base, fromQuantizedBase: false,
                                                    to: try TestFixtures.temporaryDirectory()) { _ in [1, 2, 3] }) { error in
            XCTAssertTrue("\(error)".contains("model.layers.0.self_attn.q_proj"), "\(error)")
        }
    }
}
