import XCTest
@testable import QLoRA

/// CPU-side parts of the GPU decode path (the kernels themselves are checked by qlora-gpu-check on a GPU).
final class DecodeTaskTests: XCTestCase {
    /// The task array must match `struct Nf4GemvTask` in decode.cu byte for byte: 8 pointers, 2 floats, 4 ints.
    func testTaskEncodingLayout() {
        var a = NF4GemvTask(packed: 0x1000, absmaxCodes: 0x2000, nestedAbsmax: 0x3000, code: 0x4000, offset: 0.5, rows: 33, out: 0x5000)
        a.loraB = 0x6000
        a.xa = 0x7000
        a.residual = 0x8000
        a.loraScale = 2
        a.rank = 16
        let b = NF4GemvTask(packed: 1, absmaxCodes: 2, nestedAbsmax: 3, code: 4, offset: 0, rows: 5, out: 6)
        let (bytes, blocks) = NF4GemvTask.encode([a, b])
        XCTAssertEqual(bytes.count, 2 * 88)
        func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(bytes[at + $1]) << (8 * UInt64($1)) } }
        func u32(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(bytes[at + $1]) << (8 * UInt32($1)) } }
        XCTAssertEqual([u64(0), u64(8), u64(16), u64(24), u64(32), u64(40), u64(48), u64(56)],
                       [0x1000, 0x2000, 0x3000, 0x4000, 0x6000, 0x7000, 0x5000, 0x8000])
        XCTAssertEqual(Float(bitPattern: u32(64)), 0.5)
        XCTAssertEqual(Float(bitPattern: u32(68)), 2)
        XCTAssertEqual(u32(72), 33)   // rows
        XCTAssertEqual(u32(76), 16)   // rank
        XCTAssertEqual(u32(80), 0)    // first block of task 0
        XCTAssertEqual(u32(88 + 80), 3)  // 33 rows at 16 per block = 3 blocks before task 1
        XCTAssertEqual(blocks, 4)
        // Split-K blocks hold 4 * (8 / splits) rows.
        XCTAssertEqual(NF4GemvTask.encode([a, b], rowsPerBlock: NF4GemvTask.splitKRowsPerBlock(8)).blocks, 9 + 2)
        XCTAssertEqual(NF4GemvTask.splits(cols: 14336), 8)
        XCTAssertEqual(NF4GemvTask.splits(cols: 4096), 4)
        XCTAssertEqual(NF4GemvTask.splits(cols: 128), 1)
    }

    /// quantizeBase hands back bitsandbytes NF4 + double quant weights and (optionally) puts their dequantized
    /// values into the CPU model, so both backends compute with the same weights.
    func testQuantizeBaseReplacesCPUWeights() throws {
        let config = try DecoderConfig(json: try JSONValue.parse(bytes: Array("""
        {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1, "vocab_size": 50, "max_position_embeddings": 64}
        """.utf8)))
        let model = DecoderModel.random(config: config, seed: 3)
        let before = model.blocks[0].q!.weight.values()
        let quantized = try CUDAInference.quantizeBase(model, replacingCPUWeights: true)
        XCTAssertEqual(quantized.count, 7)
        let q = try XCTUnwrap(quantized["model.layers.0.self_attn.q_proj"])
        XCTAssertEqual(q.shape, [64, 64])
        XCTAssertEqual(q.quantType, .nf4)
        guard case .doubleQuantized = q.scales else { return XCTFail("expected double quantization") }
        XCTAssertEqual(model.blocks[0].q!.weight.values(), q.dequantize())
        XCTAssertNotEqual(model.blocks[0].q!.weight.values(), before)
    }
}
