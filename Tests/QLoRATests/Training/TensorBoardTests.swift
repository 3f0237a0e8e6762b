import XCTest
@testable import QLoRA

/// The TensorBoard event writer: CRC-32C, TFRecord framing, the Event protobuf, resume, and `report_to`.
final class TensorBoardTests: XCTestCase {
    /// Known CRC-32C values: the standard check value and RFC 3720 (iSCSI) appendix B.4.
    func testCRC32CKnownVectors() {
        XCTAssertEqual(CRC32C.checksum(Array("123456789".utf8)), 0xE306_9283)
        XCTAssertEqual(CRC32C.checksum([UInt8]()), 0)
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0, count: 32)), 0x8A91_36AA)
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)), 0x62A8_AB43)
        XCTAssertEqual(CRC32C.checksum((0..<32).map { UInt8($0) }), 0x46DD_794E)
        XCTAssertEqual(CRC32C.checksum((0..<32).map { UInt8(31 - $0) }), 0x113F_DB5C)
        // ((0xE3069283 >> 15) | (0xE3069283 << 17)) + 0xa282ead8, modulo 2^32.
        XCTAssertEqual(CRC32C.masked(Array("123456789".utf8)), 0xC78A_B0E5)
    }

    func testFramingAndTornRecords() {
        let data: [UInt8] = [1, 2, 3]
        let record = TFRecord.frame(data)
        XCTAssertEqual(record.count, 8 + 4 + 3 + 4)
        XCTAssertEqual(Array(record[0..<8]), [3, 0, 0, 0, 0, 0, 0, 0])
        XCTAssertEqual(Array(record[8..<12]), TFRecord.littleEndian(CRC32C.masked(record[0..<8])))
        XCTAssertEqual(Array(record[12..<15]), data)
        XCTAssertEqual(Array(record[15..<19]), TFRecord.littleEndian(CRC32C.masked(data)))

        let second = TFRecord.frame(Array("hello".utf8)), empty = TFRecord.frame([])
        let file = record + second + empty
        let (records, end) = TFRecord.records(in: file)
        XCTAssertEqual(records.map(\.data), [data, Array("hello".utf8), []])
        XCTAssertEqual(records.map(\.offset), [0, record.count, record.count + second.count])
        XCTAssertEqual(end, file.count)
        // A record cut short by a kill, or with a flipped data byte, ends the valid part.
        XCTAssertEqual(TFRecord.records(in: Array(file.dropLast())).end, record.count + second.count)
        var flipped = file
        flipped[record.count + 13] ^= 1
        XCTAssertEqual(TFRecord.records(in: flipped).records.count, 1)
    }

    /// The protobuf bytes of an Event with one scalar, written out by hand from event.proto and summary.proto.
    func testEventEncoding() {
        let bytes = TensorBoardEvent.encode(wallTime: 1.5, step: 3, scalars: [("train/loss", 2.0)])
        let value: [UInt8] = [0x0A, 10] + Array("train/loss".utf8) + [0x15, 0x00, 0x00, 0x00, 0x40]  // tag = 1, simple_value = 2
        let summary: [UInt8] = [0x0A, UInt8(value.count)] + value  // Summary.value = 1
        let expected: [UInt8] = [0x09, 0, 0, 0, 0, 0, 0, 0xF8, 0x3F]  // wall_time = 1 (double 1.5)
            + [0x10, 0x03]  // step = 2
            + [0x2A, UInt8(summary.count)] + summary  // summary = 5
        XCTAssertEqual(bytes, expected)
        XCTAssertEqual(TensorBoardEvent.step(of: bytes), 3)

        let version = TensorBoardEvent.encode(wallTime: 0, step: 0, fileVersion: "brain.Event:2")
        XCTAssertEqual(Array(version.suffix(15)), [0x1A, 13] + Array("brain.Event:2".utf8))
        let start = TensorBoardEvent.encode(wallTime: 0, step: 300, sessionStart: true)
        XCTAssertEqual(Array(start.suffix(7)), [0x10, 0xAC, 0x02, 0x3A, 2, 0x08, 0x01])  // step 300 as a varint, session_log = 7 {status: START}
        XCTAssertEqual(TensorBoardEvent.step(of: start), 300)
        XCTAssertEqual(TensorBoardEvent.step(of: TensorBoardEvent.encode(wallTime: 0, step: -2)), -2)
        XCTAssertNil(TensorBoardEvent.step(of: [0x0A, 50, 1]), "a length past the end")
    }

    func events(_ path: String) throws -> [(step: Int64, bytes: [UInt8])] {
        TFRecord.records(in: try FileSystem.readFile(path)).records.map { (TensorBoardEvent.step(of: $0.data) ?? -1, $0.data) }
    }

    /// Each record is in the file as soon as it is added (TensorBoard reads a running run); a resume cuts the steps after
    /// its checkpoint (and a torn record) off the earlier file and opens a new file with a session start; a fresh run
    /// removes the earlier files.
    func testRecordsAreWrittenAtOnceAndResumeCutsLaterSteps() throws {
        let dir = try TestFixtures.temporaryDirectory() + "/runs"
        let first = try TensorBoardWriter(directory: dir, resumedAfter: nil)
        XCTAssertTrue(first.path.hasPrefix(dir + "/events.out.tfevents."), first.path)
        for step in 1...4 {
            try first.addMetrics([("step", .int(Int64(step))), ("epoch", .double(0.5)), ("loss", .double(Double(step))), ("learning_rate", .double(1e-3))])
        }
        try first.addMetrics([("step", .int(4)), ("eval_loss", .double(3.5)), ("eval_perplexity", .double(33.1))])
        let written = try events(first.path)
        XCTAssertEqual(written.map(\.step), [0, 1, 2, 3, 4, 4], "the file version record, then each logged step, unbuffered")
        XCTAssertEqual(written[0].bytes.suffix(15), [0x1A, 13] + Array("brain.Event:2".utf8))
        let tags = String(decoding: written[5].bytes, as: UTF8.self)
        XCTAssertTrue(tags.contains("eval/loss") && tags.contains("eval/perplexity") && !tags.contains("step"), tags)
        XCTAssertTrue(String(decoding: written[1].bytes, as: UTF8.self).contains("train/learning_rate"))
        // A torn record at the end, as a kill mid-write leaves.
        let torn = fopen(first.path, "a")!
        let junk: [UInt8] = [7, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 9, 9]
        fwrite(junk, 1, junk.count, torn)
        fclose(torn)

        let resumed = try TensorBoardWriter(directory: dir, resumedAfter: 2)
        XCTAssertNotEqual(resumed.path, first.path)
        XCTAssertEqual(try events(first.path).map(\.step), [0, 1, 2])
        XCTAssertEqual(try FileSystem.readFile(first.path).count, TFRecord.records(in: try FileSystem.readFile(first.path)).end)
        let opened = try events(resumed.path)
        XCTAssertEqual(opened.map(\.step), [0, 3])
        XCTAssertEqual(Array(opened[1].bytes.suffix(4)), [0x3A, 2, 0x08, 0x01], "session_log START at the first step to come")
        try resumed.addScalars(step: 3, [("train/loss", 1.0)])
        XCTAssertEqual(try events(resumed.path).map(\.step), [0, 3, 3])

        let fresh = try TensorBoardWriter(directory: dir, resumedAfter: nil)
        XCTAssertEqual(try FileSystem.listDirectory(dir), [String(fresh.path.split(separator: "/").last!)])
    }

    func testReportToSettingAndFlag() throws {
        XCTAssertEqual(TrainingConfiguration().reportTo, .jsonl, "the default: metrics.jsonl alone")
        let dir = try TestFixtures.temporaryDirectory()
        func load(_ yaml: String) throws -> TrainingConfiguration {
            try yaml.write(toFile: dir + "/c.yaml", atomically: true, encoding: .utf8)
            return try TrainingConfiguration(yamlFile: dir + "/c.yaml")
        }
        XCTAssertEqual(try load("report_to: tensorboard\n").reportTo, .tensorboard)
        XCTAssertEqual(try load("report_to: [tensorboard, jsonl]\n").reportTo, .all)
        XCTAssertEqual(try load("report_to:\n  - jsonl\n").reportTo, .jsonl)
        XCTAssertEqual(try load("report_to: all\n").reportTo, .all)
        XCTAssertEqual(try load("report_to: none\n").reportTo, [])
        XCTAssertThrowsError(try load("report_to: wandb\n")) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains("c.yaml") && text.contains("report_to") && text.contains("wandb")
                          && text.contains("tensorboard, jsonl, all or none"), text)
        }
        XCTAssertThrowsError(try load("report_to: [none, jsonl]\n")) { XCTAssertTrue("\($0)".contains("'none' cannot be combined"), "\($0)") }

        XCTAssertEqual(try ReportTargets.parse(flag: "tensorboard,jsonl"), .all)
        XCTAssertEqual(try ReportTargets.parse(flag: "TensorBoard"), .tensorboard)
        XCTAssertEqual(try ReportTargets.parse(flag: "none"), [])
        XCTAssertThrowsError(try ReportTargets.parse(flag: "tensorbord")) { error in
            XCTAssertEqual("\(error)", "--report-to tensorbord: unknown value 'tensorbord'; expected tensorboard, jsonl, all or none, comma-separated")
        }
        XCTAssertThrowsError(try ReportTargets.parse(flag: "jsonl,")) { XCTAssertTrue("\($0)".contains("unknown value ''"), "\($0)") }
    }
}
