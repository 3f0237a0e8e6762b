// safetensors: reader (memory-mapped), writer (atomic), and sharded checkpoints.
//
// The format (https://github.com/huggingface/safetensors):
//   1. 8 bytes: N, the header length, unsigned little-endian 64-bit.
//   2. N bytes: a UTF-8 JSON object. Each key is a tensor name mapping to
//      {"dtype": "BF16", "shape": [d0, d1, ...], "data_offsets": [begin, end]};
//      the optional key "__metadata__" maps to a string → string object.
//      Offsets are relative to the first byte after the header.
//   3. The data: every tensor's bytes, row-major, little-endian, without gaps or overlaps.

/// Where one tensor lives in a safetensors file.
public struct TensorInfo: Equatable, Sendable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    /// Byte range relative to the start of the data section.
    public let dataRange: Range<Int>

    public var elementCount: Int { shape.reduce(1, *) }
    public var byteCount: Int { dataRange.count }
}

/// A safetensors file, memory-mapped. Tensor bytes are views into the mapping.
public final class SafeTensorsFile: @unchecked Sendable {
    public let path: String
    public let metadata: [String: String]
    /// Tensors in the order of their data.
    public let tensors: [TensorInfo]
    private let index: [String: Int]
    private let mapping: MappedFile
    private let dataStart: Int

    /// Headers above this are rejected: real headers are kilobytes, a corrupt length field is not.
    static let maxHeaderBytes = 100 * 1024 * 1024

    public init(path: String) throws {
        self.path = path
        mapping = try MappedFile(path: path)
        let bytes = mapping.bytes
        func fail(_ place: String, _ message: String) -> FileFormatError {
            FileFormatError(file: path, place: place, message)
        }
        guard bytes.count >= 8 else {
            throw fail("header", "file is \(bytes.count) bytes; a safetensors file starts with an 8-byte header length")
        }
        let headerLength = bytes.loadUnaligned(as: UInt64.self)
        guard headerLength >= 2, headerLength <= UInt64(Self.maxHeaderBytes) else {
            throw fail("header", "header length \(headerLength) is out of bounds (expected 2...\(Self.maxHeaderBytes))")
        }
        guard 8 + Int(headerLength) <= bytes.count else {
            throw fail("header", "header length \(headerLength) runs past the end of the \(bytes.count)-byte file (truncated?)")
        }
        dataStart = 8 + Int(headerLength)
        let dataLength = bytes.count - dataStart

        let header: JSONValue
        do {
            header = try JSONValue.parse(bytes: UnsafeRawBufferPointer(rebasing: bytes[8..<dataStart]))
        } catch {
            throw fail("header", "not valid JSON: \(error)")
        }
        guard let object = header.object else { throw fail("header", "expected a JSON object") }

        var metadata: [String: String] = [:]
        var tensors: [TensorInfo] = []
        for (name, value) in object {
            if name == "__metadata__" {
                guard let entries = value.object else { throw fail("__metadata__", "expected an object of strings") }
                for (k, v) in entries {
                    guard let s = v.string else { throw fail("__metadata__", "value of '\(k)' is not a string") }
                    metadata[k] = s
                }
                continue
            }
            let place = "tensor '\(name)'"
            guard let entry = value.object else { throw fail(place, "expected an object with dtype, shape, data_offsets") }
            guard let dtypeName = entry["dtype"]?.string else { throw fail(place, "missing 'dtype'") }
            guard let dtype = DType(rawValue: dtypeName) else {
                throw fail(place, "unsupported dtype '\(dtypeName)' (expected one of \(DType.allCases.map(\.rawValue).joined(separator: ", ")))")
            }
            guard let shapeValues = entry["shape"]?.array else { throw fail(place, "missing 'shape'") }
            var shape: [Int] = []
            for d in shapeValues {
                guard let n = d.int, n >= 0 else { throw fail(place, "shape \(shapeValues) has a non-integer or negative dimension") }
                shape.append(n)
            }
            guard let offsets = entry["data_offsets"]?.array, offsets.count == 2,
                  let begin = offsets[0].int, let end = offsets[1].int, begin >= 0, begin <= end else {
                throw fail(place, "expected data_offsets [begin, end] with 0 <= begin <= end")
            }
            guard end <= dataLength else {
                throw fail(place, "data_offsets [\(begin), \(end)] run past the \(dataLength) bytes of data (truncated file?)")
            }
            let (elements, overflow) = shape.reduce((1, false)) { acc, d in
                let (p, o) = acc.0.multipliedReportingOverflow(by: d)
                return (p, acc.1 || o)
            }
            // The byte count can overflow even when the element count does not (a 2^62-element F32 tensor).
            let (byteCount, byteOverflow) = elements.multipliedReportingOverflow(by: dtype.size)
            guard !overflow, !byteOverflow, byteCount == end - begin else {
                throw fail(place, "shape \(shape) of \(dtypeName) needs \(overflow || byteOverflow ? "too many" : String(byteCount)) bytes but data_offsets give \(end - begin)")
            }
            tensors.append(TensorInfo(name: name, dtype: dtype, shape: shape, dataRange: begin..<end))
        }
        tensors.sort { ($0.dataRange.lowerBound, $0.dataRange.upperBound) < ($1.dataRange.lowerBound, $1.dataRange.upperBound) }
        for i in tensors.indices.dropFirst() where tensors[i].dataRange.lowerBound < tensors[i - 1].dataRange.upperBound {
            throw fail("tensor '\(tensors[i].name)'", "data_offsets overlap those of tensor '\(tensors[i - 1].name)'")
        }
        self.metadata = metadata
        self.tensors = tensors
        self.index = Dictionary(uniqueKeysWithValues: tensors.enumerated().map { ($1.name, $0) })
    }

