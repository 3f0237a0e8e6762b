import XCTest
@testable import QLoRA

/// `qlora quantize` output and pre-quantized loading against the bitsandbytes checkpoint fixture.
final class BnbCheckpointTests: XCTestCase {
    static let base = TestFixtures.path("tiny-llama/base")
    static let reference = TestFixtures.path("tiny-llama/base-bnb-nf4")

    /// Quantizing tiny-llama/base gives every tensor of base-bnb-nf4 byte for byte (quant-state JSON compared parsed).
    func testQuantizeModelIsByteIdenticalToBitsandbytes() throws {
        let out = try TestFixtures.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: out) }
        let summary = try BnbCheckpointWriter.quantizeModel(from: Self.base, to: out)
        XCTAssertEqual(summary.quantizedTensors, 14)

        let ours = try SafeTensorsFile(path: out + "/model.safetensors")
        let ref = try SafeTensorsFile(path: Self.reference + "/model.safetensors")
        XCTAssertEqual(Set(ours.names), Set(ref.names))
        XCTAssertEqual(ours.names, ref.names, "tensor order as the Python writer's")
        for name in ref.names {
            let a = try XCTUnwrap(ours.info(name)), b = try XCTUnwrap(ref.info(name))
            XCTAssertEqual(a.dtype, b.dtype, name)
            XCTAssertEqual(a.shape, b.shape, name)
            if name.contains(".quant_state.") {
                let pa = try JSONValue.parse(bytes: ours.bytes(name)), pb = try JSONValue.parse(bytes: ref.bytes(name))
                XCTAssertEqual(pa.object.map { Dictionary(uniqueKeysWithValues: $0.map { ($0.key, $0.value) }) },
                               pb.object.map { Dictionary(uniqueKeysWithValues: $0.map { ($0.key, $0.value) }) }, name)
                XCTAssertEqual(Array(try ours.bytes(name)), Array(try ref.bytes(name)), "\(name) (same key order too)")
            } else {
                XCTAssertEqual(Array(try ours.bytes(name)), Array(try ref.bytes(name)), name)
            }
        }
        // In fact the whole file is the same, header and padding included.
        XCTAssertEqual(try FileSystem.readFile(out + "/model.safetensors"), try FileSystem.readFile(Self.reference + "/model.safetensors"))
        // config.json: same document, and the same text transformers writes.
        let configOurs = try FileSystem.readText(out + "/config.json"), configRef = try FileSystem.readText(Self.reference + "/config.json")
        XCTAssertEqual(try JSONValue.parse(configOurs), try JSONValue.parse(configRef))
        XCTAssertEqual(configOurs, configRef)
        XCTAssertEqual(try FileSystem.readFile(out + "/generation_config.json"), try FileSystem.readFile(Self.base + "/generation_config.json"))
    }

    /// Loading base-bnb-nf4 directly gives the same weights as quantizing base on load.
    func testLoadingPrequantizedEqualsQuantizingBase() throws {
        let loaded = try BnbCheckpoint(directory: Self.reference)
        let quantized = try BnbCheckpointWriter.quantizeAll(SafeTensorsCheckpoint(directory: Self.base))
        XCTAssertEqual(Set(loaded.quantized.keys), Set(quantized.keys))
        XCTAssertEqual(loaded.quantized.count, 14)
        for (name, weight) in quantized {
            let other = try XCTUnwrap(loaded.quantized[name])
            XCTAssertEqual(other, weight, name)
            XCTAssertEqual(other.dequantize().map(\.bitPattern), weight.dequantize().map(\.bitPattern), name)
        }
        XCTAssertEqual(loaded.denseNames, ["lm_head.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                                           "model.layers.0.post_attention_layernorm.weight", "model.layers.1.input_layernorm.weight",
                                           "model.layers.1.post_attention_layernorm.weight", "model.norm.weight"])
        // The dequantized weights stay close to the bf16 originals (NF4 error, not a layout mistake).
        let base = try SafeTensorsCheckpoint(directory: Self.base)
        for (name, weight) in loaded.quantized {
            XCTAssertEqual(weight.shape, base.info(name)?.shape)
            XCTAssertLessThan(relativeError(weight.dequantize(), try base.floats(name)), 0.15, name)
        }
        // Bits per parameter from the stored bytes: 4 + 8/64 + the nested absmax, plus the two code maps
        // (1,088 bytes per weight), which weigh a lot in these small matrices.
        let elements = loaded.quantizedParameterCount
        XCTAssertEqual(elements, 368_640)
        let expectedBytes = loaded.quantized.values.reduce(0) { total, w in
            total + w.elementCount / 2 + w.elementCount / 64 + 4 * ((w.elementCount / 64 + 255) / 256) + 16 * 4 + 256 * 4
        }
        XCTAssertEqual(loaded.quantizedStoredBytes, expectedBytes)
        XCTAssertEqual(loaded.bitsPerParameter, Double(expectedBytes * 8) / Double(elements), accuracy: 1e-12)
        XCTAssertEqual(loaded.bytesSavedVersusBF16, elements * 2 - expectedBytes)
    }

    func testQuantizedWeightsOfEitherFolder() throws {
        let direct = try BnbCheckpoint.quantizedWeights(directory: Self.reference)
        let onLoad = try BnbCheckpoint.quantizedWeights(directory: Self.base)
        XCTAssertEqual(direct.count, 14)
        XCTAssertEqual(direct, onLoad)
    }

    // MARK: - Bad input

    /// Copies the reference checkpoint with `edit` applied to its tensors; returns the folder.
    func brokenCopy(_ edit: (inout [TensorRecord]) -> Void) throws -> String {
        let ref = try SafeTensorsFile(path: Self.reference + "/model.safetensors")
        var records = ref.tensors.map { TensorRecord(name: $0.name, dtype: $0.dtype, shape: $0.shape, data: Array(ref.bytes($0))) }
        edit(&records)
        let dir = try TestFixtures.temporaryDirectory()
        try SafeTensorsWriter.write(records, metadata: ["format": "pt"], to: dir + "/model.safetensors")
        try FileSystem.writeAtomically(dir + "/config.json", bytes: FileSystem.readFile(Self.reference + "/config.json"))
        return dir
    }

    func assertFileFormatError(_ dir: String, mentions tensor: String, _ words: String, line: UInt = #line) {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        XCTAssertThrowsError(try BnbCheckpoint(directory: dir), line: line) { error in
            guard let e = error as? FileFormatError else { return XCTFail("not a FileFormatError: \(error)", line: line) }
            XCTAssertTrue(e.place.contains(tensor), "\(e) should name \(tensor)", line: line)
            XCTAssertTrue(e.description.contains(words), "\(e) should say '\(words)'", line: line)
        }
    }

    static let w = "model.layers.0.self_attn.q_proj.weight"

    func testMissingNestedAbsmax() throws {
        let dir = try brokenCopy { $0.removeAll { $0.name == Self.w + ".nested_absmax" } }
        assertFileFormatError(dir, mentions: Self.w + ".nested_absmax", "missing")
    }

    func testMissingQuantState() throws {
        let dir = try brokenCopy { $0.removeAll { $0.name == Self.w + ".quant_state.bitsandbytes__nf4" } }
        assertFileFormatError(dir, mentions: Self.w, "without")
    }

    func testUnknownQuantType() throws {
        let dir = try brokenCopy { records in
            for i in records.indices where records[i].name == Self.w + ".quant_state.bitsandbytes__nf4" {
                records[i].name = Self.w + ".quant_state.bitsandbytes__int4"
            }
        }
        assertFileFormatError(dir, mentions: Self.w + ".quant_state.bitsandbytes__int4", "unknown quant type 'int4'")
    }

    func testWrongAbsmaxShape() throws {
        let dir = try brokenCopy { records in
            for i in records.indices where records[i].name == Self.w + ".absmax" {
                records[i] = TensorRecord(name: records[i].name, dtype: .u8, shape: [255], data: Array(records[i].data.prefix(255)))
            }
        }
        assertFileFormatError(dir, mentions: Self.w + ".absmax", "shape [255], expected [256]")
    }

    func testInconsistentQuantStateShape() throws {
        let dir = try brokenCopy { records in
            for i in records.indices where records[i].name == Self.w + ".quant_state.bitsandbytes__nf4" {
                let text = String(decoding: records[i].data, as: UTF8.self).replacingOccurrences(of: "[128, 128]", with: "[128, 64]")
                records[i] = TensorRecord(name: records[i].name, dtype: .u8, shape: [text.utf8.count], data: Array(text.utf8))
            }
        }
        assertFileFormatError(dir, mentions: Self.w, "expected [4096, 1]")
    }

    func testOverflowingQuantStateShape() throws {
        let dir = try brokenCopy { records in
            for i in records.indices where records[i].name == Self.w + ".quant_state.bitsandbytes__nf4" {
                let text = String(decoding: records[i].data, as: UTF8.self)
                    .replacingOccurrences(of: "[128, 128]", with: "[9999999999999, 9999999999999]")
                records[i] = TensorRecord(name: records[i].name, dtype: .u8, shape: [text.utf8.count], data: Array(text.utf8))
            }
        }
        assertFileFormatError(dir, mentions: Self.w + ".quant_state", "too large")
    }

    func testQuantStateTypeDisagreesWithKey() throws {
        let dir = try brokenCopy { records in
            for i in records.indices where records[i].name == Self.w + ".quant_state.bitsandbytes__nf4" {
                let text = String(decoding: records[i].data, as: UTF8.self).replacingOccurrences(of: "\"nf4\"", with: "\"fp4\"")
                records[i] = TensorRecord(name: records[i].name, dtype: .u8, shape: [text.utf8.count], data: Array(text.utf8))
            }
        }
        assertFileFormatError(dir, mentions: Self.w + ".quant_state", "quant_type \"fp4\"")
    }

    func testPlainAndFP4RoundTripThroughCheckpoint() throws {
        for options in [BnbQuantizeOptions(quantType: .fp4, blocksize: 128, doubleQuant: false, computeDType: .bf16),
                        BnbQuantizeOptions(quantType: .nf4, blocksize: 32, doubleQuant: true, computeDType: .f32, modelDType: .bf16)] {
            let out = try TestFixtures.temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: out) }
            try BnbCheckpointWriter.quantizeModel(from: Self.base, to: out, options: options)
            let loaded = try BnbCheckpoint(directory: out)
            let direct = try BnbCheckpointWriter.quantizeAll(SafeTensorsCheckpoint(directory: Self.base), options: options)
            XCTAssertEqual(loaded.quantized, direct)
            XCTAssertEqual(loaded.config["quantization_config"]?["bnb_4bit_quant_type"]?.string, options.quantType.rawValue)
            XCTAssertEqual(loaded.tensors.info("model.norm.weight")?.dtype, options.modelDType)
        }
    }
}
