import XCTest
@testable import QLoRA

/// `convert` checks the GGUF metadata against the tensors before writing anything, and what it writes loads.
final class GGUFConversionValidationTests: XCTestCase {
    typealias Metadata = [(key: String, value: GGUFValue)]

    /// The tiny llama of GGUFConversionTests with its metadata and tensors edited.
    func tinyGGUF(metadata edit: (inout Metadata) -> Void = { _ in }, tensors editTensors: (inout [GGUFTensorRecord]) -> Void = { _ in }) throws -> [UInt8] {
        let original = try GGUFConversionTests.tinyModel().gguf
        let dir = try TestFixtures.temporaryDirectory()
        try FileSystem.writeAtomically(dir + "/original.gguf", bytes: original)
        let file = try GGUFFile(path: dir + "/original.gguf")
        var metadata = file.metadata
        var tensors = file.tensors.map { GGUFTensorRecord(name: $0.name, type: $0.type, dimensions: $0.dimensions, data: Array(file.bytes($0))) }
        edit(&metadata)
        editTensors(&tensors)
        return try GGUFWriter.serialize(metadata: metadata, tensors: tensors)
    }

    func set(_ key: String, _ value: GGUFValue) -> (inout Metadata) -> Void {
        { metadata in metadata = metadata.map { $0.key == key ? (key, value) : $0 } }
    }

    /// Converts `bytes`; on failure checks that no output folder was made and rethrows.
    func convert(_ bytes: [UInt8], name: String = #function) throws -> String {
        let dir = try TestFixtures.temporaryDirectory(name)
        try FileSystem.writeAtomically(dir + "/m.gguf", bytes: bytes)
        do {
            try GGUFConverter.convert(gguf: dir + "/m.gguf", to: dir + "/hf")
        } catch {
            XCTAssertFalse(FileSystem.exists(dir + "/hf"), "a failed conversion wrote \(dir)/hf")
            throw error
        }
        return dir + "/hf"
    }

    func testWhatConvertWritesLoads() throws {
        for untied in [true, false] {
            let folder = try convert(try GGUFConversionTests.tinyModel(untied: untied).gguf)
            let loaded = try ModelLoader.load(folder, quantization: .none)
            XCTAssertEqual(loaded.model.blocks.count, GGUFConversionTests.layers)
            XCTAssertEqual(loaded.model.config.tieWordEmbeddings, !untied)
            let logits = try loaded.model.forward(tokens: [1, 4, 5], cache: KVCache(config: loaded.model.config, capacity: 3))
            XCTAssertTrue(logits.allSatisfy(\.isFinite))
        }
    }

    func testBlockCountMustAgreeWithTheTensors() throws {
        assertRejected(try convert(try tinyGGUF(metadata: set("llama.block_count", .uint32(3)))),
                       "missing the tensor that becomes 'model.layers.2.", "3 blocks")
        assertRejected(try convert(try tinyGGUF(metadata: set("llama.block_count", .uint32(1)))), "tensor 'blk.1.", "1 layers")
    }

    func testZeroDimensionsAndWrongShapesAreErrors() throws {
        let empty = try tinyGGUF(tensors: { list in
            let i = list.firstIndex { $0.name == "blk.1.ffn_norm.weight" }!
            list[i] = GGUFTensorRecord(name: "blk.1.ffn_norm.weight", floats: [], dimensions: [0])
        })
        assertRejected(try convert(empty), "model.layers.1.post_attention_layernorm.weight", "shape [0], expected [64]")
        assertRejected(try convert(try tinyGGUF(metadata: set("llama.feed_forward_length", .uint32(80)))),
                       "model.layers.0.mlp.", "80 feed-forward")
        assertRejected(try convert(try tinyGGUF(metadata: set("llama.feed_forward_length", .uint32(0)))), "llama.feed_forward_length", "positive")
    }

    func testHeadCountsMustDivide() throws {
        assertRejected(try convert(try tinyGGUF(metadata: set("llama.attention.head_count_kv", .uint32(3)))), "KV heads")
    }

    func testNumbersOutOfRangeAreErrors() throws {
        assertRejected(try convert(try tinyGGUF(metadata: set("llama.attention.layer_norm_rms_epsilon", .float32(-1e-5)))),
                       "llama.attention.layer_norm_rms_epsilon", "finite number > 0")
        assertRejected(try convert(try tinyGGUF(metadata: set("llama.rope.freq_base", .float32(.nan)))), "llama.rope.freq_base")
        assertRejected(try convert(try tinyGGUF(metadata: set("llama.context_length", .uint32(0)))), "llama.context_length")
    }

    func testNonFiniteTensorValuesAreErrors() throws {
        let bytes = try tinyGGUF(tensors: { list in
            let i = list.firstIndex { $0.name == "blk.0.ffn_up.weight" }!
            var values = [Float](repeating: 0.5, count: 96 * 64)
            values[10] = .infinity
            list[i] = GGUFTensorRecord(name: "blk.0.ffn_up.weight", floats: values, dimensions: [64, 96])
        })
        assertRejected(try convert(bytes), "tensor 'blk.0.ffn_up.weight'", "element 10 is inf")
    }

    func testOverlappingTensorDataIsAnError() throws {
        var bytes = try GGUFConversionTests.tinyModel().gguf
        // Point blk.0.attn_norm.weight's data offset (after its name, n_dims, one dimension and type) at offset 0.
        let name = Array("blk.0.attn_norm.weight".utf8)
        let key = withUnsafeBytes(of: UInt64(name.count).littleEndian, Array.init) + name
        let start = try XCTUnwrap((0...(bytes.count - key.count)).first { bytes[$0..<($0 + key.count)].elementsEqual(key) })
        let offsetField = start + key.count + 4 + 8 + 4
        for i in 0..<8 { bytes[offsetField + i] = 0 }
        assertRejected(try convert(bytes), "tensor 'blk.0.attn_norm.weight'", "overlaps that of tensor 'token_embd.weight'")
    }
}
