import XCTest
@testable import QLoRA

/// GGUF reading and writing, dequantization, and the errors a bad file gives.
final class GGUFTests: XCTestCase {

    // MARK: - Helpers

    /// Parses GGUF bytes held in an array.
    private func parse(_ bytes: [UInt8], name: String = "test.gguf") throws -> (GGUFFile, [UInt8]) {
        // The array is copied into a buffer we keep alive for the test's duration.
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 64)
        buffers.append(buffer)
        buffer.copyBytes(from: bytes)
        let file = try GGUFFile(unsafeBytes: UnsafeRawBufferPointer(rebasing: buffer[0..<bytes.count]), name: name)
        return (file, bytes)
    }
    private var buffers: [UnsafeMutableRawBufferPointer] = []
    override func tearDown() {
        for b in buffers { b.deallocate() }
        buffers.removeAll()
    }

    /// Expects a FileFormatError whose place contains `place` and message contains `message`.
    private func assertFormatError(_ bytes: [UInt8], place: String, message: String, file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try parse(bytes)
            XCTFail("expected an error at '\(place)'", file: file, line: line)
        } catch let error as FileFormatError {
            XCTAssertEqual(error.file, "test.gguf", file: file, line: line)
            XCTAssertTrue(error.place.contains(place), "place '\(error.place)' lacks '\(place)' (\(error))", file: file, line: line)
            XCTAssertTrue(error.message.contains(message), "message '\(error.message)' lacks '\(message)'", file: file, line: line)
        } catch {
            XCTFail("unexpected error \(error)", file: file, line: line)
        }
    }

    private func f16(_ v: Float) -> [UInt8] { withUnsafeBytes(of: floatToF16(v).littleEndian) { Array($0) } }

    private static let everyValue: [(key: String, value: GGUFValue)] = [
        ("general.architecture", .string("llama")),
        ("t.u8", .uint8(200)), ("t.i8", .int8(-100)), ("t.u16", .uint16(60000)), ("t.i16", .int16(-30000)),
        ("t.u32", .uint32(4_000_000_000)), ("t.i32", .int32(-2_000_000_000)),
        ("t.u64", .uint64(1 << 60)), ("t.i64", .int64(-(1 << 60))),
        ("t.f32", .float32(1.5e-5)), ("t.f64", .float64(-2.25e100)), ("t.true", .bool(true)), ("t.false", .bool(false)),
        ("t.string", .string("héllo ▁ wörld 🤗")), ("t.empty", .string("")),
        ("tokenizer.ggml.tokens", .array(.string, [.string("<s>"), .string("Ġa"), .string(""), .string("日本")])),
        ("t.ints", .array(.int32, [.int32(1), .int32(-2), .int32(3)])),
        ("t.floats", .array(.float32, [.float32(0.5), .float32(-1)])),
        ("t.nested", .array(.array, [.array(.uint8, [.uint8(1)]), .array(.string, [])])),
        ("t.empty_array", .array(.uint64, [])),
    ]

    // MARK: - Round trip

    func testEveryValueTypeRoundTrips() throws {
        let weights: [Float] = (0..<24).map { Float($0) * 0.25 - 3 }
        let bytes = try GGUFWriter.serialize(metadata: Self.everyValue, tensors: [
            GGUFTensorRecord(name: "w.f32", floats: weights, dimensions: [4, 6]),
            GGUFTensorRecord(name: "w.f16", floats: weights, dimensions: [8, 3], type: .f16),
            GGUFTensorRecord(name: "w.bf16", floats: weights, dimensions: [24], type: .bf16),
        ])
        let (file, _) = try parse(bytes)
        XCTAssertEqual(file.version, 3)
        XCTAssertEqual(file.alignment, 32)
        XCTAssertEqual(file.dataOffset % 32, 0)
        XCTAssertEqual(file.metadata.map(\.key), Self.everyValue.map(\.key))
        for (got, want) in zip(file.metadata, Self.everyValue) { XCTAssertEqual(got.value, want.value, want.key) }
        XCTAssertEqual(file["tokenizer.ggml.tokens"]?.strings, ["<s>", "Ġa", "", "日本"])
        XCTAssertEqual(file["t.ints"]?.ints, [1, -2, 3])
        XCTAssertEqual(file["t.u32"]?.int, 4_000_000_000)
        XCTAssertEqual(file["t.f32"]?.double, Double(Float(1.5e-5)))
        XCTAssertEqual(file.tensorNames, ["w.f32", "w.f16", "w.bf16"])

        let f32 = try XCTUnwrap(file.tensor("w.f32"))
        XCTAssertEqual(f32.dimensions, [4, 6])
        XCTAssertEqual(f32.shape, [6, 4])
        XCTAssertEqual(f32.type, .f32)
        XCTAssertEqual(f32.offset % 32, 0)
        XCTAssertEqual(try file.floats("w.f32"), weights)
        XCTAssertEqual(try file.floats("w.f16"), weights)  // quarter steps in [-3, 2.75] are exact in f16 and bf16
        XCTAssertEqual(try file.floats("w.bf16"), weights)
    }

    func testCustomAlignmentAndVersion2() throws {
        var bytes = try GGUFWriter.serialize(metadata: [("general.alignment", .uint32(64))],
                                             tensors: [GGUFTensorRecord(name: "a", floats: [1, 2, 3], dimensions: [3]),
                                                       GGUFTensorRecord(name: "b", floats: [4, 5], dimensions: [2])],
                                             alignment: 64)
        bytes[4] = 2  // version 2 has the same layout as 3
        let (file, _) = try parse(bytes)
        XCTAssertEqual(file.version, 2)
        XCTAssertEqual(file.alignment, 64)
        XCTAssertEqual(file.dataOffset % 64, 0)
        XCTAssertEqual(file.tensor("b")?.offset, 64)
        XCTAssertEqual(try file.floats("b"), [4, 5])
    }

    func testReadsFromDisk() throws {
        let dir = try TestFixtures.temporaryDirectory()
        let path = dir + "/m.gguf"
        try GGUFWriter.write(metadata: [("general.name", .string("disk"))],
                             tensors: [GGUFTensorRecord(name: "x", floats: [1, -1], dimensions: [2])], to: path)
        let file = try GGUFFile(path: path)
        XCTAssertEqual(file.path, path)
        XCTAssertEqual(file["general.name"]?.string, "disk")
        XCTAssertEqual(try file.floats("x"), [1, -1])
    }

    // MARK: - Dequantization of hand-made blocks

    func testQ4_0BlockLayout() throws {
        // d = 0.5; byte j holds element j (low nibble) and element j + 16 (high nibble); x = (q − 8)·d.
        var block = f16(0.5)
        for j in 0..<16 { block.append(UInt8(j) | UInt8(15 - j) << 4) }
        let values = try dequantized(block + block, type: .q4_0, dimensions: [64])
        for j in 0..<16 {
            XCTAssertEqual(values[j], Float(j - 8) * 0.5, "element \(j)")
            XCTAssertEqual(values[j + 16], Float(15 - j - 8) * 0.5, "element \(j + 16)")
        }
        XCTAssertEqual(Array(values[32...]), Array(values[..<32]))
    }

    func testQ4_1BlockLayout() throws {
        // d = 0.25, m = −1.5; x = q·d + m.
        var block = f16(0.25) + f16(-1.5)
        for j in 0..<16 { block.append(UInt8((j * 3) % 16) | UInt8((j * 5 + 1) % 16) << 4) }
        let values = try dequantized(block, type: .q4_1, dimensions: [32])
        for j in 0..<16 {
            XCTAssertEqual(values[j], Float((j * 3) % 16) * 0.25 - 1.5, "element \(j)")
            XCTAssertEqual(values[j + 16], Float((j * 5 + 1) % 16) * 0.25 - 1.5, "element \(j + 16)")
        }
    }

    func testQ8_0BlockLayout() throws {
        // d = 0.125, then 32 signed bytes; x = q·d.
        let qs: [Int8] = (0..<32).map { Int8(truncatingIfNeeded: $0 * 9 - 128) }
        let block = f16(0.125) + qs.map { UInt8(bitPattern: $0) }
        let values = try dequantized(block, type: .q8_0, dimensions: [32])
        XCTAssertEqual(values, qs.map { Float($0) * 0.125 })
    }

    func testQuantizedMatrixRowsAreRowMajor() throws {
        // A [2 rows, 32 cols] Q8_0 matrix: ne = [32, 2], one block per row.
        let row0 = f16(1) + (0..<32).map { UInt8($0) }
        let row1 = f16(-2) + (0..<32).map { UInt8($0 + 1) }
        let (file, _) = try parse(GGUFWriter.serialize(metadata: [], tensors: [
            GGUFTensorRecord(name: "m", type: .q8_0, dimensions: [32, 2], data: row0 + row1)]))
        let info = try XCTUnwrap(file.tensor("m"))
        XCTAssertEqual(info.shape, [2, 32])
        XCTAssertEqual(info.byteCount, 68)
        let values = try file.floats(info)
        XCTAssertEqual(values[31], 31)
        XCTAssertEqual(values[32], -2)
        XCTAssertEqual(values[63], -64)
    }

    private func dequantized(_ data: [UInt8], type: GGMLType, dimensions: [Int]) throws -> [Float] {
        let bytes = try GGUFWriter.serialize(metadata: [], tensors: [GGUFTensorRecord(name: "q", type: type, dimensions: dimensions, data: data)])
        return try parse(bytes).0.floats("q")
    }

    // MARK: - Dequantization against gguf-py

    /// Tests/Fixtures/gguf/quant-blocks.gguf was written by gguf-py (make_fixtures.py there): "T.raw" holds
    /// quantized blocks of type T and "T.expected" what gguf-py's reference `dequantize` makes of them.
    func testDequantizationMatchesGGUFPy() throws {
        let file = try GGUFFile(path: TestFixtures.path("gguf/quant-blocks.gguf"))
        let types: [GGMLType] = [.q4_0, .q4_1, .q5_0, .q5_1, .q8_0, .bf16, .f16, .q2_K, .q3_K, .q4_K, .q5_K, .q6_K, .q8_K]
        for type in types {
            let raw = try XCTUnwrap(file.tensor("\(type.name).raw"), type.name)
            XCTAssertEqual(raw.type, type)
            let got = try file.floats(raw)
            let want = try file.floats("\(type.name).expected")
            XCTAssertEqual(got.count, want.count, type.name)
            // Same arithmetic in the same order: bit-identical.
            let mismatches = zip(got, want).enumerated().filter { $0.element.0.bitPattern != $0.element.1.bitPattern }
            XCTAssertTrue(mismatches.isEmpty, "\(type.name): \(mismatches.count) of \(got.count) differ, first \(mismatches.prefix(3).map { "#\($0.offset): \($0.element.0) vs \($0.element.1)" })")
            XCTAssertTrue(want.contains { $0 != 0 }, "\(type.name): the fixture should hold non-zero values")
        }
    }

    /// Our quantizers give the bytes gguf-py (bit-exact with ggml's reference quantizers) gave for "T.input".
    func testQuantizationMatchesGGUFPy() throws {
        let file = try GGUFFile(path: TestFixtures.path("gguf/quant-blocks.gguf"))
        for type in [GGMLType.q4_0, .q4_1, .q5_0, .q5_1, .q8_0, .bf16, .f16] {
            let input = try file.floats("\(type.name).input")
            let raw = try XCTUnwrap(file.tensor("\(type.name).raw"))
            XCTAssertEqual(type.quantize(input), Array(file.bytes(raw)), type.name)
        }
    }

    func testQuantizeRoundTripsAndSurvivesOddInput() {
        var x: [Float] = (0..<64).map { Float($0 % 7) - 3 }
        XCTAssertEqual(GGMLType.q8_0.quantize(x).count, 68)
        x[3] = .nan
        x[40] = .infinity
        for type in [GGMLType.q4_0, .q4_1, .q5_0, .q5_1, .q8_0] {
            XCTAssertEqual(type.quantize(x).count, type.byteCount(elements: 64), type.name)  // no trap
            let zeros = type.quantize([Float](repeating: 0, count: 32))
            var back = [Float](repeating: 1, count: 32)
            zeros.withUnsafeBytes { raw in back.withUnsafeMutableBufferPointer { type.dequantize(raw, into: $0) } }
            XCTAssertEqual(back, [Float](repeating: 0, count: 32), type.name)
        }
    }

    func testUnsupportedDequantizationIsAnError() throws {
        let (file, _) = try parse(GGUFWriter.serialize(metadata: [], tensors: [
            GGUFTensorRecord(name: "iq", type: .iq4_nl, dimensions: [32], data: [UInt8](repeating: 0, count: 18))]))
        XCTAssertThrowsError(try file.floats("iq")) { error in
            XCTAssertTrue("\(error)".contains("IQ4_NL"), "\(error)")
        }
    }

    // MARK: - Bad files

    private func sampleFile() throws -> [UInt8] {
        try GGUFWriter.serialize(metadata: [
            ("general.architecture", .string("llama")),
            ("tokenizer.ggml.tokens", .array(.string, [.string("a"), .string("bb"), .string("ccc")])),
        ], tensors: [
            GGUFTensorRecord(name: "blk.0.attn_q.weight", floats: [1, 2, 3, 4], dimensions: [2, 2]),
            GGUFTensorRecord(name: "output_norm.weight", floats: [5, 6], dimensions: [2]),
        ])
    }

    func testBadMagic() throws {
        var bytes = try sampleFile()
        bytes[0] = UInt8(ascii: "X")
        assertFormatError(bytes, place: "header", message: "bad magic")
        assertFormatError(Array("{\"a\": 1}".utf8), place: "header", message: "not a GGUF file")
    }

    func testUnknownVersion() throws {
        var bytes = try sampleFile()
        bytes[4] = 4
        assertFormatError(bytes, place: "header", message: "unsupported GGUF version 4")
        bytes[4] = 1
        assertFormatError(bytes, place: "header", message: "version 1")
    }

    func testEveryTruncationIsAnErrorNotACrash() throws {
        let bytes = try sampleFile()
        let (whole, _) = try parse(bytes)
        let dataEnd = whole.tensors.map(\.dataRange.upperBound).max()!
        for length in 0..<dataEnd {
            do {
                _ = try parse(Array(bytes[..<length]))
                XCTFail("a file cut at \(length) of \(bytes.count) bytes was accepted")
            } catch let error as FileFormatError {
                XCTAssertTrue(error.message.contains("truncated") || error.message.contains("impossible"),
                              "cut at \(length): \(error)")
            }
        }
    }

    func testTruncationNamesThePlace() throws {
        let bytes = try sampleFile()
        // Cut inside the token array: header (24) + key 0 (8 + 20) + type (4) + "llama" (8 + 5) + key 1 (8 + 21) + type, element type, count (16).
        let cut = 24 + 28 + 4 + 13 + 29 + 16 + 10
        assertFormatError(Array(bytes[..<cut]), place: "metadata key 1 'tokenizer.ggml.tokens'", message: "truncated")
        // Cut inside the tensor data: the tensor is named.
        let (whole, _) = try parse(bytes)
        let last = whole.tensor("output_norm.weight")!
        assertFormatError(Array(bytes[..<(last.dataRange.upperBound - 1)]), place: "tensor 'output_norm.weight'", message: "beyond the end of the file")
    }

    func testUnknownValueType() throws {
        var bytes = try sampleFile()
        // The value type of key 0 follows the header (24 bytes) and the key (8 + 20 bytes).
        bytes[24 + 28] = 13
        assertFormatError(bytes, place: "metadata key 0 'general.architecture'", message: "unknown value type 13")
    }

    func testUnknownGGMLType() throws {
        let (whole, bytes) = try parse(try sampleFile())
        // The ggml type of the last tensor is 12 bytes before the end of the tensor infos (type u32, offset u64).
        let infosEnd = try endOfTensorInfos(bytes, whole)
        var bad = bytes
        bad[infosEnd - 12] = 99
        assertFormatError(bad, place: "tensor 'output_norm.weight'", message: "unknown ggml type 99")
    }

    func testTensorDataOutOfFile() throws {
        let (whole, bytes) = try parse(try sampleFile())
        let infosEnd = try endOfTensorInfos(bytes, whole)
        var bad = bytes
        // Offset of the last tensor: a large, aligned value.
        withUnsafeBytes(of: UInt64(1 << 20).littleEndian) { for i in 0..<8 { bad[infosEnd - 8 + i] = $0[i] } }
        assertFormatError(bad, place: "tensor 'output_norm.weight'", message: "beyond the end of the file")
        // A misaligned offset.
        withUnsafeBytes(of: UInt64(4).littleEndian) { for i in 0..<8 { bad[infosEnd - 8 + i] = $0[i] } }
        assertFormatError(bad, place: "tensor 'output_norm.weight'", message: "not a multiple of the alignment")
    }

    func testAbsurdCountsAndLengths() throws {
        let bytes = try sampleFile()
        func with(_ value: UInt64, at offset: Int) -> [UInt8] {
            var b = bytes
            withUnsafeBytes(of: value.littleEndian) { for i in 0..<8 { b[offset + i] = $0[i] } }
            return b
        }
        assertFormatError(with(1 << 60, at: 8), place: "header", message: "tensor count")
        assertFormatError(with(UInt64.max, at: 16), place: "header", message: "metadata count")
        // The length of key 0.
        assertFormatError(with(1 << 62, at: 24), place: "metadata key 0", message: "has length")
        // The element count of the token array: header 24, key 0 + type + value 45, key 1 29, type 4, element type 4.
        assertFormatError(with(1 << 40, at: 24 + 45 + 29 + 8), place: "metadata key 1 'tokenizer.ggml.tokens'", message: "array length")
        // n_dims of the first tensor.
        let (whole, _) = try parse(bytes)
        XCTAssertEqual(whole.tensors.count, 2)
        let firstInfo = try startOfTensorInfos(bytes)
        var b = bytes
        b[firstInfo + 8 + "blk.0.attn_q.weight".utf8.count] = 7
        assertFormatError(b, place: "tensor 'blk.0.attn_q.weight'", message: "7 dimensions")
    }

    func testDuplicateKeysAndBadAlignment() throws {
        let dup = try GGUFWriter.serialize(metadata: [("a", .uint8(1)), ("a", .uint8(2))], tensors: [])
        assertFormatError(dup, place: "metadata key 1 'a'", message: "twice")
        let align = try GGUFWriter.serialize(metadata: [("general.alignment", .uint32(24))], tensors: [])
        assertFormatError(align, place: "metadata key 0 'general.alignment'", message: "power of two")
    }

    /// Byte offset where the tensor infos of `sampleFile()` start: header 24, key 0 with its string value 45,
    /// key 1 29, array element type and count 12 after the value type 4, three strings 9 + 10 + 11.
    private func startOfTensorInfos(_ bytes: [UInt8]) throws -> Int {
        24 + 45 + 29 + 4 + 4 + 8 + (8 + 1) + (8 + 2) + (8 + 3)
    }

    /// Byte offset just after the last tensor info.
    private func endOfTensorInfos(_ bytes: [UInt8], _ file: GGUFFile) throws -> Int {
        var end = try startOfTensorInfos(bytes)
        for t in file.tensors { end += 8 + t.name.utf8.count + 4 + 8 * t.dimensions.count + 4 + 8 }
        return end
    }
}