    public var names: [String] { tensors.map(\.name) }

    public func info(_ name: String) -> TensorInfo? { index[name].map { tensors[$0] } }

    /// The raw bytes of a tensor, valid while this file object lives.
    public func bytes(_ name: String) throws -> UnsafeRawBufferPointer {
        guard let info = info(name) else { throw FileFormatError(file: path, place: "tensor '\(name)'", "no such tensor") }
        return bytes(info)
    }

    public func bytes(_ info: TensorInfo) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: mapping.bytes[(dataStart + info.dataRange.lowerBound)..<(dataStart + info.dataRange.upperBound)])
    }

    /// A tensor's values converted to Float.
    public func floats(_ name: String) throws -> [Float] {
        guard let info = info(name) else { throw FileFormatError(file: path, place: "tensor '\(name)'", "no such tensor") }
        var out = [Float](repeating: 0, count: info.elementCount)
        out.withUnsafeMutableBufferPointer { convertToFloat(bytes(info), dtype: info.dtype, into: $0) }
        return out
    }
}

// MARK: - Writing

/// A tensor to be written: name, type, shape and its little-endian bytes.
public struct TensorRecord: Sendable {
    public var name: String
    public var dtype: DType
    public var shape: [Int]
    public var data: [UInt8]

    public init(name: String, dtype: DType, shape: [Int], data: [UInt8]) {
        precondition(shape.reduce(1, *) * dtype.size == data.count,
                     "tensor '\(name)': shape \(shape) of \(dtype.rawValue) needs \(shape.reduce(1, *) * dtype.size) bytes, got \(data.count)")
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.data = data
    }

    /// A floating-point tensor from Float values, stored as `dtype` (f32, f16 or bf16).
    public init(name: String, floats: [Float], shape: [Int], dtype: DType = .f32) {
        self.init(name: name, dtype: dtype, shape: shape, data: floats.withUnsafeBufferPointer { encodeFloats($0, as: dtype) })
    }
}

