import XCTest
@testable import QLoRA

/// The binary readers (safetensors, GGUF, the GGUF → HF conversion) on mutated fixtures: each case is a clear
/// error or a file whose every tensor reads back with the size its shape promises; never a crash.
final class FormatsFuzzTests: XCTestCase {
    func testMutatedSafeTensorsFilesAreClearErrorsOrReadCorrectly() throws {
        let original = try fixtureBytes("tiny-qwen2/expected.safetensors")
        let (headerLength, header, headerPaths, data) = try safeTensorsParts(original)
        let dir = try TestFixtures.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/model.safetensors"

        var fuzzer = Fuzzer(seed: 0x5AFE_7E45)
        let tally = FuzzTally("safetensors")
        for _ in 0..<Fuzzer.cases(700) {
            var label: String
            var bytes: [UInt8]
            switch fuzzer.int(0..<3) {
            case 0:
                (label, bytes) = fuzzer.mutateBytes(original, focus: 0..<(8 + headerLength))
            case 1:
                // The header length field: huge, "negative" (top bit set), zero, or just off.
                let value = fuzzer.chance(0.5) ? fuzzer.pick(Fuzzer.interesting64) : UInt64(headerLength + fuzzer.int(-9..<10))
                bytes = original
                withUnsafeBytes(of: value.littleEndian) { for i in 0..<8 { bytes[i] = $0[i] } }
                label = "header length \(value)"
            default:
                let (what, edited) = fuzzer.mutateJSON(header, paths: headerPaths)
                let text = Array(edited.serialized().utf8)
                bytes = withUnsafeBytes(of: UInt64(text.count).littleEndian, Array.init) + text + data
                label = "header \(what)"
            }
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            tally.run(label) {
                let file = try SafeTensorsFile(path: path)
                var end = 0
                for t in file.tensors {
                    XCTAssertEqual(file.bytes(t).count, t.elementCount * t.dtype.size, "\(label): \(t.name)")
                    XCTAssertGreaterThanOrEqual(t.dataRange.lowerBound, end, "\(label): \(t.name) overlaps")
                    end = t.dataRange.upperBound
                    XCTAssertEqual(try file.floats(t.name).count, t.elementCount)
                }
            }
        }
        tally.finish()
    }

    /// The GGUF reader, and after it the conversion's in-memory steps (hyper-parameters, config.json,
    /// tokenizer export, tensor records), on byte mutations and typed metadata edits of a tiny llama file.
    func testMutatedGGUFFilesAreClearErrorsOrReadAndConvertCorrectly() throws {
        let original = try GGUFConversionTests.tinyModel().gguf
        let parsed = try original.withUnsafeBytes { try GGUFFile(unsafeBytes: $0, name: "tiny.gguf") }
        let structureEnd = parsed.dataOffset
        let records = original.withUnsafeBytes { raw -> [GGUFTensorRecord] in
            parsed.tensors.map { GGUFTensorRecord(name: $0.name, type: $0.type, dimensions: $0.dimensions,
                                                  data: Array(UnsafeRawBufferPointer(rebasing: raw[$0.dataRange]))) }
        }
        let metadata = parsed.metadata
        let dir = try TestFixtures.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }

