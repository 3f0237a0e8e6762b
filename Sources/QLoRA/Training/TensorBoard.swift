// TensorBoard event files (`report_to: tensorboard`), written record by record as the run goes, so a TensorBoard
// pointed at the folder shows the curves while the run trains. Our own encoder: no TensorFlow, no protobuf library.
//
// 1. The file is a sequence of TFRecords (tensorflow/core/lib/io/record_writer.cc), each holding one `Event`:
//      uint64  length of the data, little-endian
//      uint32  masked CRC-32C of those 8 length bytes, little-endian
//      byte    data[length]
//      uint32  masked CRC-32C of the data, little-endian
//    CRC-32C is the Castagnoli CRC (reflected polynomial 0x82F63B78, as in iSCSI and ext4);
//    masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8, all modulo 2^32 (tensorflow/core/lib/hash/crc32c.h).
// 2. The data is a protobuf message; the fields we write (tensorflow/core/util/event.proto, framework/summary.proto):
//      Event         { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
//                      SessionLog session_log = 7; }                     (6 is the deprecated log_message)
//      Summary       { repeated Summary.Value value = 1; }
//      Summary.Value { string tag = 1; float simple_value = 2; }
//      SessionLog    { SessionStatus status = 1; }          START = 1
//    Protobuf wire format: each field is a key varint (field number << 3 | wire type) then its value; wire type 0 is a
//    varint (int64 as its two's complement, 10 bytes when negative), 1 is 8 little-endian bytes (double), 2 is a
//    varint length then the bytes (strings, nested messages), 5 is 4 little-endian bytes (float).
// 3. The first record of a file is an Event with file_version "brain.Event:2" and no summary.
//
// Layout: every event file of a run goes into OUTPUT/runs/ itself, named events.out.tfevents.<seconds>.<host>.<pid>
// (transformers makes OUTPUT/runs/<date>_<host>/ per process, so each resume is a separate run in TensorBoard; ours keeps
// one curve per output folder: `tensorboard --logdir OUTPUT/runs` shows the run, `--logdir` over several output folders
// shows one run per folder). The pid keeps two processes starting in the same second apart.
//
// Resume: the resumed run starts again after its checkpoint's step S, and the interrupted run may have logged steps after
// S. Those records are cut off the earlier files (at a record boundary, as metrics.jsonl keeps its lines up to S), and the
// new file opens with a SessionLog START at step S + 1, TensorBoard's own signal to drop any step ≥ S + 1 it had already
// loaded (what torch's SummaryWriter(purge_step:) writes). A fresh run (the trainer allows one in a folder holding an
// earlier run only with --overwrite) removes the earlier event files from OUTPUT/runs/.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// MARK: - CRC-32C

/// The Castagnoli CRC-32 that TFRecord framing uses.
public enum CRC32C {
    /// Byte-at-a-time table for the reflected polynomial 0x82F63B78.
    static let table: [UInt32] = (0..<256).map { byte in
        var crc = UInt32(byte)
        for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
        return crc
    }

    /// CRC-32C of `bytes` (initial value and final xor 0xFFFFFFFF): "123456789" gives 0xE3069283.
    public static func checksum<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes { crc = table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8) }
        return crc ^ 0xFFFF_FFFF
    }

    /// TFRecord's masked CRC: rotated right by 15 bits plus a constant, so that a CRC stored inside data that is itself
    /// checksummed does not cancel out.
    public static func masked<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
        let crc = checksum(bytes)
        return ((crc >> 15) | (crc << 17)) &+ 0xA282_EAD8
    }
}

// MARK: - TFRecord framing

public enum TFRecord {
    /// One record: length, masked CRC of the length, data, masked CRC of the data.
    public static func frame(_ data: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(data.count + 16)
        let length = littleEndian(UInt64(data.count))
        out += length
        out += littleEndian(CRC32C.masked(length))
        out += data
        out += littleEndian(CRC32C.masked(data))
        return out
    }

    /// The records of a file, in order, each with the offset where it starts, up to the first record that is cut short
    /// or fails a checksum (what a run killed mid-write leaves at the end); `end` is where the valid records end.
    public static func records(in bytes: [UInt8]) -> (records: [(offset: Int, data: [UInt8])], end: Int) {
        var records: [(offset: Int, data: [UInt8])] = []
        var at = 0
        while bytes.count - at >= 16 {
            let lengthBytes = bytes[at..<(at + 8)]
            guard readLittleEndian(bytes[(at + 8)..<(at + 12)]) == CRC32C.masked(lengthBytes) else { break }
            let length = lengthBytes.reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            guard length <= UInt64(bytes.count - at - 16) else { break }
            let start = at + 12, end = start + Int(length)
            guard readLittleEndian(bytes[end..<(end + 4)]) == CRC32C.masked(bytes[start..<end]) else { break }
            records.append((at, Array(bytes[start..<end])))
            at = end + 4
        }
        return (records, at)
    }

    static func littleEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        (0..<(T.bitWidth / 8)).map { UInt8(truncatingIfNeeded: value >> ($0 * 8)) }
    }

    static func readLittleEndian(_ bytes: ArraySlice<UInt8>) -> UInt32 {
        bytes.reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
    }
}