public enum SafeTensorsWriter {
    /// Writes tensors in the given order, atomically.
    public static func write(_ tensors: [TensorRecord], metadata: [String: String] = [:], to path: String) throws {
        var header = JSONObject()
        if !metadata.isEmpty {
            header["__metadata__"] = .object(JSONObject(metadata.sorted { $0.key < $1.key }.map { ($0.key, .string($0.value)) }))
        }
        var offset = 0
        for t in tensors {
            guard header[t.name] == nil else { throw UsageError("\(path): tensor '\(t.name)' is written twice") }
            header[t.name] = .object(JSONObject([
                ("dtype", .string(t.dtype.rawValue)),
                ("shape", .array(t.shape.map { .int(Int64($0)) })),
                ("data_offsets", .array([.int(Int64(offset)), .int(Int64(offset + t.data.count))])),
            ]))
            offset += t.data.count
        }
        var headerBytes = Array(JSONValue.object(header).serialized(.compact).utf8)
        // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
        while (8 + headerBytes.count) % 8 != 0 { headerBytes.append(0x20) }
        try FileSystem.writeAtomically(path) { file in
            var length = UInt64(headerBytes.count).littleEndian
            try withUnsafeBytes(of: &length) { try file.write($0) }
            try file.write(headerBytes)
            for t in tensors { try file.write(t.data) }
        }
    }
}

// MARK: - Checkpoint folders (single file or sharded)

/// All tensors of a model folder: `model.safetensors`, or shards listed in `model.safetensors.index.json`.
public final class SafeTensorsCheckpoint: @unchecked Sendable {
    public let directory: String
    public let files: [SafeTensorsFile]
    private let location: [String: Int]

    public init(directory: String) throws {
        self.directory = directory
        let single = directory + "/model.safetensors"
        let indexPath = directory + "/model.safetensors.index.json"
        var files: [SafeTensorsFile] = []
        var location: [String: Int] = [:]
        if FileSystem.exists(indexPath) {
            let index: JSONValue
            do { index = try JSONValue.parse(bytes: try FileSystem.readFile(indexPath)) } catch let e as JSONParseError {
                throw FileFormatError(file: indexPath, place: "index", "not valid JSON: \(e)")
            }
            guard let weightMap = index["weight_map"]?.object else {
                throw FileFormatError(file: indexPath, place: "weight_map", "expected an object mapping tensor names to shard files")
            }
            var shardIndex: [String: Int] = [:]
            for (name, shard) in weightMap {
                guard let shardName = shard.string else {
                    throw FileFormatError(file: indexPath, place: "weight_map['\(name)']", "expected a file name")
                }
                // A shard is a file of this folder: a path elsewhere ("../x", "/etc/x", "sub/x") would read files the
                // user never gave us.
                guard !shardName.isEmpty, !shardName.contains("/"), shardName != ".", shardName != ".." else {
                    throw FileFormatError(file: indexPath, place: "weight_map['\(name)']",
                                          "shard '\(shardName)' is not a file name in the model folder")
                }
                if shardIndex[shardName] == nil {
                    shardIndex[shardName] = files.count
                    files.append(try SafeTensorsFile(path: directory + "/" + shardName))
                }
                let fileNumber = shardIndex[shardName]!
                guard files[fileNumber].info(name) != nil else {
                    throw FileFormatError(file: indexPath, place: "weight_map['\(name)']", "shard \(shardName) does not contain this tensor")
                }
                location[name] = fileNumber
            }
        } else if FileSystem.exists(single) {
            files = [try SafeTensorsFile(path: single)]
            for t in files[0].tensors { location[t.name] = 0 }
        } else {
            let candidates = (try? FileSystem.listDirectory(directory))?.filter { $0.hasSuffix(".safetensors") } ?? []
            guard !candidates.isEmpty else {
                throw UsageError("\(directory): no model.safetensors, model.safetensors.index.json or *.safetensors file")
            }
            for name in candidates {
                let file = try SafeTensorsFile(path: directory + "/" + name)
                for t in file.tensors { location[t.name] = files.count }
                files.append(file)
            }
        }
        self.files = files
        self.location = location
    }

    public var names: [String] { location.keys.sorted() }

    public func info(_ name: String) -> TensorInfo? { location[name].flatMap { files[$0].info(name) } }

    public func contains(_ name: String) -> Bool { location[name] != nil }

    public func file(containing name: String) throws -> SafeTensorsFile {
        guard let i = location[name] else {
            throw FileFormatError(file: directory, place: "tensor '\(name)'", "not found in the checkpoint")
        }
        return files[i]
    }

    public func bytes(_ name: String) throws -> UnsafeRawBufferPointer { try file(containing: name).bytes(name) }

    public func floats(_ name: String) throws -> [Float] { try file(containing: name).floats(name) }
}
