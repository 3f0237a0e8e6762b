import XCTest
@testable import QLoRA

final class SafeTensorsTests: XCTestCase {
    func testReadsReferenceCheckpoint() throws {
        let file = try SafeTensorsFile(path: TestFixtures.path("tiny-llama/base/model.safetensors"))
        let embed = try XCTUnwrap(file.info("model.embed_tokens.weight"))
        XCTAssertEqual(embed.dtype, .bf16)
        XCTAssertEqual(embed.shape, [1000, 128])
        let expected = try SafeTensorsFile(path: TestFixtures.path("tiny-llama/expected.safetensors"))
        XCTAssertEqual(expected.info("input_ids")?.dtype, .i64)
        XCTAssertEqual(expected.info("input_ids")?.shape, [2, 24])
    }

    func testRoundTripKeepsBytesShapesAndMetadata() throws {
        let dir = try TestFixtures.temporaryDirectory()
        let path = dir + "/t.safetensors"
        let records = [
            TensorRecord(name: "a", floats: [1, -2, 3.5, 0.25, 1e-3, 7], shape: [2, 3], dtype: .bf16),
            TensorRecord(name: "b", floats: [1, 2], shape: [2], dtype: .f32),
            TensorRecord(name: "c", dtype: .i64, shape: [1], data: [42, 0, 0, 0, 0, 0, 0, 0]),
            TensorRecord(name: "empty", dtype: .f16, shape: [0, 4], data: []),
        ]
        try SafeTensorsWriter.write(records, metadata: ["format": "pt"], to: path)
        let file = try SafeTensorsFile(path: path)
        XCTAssertEqual(file.metadata, ["format": "pt"])
        for r in records {
            let info = try XCTUnwrap(file.info(r.name))
            XCTAssertEqual(info.dtype, r.dtype)
            XCTAssertEqual(info.shape, r.shape)
            XCTAssertEqual(Array(try file.bytes(r.name)), r.data)
        }
        XCTAssertEqual(try file.floats("a"), [1, -2, 3.5, 0.25, roundToBF16(1e-3), 7])
    }

    func testReferenceFileRoundTripsByteForByte() throws {
        let source = try SafeTensorsFile(path: TestFixtures.path("tiny-llama/base/model.safetensors"))
        let records = try source.tensors.map { TensorRecord(name: $0.name, dtype: $0.dtype, shape: $0.shape, data: Array(try source.bytes($0.name))) }
        let path = try TestFixtures.temporaryDirectory() + "/copy.safetensors"
        try SafeTensorsWriter.write(records, to: path)
        let copy = try SafeTensorsFile(path: path)
        XCTAssertEqual(copy.names.sorted(), source.names.sorted())
        for t in source.tensors { XCTAssertEqual(Array(try copy.bytes(t.name)), Array(try source.bytes(t.name)), t.name) }
    }

    // MARK: - Bad files give errors that name the file and the place

    private func writeRaw(header: String, data: [UInt8], headerLength: UInt64? = nil) throws -> String {
        let path = try TestFixtures.temporaryDirectory() + "/bad.safetensors"
        var bytes: [UInt8] = []
        withUnsafeBytes(of: (headerLength ?? UInt64(header.utf8.count)).littleEndian) { bytes += $0 }
        bytes += Array(header.utf8) + data
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    private func assertFormatError(_ path: String, mentions: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try SafeTensorsFile(path: path), file: file, line: line) { error in
            guard let e = error as? FileFormatError else { return XCTFail("not a FileFormatError: \(error)", file: file, line: line) }
            XCTAssertEqual(e.file, path, file: file, line: line)
            XCTAssertTrue(e.description.contains(mentions), "'\(e)' does not mention '\(mentions)'", file: file, line: line)
        }
    }

    func testTruncatedFile() throws {
        let source = try FileSystem.readFile(TestFixtures.path("tiny-llama/base/model.safetensors"))
        let path = try TestFixtures.temporaryDirectory() + "/truncated.safetensors"
        try Data(source.prefix(source.count - 100)).write(to: URL(fileURLWithPath: path))
        assertFormatError(path, mentions: "run past")
        try Data(source.prefix(5)).write(to: URL(fileURLWithPath: path))
        assertFormatError(path, mentions: "header")
    }

    func testBadHeaders() throws {
        assertFormatError(try writeRaw(header: "{not json", data: []), mentions: "not valid JSON")
        assertFormatError(try writeRaw(header: "{}", data: [], headerLength: 1 << 40), mentions: "out of bounds")
        assertFormatError(try writeRaw(header: #"{"x":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}"#, data: [0]), mentions: "tensor 'x'")
        assertFormatError(try writeRaw(header: #"{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, data: Array(repeating: 0, count: 8)), mentions: "needs 12 bytes")
    }

    func testOverlappingRanges() throws {
        let header = #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#
        assertFormatError(try writeRaw(header: header, data: Array(repeating: 0, count: 12)), mentions: "overlap")
    }
}