// MARK: - Protobuf encoding of Event

/// The few protobuf encodings an Event needs.
struct ProtobufWriter {
    var bytes: [UInt8] = []

    mutating func varint(_ value: UInt64) {
        var v = value
        while v >= 0x80 {
            bytes.append(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        bytes.append(UInt8(v))
    }

    mutating func key(_ field: Int, _ wireType: Int) { varint(UInt64(field << 3 | wireType)) }

    mutating func int64(_ field: Int, _ value: Int64) { key(field, 0); varint(UInt64(bitPattern: value)) }
    mutating func double(_ field: Int, _ value: Double) { key(field, 1); bytes += TFRecord.littleEndian(value.bitPattern) }
    mutating func float(_ field: Int, _ value: Float) { key(field, 5); bytes += TFRecord.littleEndian(value.bitPattern) }
    mutating func lengthDelimited(_ field: Int, _ value: [UInt8]) { key(field, 2); varint(UInt64(value.count)); bytes += value }
    mutating func string(_ field: Int, _ value: String) { lengthDelimited(field, Array(value.utf8)) }
}

public enum TensorBoardEvent {
    public static let fileVersion = "brain.Event:2"

    /// An Event: wall time, step, then what it carries (file_version, scalars or a session start).
    public static func encode(wallTime: Double, step: Int64, fileVersion: String? = nil, scalars: [(tag: String, value: Float)] = [],
                              sessionStart: Bool = false) -> [UInt8] {
        var event = ProtobufWriter()
        event.double(1, wallTime)
        event.int64(2, step)
        if let fileVersion { event.string(3, fileVersion) }
        if !scalars.isEmpty {
            var summary = ProtobufWriter()
            for (tag, value) in scalars {
                var entry = ProtobufWriter()
                entry.string(1, tag)
                entry.float(2, value)
                summary.lengthDelimited(1, entry.bytes)
            }
            event.lengthDelimited(5, summary.bytes)
        }
        if sessionStart {
            var log = ProtobufWriter()
            log.int64(1, 1)  // SessionLog.START
            event.lengthDelimited(7, log.bytes)
        }
        return event.bytes
    }

    /// An Event holding one text summary (TensorBoard's text plugin renders it as Markdown): a Summary.Value with the
    /// tag, metadata naming the "text" plugin, and a rank-0 DT_STRING tensor.
    public static func encodeText(wallTime: Double, step: Int64, tag: String, text: String) -> [UInt8] {
        var plugin = ProtobufWriter()
        plugin.string(1, "text")                    // PluginData.plugin_name
        var metadata = ProtobufWriter()
        metadata.lengthDelimited(1, plugin.bytes)   // SummaryMetadata.plugin_data
        var tensor = ProtobufWriter()
        tensor.int64(1, 7)                          // TensorProto.dtype = DT_STRING
        tensor.lengthDelimited(2, [])               // tensor_shape: rank 0
        tensor.lengthDelimited(8, Array(text.utf8)) // string_val
        var value = ProtobufWriter()
        value.string(1, tag)
        value.lengthDelimited(8, tensor.bytes)      // Summary.Value.tensor
        value.lengthDelimited(9, metadata.bytes)    // Summary.Value.metadata
        var summary = ProtobufWriter()
        summary.lengthDelimited(1, value.bytes)
        var event = ProtobufWriter()
        event.double(1, wallTime)
        event.int64(2, step)
        event.lengthDelimited(5, summary.bytes)
        return event.bytes
    }

    /// The step field of an encoded Event (0 when absent, as protobuf defaults it); nil when the bytes are not an Event
    /// of the fields above (then resume leaves the record alone).
    public static func step(of data: [UInt8]) -> Int64? {
        var at = 0, step: Int64 = 0
        func varint() -> UInt64? {
            var value: UInt64 = 0, shift: UInt64 = 0
            while at < data.count, shift < 64 {
                let byte = data[at]
                at += 1
                value |= UInt64(byte & 0x7F) << shift
                if byte < 0x80 { return value }
                shift += 7
            }
            return nil
        }
        while at < data.count {
            guard let key = varint() else { return nil }
            switch key & 7 {
            case 0:
                guard let value = varint() else { return nil }
                if key >> 3 == 2 { step = Int64(bitPattern: value) }
            case 1: at += 8
            case 5: at += 4
            case 2:
                guard let length = varint(), length <= UInt64(data.count - at) else { return nil }
                at += Int(length)
            default: return nil
            }
            guard at <= data.count else { return nil }
        }
        return step
    }
}

// MARK: - The writer

/// Writes one event file of a training run into `directory` (OUTPUT/runs), each record written through to the file as it
/// is added, so TensorBoard reads it while the run goes.
public final class TensorBoardWriter {
    public let directory: String
    public let path: String
    private let fd: Int32

    /// Event files are the files whose name holds this (what TensorBoard's loader looks for).
    public static let fileMarker = "tfevents"

    /// Opens a new event file. `resumedAfter`: the step of the checkpoint a resumed run continues from (records of later
    /// steps are cut off the earlier files, and TensorBoard is told to drop them); nil for a fresh run, which removes the
    /// earlier run's event files from the folder.
    public init(directory: String, resumedAfter: Int?) throws {
        self.directory = directory
        try FileSystem.createDirectory(directory)
        let earlier = try FileSystem.listDirectory(directory).filter { $0.hasPrefix("events.out.\(Self.fileMarker).") }
        for name in earlier {
            if let step = resumedAfter { try Self.cut(directory + "/" + name, afterStep: step) } else { FileSystem.remove(directory + "/" + name) }
        }
        let now = Self.wallTime()
        let base = directory + "/events.out.\(Self.fileMarker).\(Int(now)).\(Self.hostName()).\(getpid())"
        var candidate = base, suffix = 0, opened: Int32 = -1
        while true {
            opened = open(candidate, O_WRONLY | O_CREAT | O_EXCL | O_APPEND, 0o644)
            if opened >= 0 || errno != EEXIST { break }
            suffix += 1
            candidate = base + ".\(suffix)"
        }
        guard opened >= 0 else { throw UsageError("report_to tensorboard: cannot create \(candidate): \(String(cString: strerror(errno)))") }
        fd = opened
        path = candidate
        try append(TensorBoardEvent.encode(wallTime: now, step: 0, fileVersion: TensorBoardEvent.fileVersion))
        if let step = resumedAfter {
            try append(TensorBoardEvent.encode(wallTime: now, step: Int64(step + 1), sessionStart: true))
        }
    }

    deinit { close(fd) }

    /// The writer of a training run: nil unless report_to holds tensorboard. `resumedAfter` is the step the run starts
    /// from (0 for a fresh run).
    static func forRun(_ c: TrainingConfiguration, resumedAfter step: Int, log: (String) -> Void) throws -> TensorBoardWriter? {
        guard c.reportTo.contains(.tensorboard) else { return nil }
        let writer = try TensorBoardWriter(directory: c.outputDirectory + "/runs", resumedAfter: step > 0 ? step : nil)
        log("tensorboard: \(writer.path) (view with `tensorboard --logdir \(writer.directory)`)")
        return writer
    }

    /// Scalars of one step, as one Event.
    public func addScalars(step: Int, _ scalars: [(tag: String, value: Double)]) throws {
        guard !scalars.isEmpty else { return }
        try append(TensorBoardEvent.encode(wallTime: Self.wallTime(), step: Int64(step), scalars: scalars.map { ($0.tag, Float($0.value)) }))
    }

    /// A metrics.jsonl line's fields as TensorBoard scalars, under the tags transformers' TensorBoardCallback gives them
    /// (its `rewrite_logs`): "eval_x" becomes "eval/x", anything else "train/x"; "step" is the event's step.
    public func addMetrics(_ fields: [(String, JSONValue)]) throws {
        guard let step = fields.first(where: { $0.0 == "step" })?.1.int else { return }
        let scalars = fields.compactMap { key, value -> (tag: String, value: Double)? in
            guard key != "step", let number = value.double else { return nil }
            return (key.hasPrefix("eval_") ? "eval/" + key.dropFirst(5) : "train/" + key, number)
        }
        try addScalars(step: step, scalars)
    }

    /// A Markdown text of one step (the text plugin's tab).
    public func addText(step: Int, tag: String, markdown: String) throws {
        try append(TensorBoardEvent.encodeText(wallTime: Self.wallTime(), step: Int64(step), tag: tag, text: markdown))
    }

    /// Frames and writes one record, straight to the file (no buffer to flush).
    func append(_ event: [UInt8]) throws {
        let record = TFRecord.frame(event)
        try record.withUnsafeBytes { raw in
            var done = 0
            while done < raw.count {
                let n = write(fd, raw.baseAddress! + done, raw.count - done)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw UsageError("report_to tensorboard: cannot write to \(path): \(String(cString: strerror(errno)))") }
                done += n
            }
        }
    }

    /// Cuts an earlier event file after its last record of a step ≤ `step` (and any torn record a kill left at its end).
    static func cut(_ path: String, afterStep step: Int) throws {
        let bytes = try FileSystem.readFile(path)
        let (records, end) = TFRecord.records(in: bytes)
        let keep = records.first { (TensorBoardEvent.step(of: $0.data) ?? Int64.min) > Int64(step) }?.offset ?? end
        guard keep < bytes.count else { return }
        guard truncate(path, off_t(keep)) == 0 else {
            throw UsageError("report_to tensorboard: cannot cut \(path) back to step \(step): \(String(cString: strerror(errno)))")
        }
    }

    static func wallTime() -> Double {
        var t = timespec()
        clock_gettime(CLOCK_REALTIME, &t)
        return Double(t.tv_sec) + Double(t.tv_nsec) * 1e-9
    }

    static func hostName() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "localhost" }
        let name = String(cString: buffer).filter { $0 != "/" }
        return name.isEmpty ? "localhost" : name
    }
}