        var fuzzer = Fuzzer(seed: 0x6606_F00D)
        let tally = FuzzTally("GGUF + conversion")
        let replacements: [GGUFValue] = [
            .uint32(0), .int32(-1), .int64(Int64.min), .uint64(UInt64.max), .uint64(1 << 40), .uint32(3), .uint32(1 << 20),
            .float32(.nan), .float32(-1), .float64(.infinity), .string(""), .string("llama"), .bool(true),
            .array(.int32, []), .array(.string, [.string("a")]), .array(.int32, [.int32(-5), .int32(1 << 30)]),
        ]
        for i in 0..<Fuzzer.cases(700) {
            var label: String
            var bytes: [UInt8]
            if fuzzer.chance(0.5) {
                (label, bytes) = fuzzer.mutateBytes(original, focus: 0..<structureEnd)
            } else {
                var edited = metadata
                let k = fuzzer.int(0..<edited.count)
                if fuzzer.chance(0.2) {
                    label = "delete metadata '\(edited[k].key)'"
                    edited.remove(at: k)
                } else if case .array(let type, var items) = edited[k].value, !items.isEmpty, fuzzer.chance(0.5) {
                    // An element of a token list / score list / type list, or the list cut short.
                    if fuzzer.chance(0.5) {
                        items.removeLast(fuzzer.int(1..<(items.count + 1)))
                        label = "shorten '\(edited[k].key)' to \(items.count)"
                    } else {
                        let j = fuzzer.int(0..<items.count)
                        let candidates = replacements.filter { $0.type == type }
                        items[j] = candidates.isEmpty ? items[j] : fuzzer.pick(candidates)
                        label = "'\(edited[k].key)'[\(j)] = \(items[j])"
                    }
                    edited[k].value = .array(type, items)
                } else {
                    let value = fuzzer.pick(replacements)
                    label = "'\(edited[k].key)' = \(value)"
                    edited[k].value = value
                }
                bytes = try GGUFWriter.serialize(metadata: edited, tensors: records)
            }
            tally.run(label) {
                try bytes.withUnsafeBytes { raw in
                    let file = try GGUFFile(unsafeBytes: raw, name: "fuzz.gguf")
                    for t in file.tensors where t.type.canDequantize {
                        XCTAssertEqual(try file.floats(t).count, t.elementCount)
                    }
                    let hyper = try LlamaHyperParameters(file)
                    _ = try GGUFConverter.configJSON(file, hyper)
                    _ = try GGUFTokenizerExport(file)
                    let converted = try GGUFConverter.tensorRecords(file, hyper)
                    XCTAssertFalse(converted.isEmpty)
                }
                // Now and then the whole conversion entry, through a file on disk.
                if i % 25 == 0 {
                    try Data(bytes).write(to: URL(fileURLWithPath: dir + "/model.gguf"))
                    try GGUFConverter.convert(gguf: dir + "/model.gguf", to: dir + "/out")
                    _ = try DecoderConfig(directory: dir + "/out")
                    _ = try SafeTensorsCheckpoint(directory: dir + "/out")
                }
            }
        }
        tally.finish()
    }

    /// A bitsandbytes NF4 checkpoint: the quant-state JSON, absmax, nested absmax and code map are read from the file.
    func testMutatedBnbCheckpointsAreClearErrorsOrDequantize() throws {
        let original = try fixtureBytes("tiny-llama/base-bnb-nf4/model.safetensors")
        let (headerLength, header, headerPaths, data) = try safeTensorsParts(original)
        // The quant states are small U8 tensors of JSON; mutating their bytes reaches the JSON checks.
        let states = header.object!.filter { $0.key.contains("quant_state") }.compactMap { entry -> Range<Int>? in
            guard let o = entry.value["data_offsets"]?.array, let a = o.first?.int, let b = o.last?.int else { return nil }
            return (8 + headerLength + a)..<(8 + headerLength + b)
        }
        let dir = try TestFixtures.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.copyItem(atPath: TestFixtures.path("tiny-llama/base-bnb-nf4/config.json"), toPath: dir + "/config.json")
        let path = dir + "/model.safetensors"
        var fuzzer = Fuzzer(seed: 0xB17_5A7D)
        let tally = FuzzTally("bitsandbytes checkpoint")
        for _ in 0..<Fuzzer.cases(150) {
            var label: String
            var bytes: [UInt8]
            if fuzzer.chance(0.5), let state = states.isEmpty ? nil : fuzzer.pick(states) {
                (label, bytes) = fuzzer.mutateBytes(original, focus: state)
            } else {
                let (what, edited) = fuzzer.mutateJSON(header, paths: headerPaths)
                let text = Array(edited.serialized().utf8)
                bytes = withUnsafeBytes(of: UInt64(text.count).littleEndian, Array.init) + text + data
                label = "header \(what)"
            }
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            tally.run(label) {
                let weights = try BnbCheckpoint.quantizedWeights(directory: dir)
                for (_, w) in weights { XCTAssertEqual(w.dequantize().count, w.elementCount, label) }
            }
        }
        tally.finish()
    }

    /// Quantized GGUF blocks (the ggml dequantizers read scales and indices from the file).
    func testMutatedQuantizedGGUFBlocksAreClearErrorsOrDequantize() throws {
        let original = try fixtureBytes("gguf/quant-blocks.gguf")
        let structureEnd = try original.withUnsafeBytes { try GGUFFile(unsafeBytes: $0, name: "quant-blocks.gguf").dataOffset }
        var fuzzer = Fuzzer(seed: 0x0B10_C4)
        let tally = FuzzTally("GGUF quantized blocks")
        for _ in 0..<Fuzzer.cases(400) {
            let (label, bytes) = fuzzer.mutateBytes(original, focus: fuzzer.chance(0.7) ? 0..<structureEnd : structureEnd..<original.count)
            tally.run(label) {
                try bytes.withUnsafeBytes { raw in
                    let file = try GGUFFile(unsafeBytes: raw, name: "quant-blocks.gguf")
                    for t in file.tensors where t.type.canDequantize {
                        XCTAssertEqual(try file.floats(t).count, t.elementCount)
                    }
                }
            }
        }
        tally.finish()
    }

    /// A safetensors file's parts: the header's length, its JSON, the paths into it the JSON mutations take, the data.
    func safeTensorsParts(_ bytes: [UInt8]) throws -> (headerLength: Int, header: JSONValue, paths: [[Fuzzer.PathStep]], data: [UInt8]) {
        let headerLength = bytes.withUnsafeBytes { Int(UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self))) }
        let header = try JSONValue.parse(bytes: bytes[8..<(8 + headerLength)])
        var paths: [[Fuzzer.PathStep]] = []
        Fuzzer.paths(header, into: &paths)
        return (headerLength, header, paths, Array(bytes[(8 + headerLength)...]))
    }
}
