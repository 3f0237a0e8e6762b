// GGUF reader: the single-file model format of llama.cpp / ggml, read through a memory mapping.
//
// The format (versions 2 and 3; version 1 used 32-bit counts and is not read), all little-endian:
//  1. Header: magic "GGUF" (the bytes 47 47 55 46), u32 version, u64 tensor count, u64 metadata key/value count.
//  2. A string is a u64 byte length followed by that many UTF-8 bytes, no terminator.
//  3. Metadata, `kv count` times: key (string), u32 value type, then the value:
//       0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool (one byte, 0 or 1), 8 string,
//       9 array = u32 element type, u64 element count, the elements back to back (arrays may nest),
//       10 u64, 11 i64, 12 f64.
//     Keys are dotted names, e.g. "general.architecture", "llama.block_count", "tokenizer.ggml.tokens".
//  4. Tensor infos, `tensor count` times: name (string), u32 n_dims (at most 4), n_dims × u64 ne[] (ne[0] is the
//     fastest-varying dimension, so a row-major [rows, cols] matrix has ne = [cols, rows]), u32 ggml type,
//     u64 offset of the data relative to the start of the data section.
//  5. Padding up to a multiple of the alignment: metadata "general.alignment" (u32) or 32 when absent.
//  6. The data section: each tensor's bytes at its offset, which is itself a multiple of the alignment.
//     A tensor of a block-quantized type stores ne[0]/block_size blocks per row (see GGMLQuant.swift);
//     ne[0] is a multiple of the block size.
//
// Every read is bounds-checked; a bad file gives a FileFormatError naming the place ("header",
// "metadata key 17 'tokenizer.ggml.tokens'", "tensor 'blk.0.attn_q.weight'") and what was expected.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

// MARK: - Metadata values

/// The type tag of a GGUF metadata value.
public enum GGUFValueType: UInt32, Sendable, CaseIterable {
    case uint8 = 0, int8 = 1, uint16 = 2, int16 = 3, uint32 = 4, int32 = 5, float32 = 6, bool = 7
    case string = 8, array = 9, uint64 = 10, int64 = 11, float64 = 12

    /// Bytes of one value of a fixed-size type; nil for strings and arrays.
    public var fixedSize: Int? {
        switch self {
        case .uint8, .int8, .bool: return 1
        case .uint16, .int16: return 2
        case .uint32, .int32, .float32: return 4
        case .uint64, .int64, .float64: return 8
        case .string, .array: return nil
        }
    }

    /// The fewest bytes one value of this type takes (strings and arrays: their length field).
    var minimumSize: Int {
        switch self {
        case .string: return 8
        case .array: return 12
        default: return fixedSize!
        }
    }
}

/// One metadata value.
public enum GGUFValue: Equatable, Sendable {
    case uint8(UInt8), int8(Int8), uint16(UInt16), int16(Int16), uint32(UInt32), int32(Int32)
    case uint64(UInt64), int64(Int64), float32(Float), float64(Double), bool(Bool), string(String)
    /// An array keeps its element type so that an empty array can be written back.
    case array(GGUFValueType, [GGUFValue])

    public var type: GGUFValueType {
        switch self {
        case .uint8: return .uint8
        case .int8: return .int8
        case .uint16: return .uint16
        case .int16: return .int16
        case .uint32: return .uint32
        case .int32: return .int32
        case .uint64: return .uint64
        case .int64: return .int64
        case .float32: return .float32
        case .float64: return .float64
        case .bool: return .bool
        case .string: return .string
        case .array: return .array
        }
    }

    /// Any integer value as Int (nil for non-integers and u64 values above Int.max).
    public var int: Int? {
        switch self {
        case .uint8(let v): return Int(v)
        case .int8(let v): return Int(v)
        case .uint16(let v): return Int(v)
        case .int16(let v): return Int(v)
        case .uint32(let v): return Int(v)
        case .int32(let v): return Int(v)
        case .uint64(let v): return Int(exactly: v)
        case .int64(let v): return Int(v)
        default: return nil
        }
    }

    /// Any number as Double.
    public var double: Double? {
        switch self {
        case .float32(let v): return Double(v)
        case .float64(let v): return v
        default: return int.map(Double.init)
        }
    }

    public var bool: Bool? { if case .bool(let b) = self { return b }; return nil }
    public var string: String? { if case .string(let s) = self { return s }; return nil }
    public var array: [GGUFValue]? { if case .array(_, let a) = self { return a }; return nil }

    /// An array of strings, or nil if this is not one.
    public var strings: [String]? {
        guard case .array(.string, let items) = self else { return nil }
        return items.compactMap(\.string)
    }

    /// An array of integers, or nil if this is not one.
    public var ints: [Int]? {
        guard let items = array else { return nil }
        var out: [Int] = []
        out.reserveCapacity(items.count)
        for item in items {
            guard let v = item.int else { return nil }
            out.append(v)
        }
        return out
    }

    /// An array of numbers as Floats, or nil if this is not one.
    public var floats: [Float]? {
        guard let items = array else { return nil }
        var out: [Float] = []
        out.reserveCapacity(items.count)
        for item in items {
            guard let v = item.double else { return nil }
            out.append(Float(v))
        }
        return out
    }
}

// MARK: - Tensor infos

/// Where one tensor lies in a GGUF file and how it is stored.
public struct GGUFTensorInfo: Equatable, Sendable {
    public let name: String
    /// ggml dimensions, fastest-varying first: a row-major [rows, cols] matrix has `dimensions == [cols, rows]`.
    public let dimensions: [Int]
    public let type: GGMLType
    /// Offset of the data relative to the start of the data section.
    public let offset: Int
    /// Absolute byte range of the data in the file.
    public let dataRange: Range<Int>

    public var elementCount: Int { dimensions.reduce(1, *) }
    public var byteCount: Int { dataRange.count }
    /// The row-major shape (PyTorch / safetensors order): the dimensions reversed.
    public var shape: [Int] { dimensions.reversed() }
}

// MARK: - File

/// A GGUF file, memory-mapped. Metadata is parsed when opened; tensor data is read on demand.
public final class GGUFFile: @unchecked Sendable {
    public static let magic: [UInt8] = Array("GGUF".utf8)
    public static let defaultAlignment = 32
    /// The most dimensions a ggml tensor has.
    public static let maxDimensions = 4

    public let path: String
    public let version: UInt32
    /// Metadata in file order.
    public let metadata: [(key: String, value: GGUFValue)]
    public let tensors: [GGUFTensorInfo]
    public let alignment: Int
    /// Absolute offset of the data section.
    public let dataOffset: Int

    private let mapped: MappedFile?
    private let storage: UnsafeRawBufferPointer
    private let metadataIndex: [String: Int]
    private let tensorIndex: [String: Int]

    /// Opens and validates a GGUF file.
    public convenience init(path: String) throws {
        let mapped = try MappedFile(path: path)
        try self.init(path: path, mapped: mapped, bytes: mapped.bytes)
    }

    /// Parses GGUF bytes held by the caller, which must keep them alive and unchanged while this object lives.
    /// `name` stands for the file in error messages.
    public convenience init(unsafeBytes bytes: UnsafeRawBufferPointer, name: String) throws {
        try self.init(path: name, mapped: nil, bytes: bytes)
    }

    private init(path: String, mapped: MappedFile?, bytes: UnsafeRawBufferPointer) throws {
        self.path = path
        self.mapped = mapped
        self.storage = bytes
        var reader = GGUFByteReader(bytes: bytes, file: path)

        // 1. Header
        let magic = try reader.bytes(4, place: "header", what: "the magic \"GGUF\"")
        guard Array(magic) == GGUFFile.magic else {
            throw FileFormatError(file: path, place: "header", "bad magic \(Array(magic).map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: " ")), expected 47 47 55 46 (\"GGUF\"); not a GGUF file")
        }
        version = try reader.u32(place: "header", what: "the version")
        guard version == 2 || version == 3 else {
            throw FileFormatError(file: path, place: "header", "unsupported GGUF version \(version), expected 2 or 3")
        }
        let tensorCount = try reader.count(place: "header", what: "tensor count", minimumItemSize: 24)
        let kvCount = try reader.count(place: "header", what: "metadata count", minimumItemSize: 12)

        // 3. Metadata
        var metadata: [(key: String, value: GGUFValue)] = []
        metadata.reserveCapacity(kvCount)
        var metadataIndex: [String: Int] = [:]
        for i in 0..<kvCount {
            let key = try reader.string(place: "metadata key \(i)", what: "the key")
            let place = "metadata key \(i) '\(key)'"
            let rawType = try reader.u32(place: place, what: "the value type")
            guard let type = GGUFValueType(rawValue: rawType) else {
                throw FileFormatError(file: path, place: place, "unknown value type \(rawType), expected 0...12")
            }
            let value = try reader.value(of: type, place: place, depth: 0)
            guard metadataIndex[key] == nil else { throw FileFormatError(file: path, place: place, "the key appears twice") }
            metadataIndex[key] = metadata.count
            metadata.append((key, value))
        }
        self.metadata = metadata
        self.metadataIndex = metadataIndex

        // 5. Alignment
        var alignment = GGUFFile.defaultAlignment
        if let index = metadataIndex["general.alignment"] {
            let place = "metadata key \(index) 'general.alignment'"
            guard let a = metadata[index].value.int, a > 0, a <= 1 << 20, a & (a - 1) == 0 else {
                throw FileFormatError(file: path, place: place, "expected a power of two up to 2^20, got \(metadata[index].value)")
            }
            alignment = a
        }
        self.alignment = alignment

        // 4. Tensor infos
        var infos: [(name: String, dims: [Int], type: GGMLType, offset: Int)] = []
        infos.reserveCapacity(tensorCount)
        for i in 0..<tensorCount {
            let name = try reader.string(place: "tensor info \(i)", what: "the name")
            let place = "tensor '\(name)'"
            let nDims = Int(try reader.u32(place: place, what: "the number of dimensions"))
            guard nDims >= 1 && nDims <= GGUFFile.maxDimensions else {
                throw FileFormatError(file: path, place: place, "\(nDims) dimensions, expected 1...\(GGUFFile.maxDimensions)")
            }
            var dims: [Int] = []
            var elements = 1
            for d in 0..<nDims {
                let ne = try reader.u64(place: place, what: "dimension \(d)")
                guard let n = Int(exactly: ne), n >= 0, n <= 1 << 40 else {
                    throw FileFormatError(file: path, place: place, "dimension \(d) is \(ne), too large")
                }
                let (product, overflow) = elements.multipliedReportingOverflow(by: n)
                guard !overflow, product <= 1 << 48 else {
                    throw FileFormatError(file: path, place: place, "dimensions \(dims + [n]) hold too many elements")
                }
                elements = product
                dims.append(n)
            }
            let rawType = try reader.u32(place: place, what: "the ggml type")
            guard let type = GGMLType(rawValue: rawType) else {
                throw FileFormatError(file: path, place: place, "unknown ggml type \(rawType)")
            }
            let offset = try reader.u64(place: place, what: "the data offset")
            guard let off = Int(exactly: offset), off <= bytes.count else {
                throw FileFormatError(file: path, place: place, "data offset \(offset) lies beyond the end of the file (\(bytes.count) bytes)")
            }
            infos.append((name, dims, type, off))
        }

        // 6. Data section
        let dataOffset = (reader.position + alignment - 1) / alignment * alignment
        self.dataOffset = dataOffset
        var tensors: [GGUFTensorInfo] = []
        tensors.reserveCapacity(infos.count)
        var tensorIndex: [String: Int] = [:]
        for info in infos {
            let place = "tensor '\(info.name)'"
            guard tensorIndex[info.name] == nil else { throw FileFormatError(file: path, place: place, "the name appears twice") }
            guard info.offset % alignment == 0 else {
                throw FileFormatError(file: path, place: place, "data offset \(info.offset) is not a multiple of the alignment \(alignment)")
            }
            let rowLength = info.dims[0]
            guard rowLength % info.type.blockSize == 0 else {
                throw FileFormatError(file: path, place: place, "ne[0] = \(rowLength) is not a multiple of the \(info.type.name) block size \(info.type.blockSize)")
            }
            let elements = info.dims.reduce(1, *)
            let byteCount = elements / info.type.blockSize * info.type.blockBytes
            let start = dataOffset + info.offset
            guard start <= bytes.count, byteCount <= bytes.count - start else {
                throw FileFormatError(file: path, place: place, "data [\(start), \(start + byteCount)) (\(info.type.name) \(info.dims)) lies beyond the end of the file (\(bytes.count) bytes); the file is truncated")
            }
            tensorIndex[info.name] = tensors.count
            tensors.append(GGUFTensorInfo(name: info.name, dimensions: info.dims, type: info.type, offset: info.offset,
                                          dataRange: start..<(start + byteCount)))
        }
        self.tensors = tensors
        self.tensorIndex = tensorIndex
    }

    // MARK: Access

    /// The metadata value of `key`, if present.
    public subscript(key: String) -> GGUFValue? { metadataIndex[key].map { metadata[$0].value } }

    /// The place string for errors about a metadata key ("metadata key 17 'tokenizer.ggml.tokens'").
    public func place(ofKey key: String) -> String {
        metadataIndex[key].map { "metadata key \($0) '\(key)'" } ?? "metadata key '\(key)'"
    }

    /// A metadata value that must be present and of the asked kind.
    public func required<T>(_ key: String, _ what: String, _ extract: (GGUFValue) -> T?) throws -> T {
        guard let value = self[key] else {
            throw FileFormatError(file: path, place: "metadata", "missing key '\(key)' (\(what))")
        }
        guard let v = extract(value) else {
            throw FileFormatError(file: path, place: place(ofKey: key), "expected \(what), got \(value.type)")
        }
        return v
    }

    public var tensorNames: [String] { tensors.map(\.name) }

    public func tensor(_ name: String) -> GGUFTensorInfo? { tensorIndex[name].map { tensors[$0] } }

    /// The raw (possibly quantized) bytes of a tensor.
    public func bytes(_ info: GGUFTensorInfo) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: storage[info.dataRange])
    }

    /// A tensor dequantized to Float, in ggml order (ne[0] fastest), which is the row-major order of `info.shape`.
    public func floats(_ info: GGUFTensorInfo) throws -> [Float] {
        guard info.type.canDequantize else {
            throw FileFormatError(file: path, place: "tensor '\(info.name)'", "dequantizing \(info.type.name) is not supported")
        }
        var out = [Float](repeating: 0, count: info.elementCount)
        out.withUnsafeMutableBufferPointer { info.type.dequantize(bytes(info), into: $0) }
        return out
    }

    public func floats(_ name: String) throws -> [Float] {
        guard let info = tensor(name) else { throw FileFormatError(file: path, place: "tensor '\(name)'", "no such tensor") }
        return try floats(info)
    }
}

// MARK: - Bounds-checked reading

/// Reads little-endian values from a byte buffer; every read checks the bounds and names the place on failure.
struct GGUFByteReader {
    let bytes: UnsafeRawBufferPointer
    let file: String
    var position = 0
    /// Arrays nested deeper than this are refused (a crafted file could otherwise recurse without end).
    static let maxArrayDepth = 8

    var remaining: Int { bytes.count - position }

    func truncated(_ place: String, _ what: String, need: Int) -> FileFormatError {
        FileFormatError(file: file, place: place, "file ends at byte \(bytes.count) while reading \(what) at byte \(position) (\(need) bytes needed); the file is truncated")
    }

    mutating func bytes(_ n: Int, place: String, what: String) throws -> UnsafeRawBufferPointer {
        guard n >= 0, n <= remaining else { throw truncated(place, what, need: n) }
        defer { position += n }
        return UnsafeRawBufferPointer(rebasing: bytes[position..<(position + n)])
    }

    mutating func load<T: FixedWidthInteger>(_: T.Type, place: String, what: String) throws -> T {
        let size = MemoryLayout<T>.size
        guard size <= remaining else { throw truncated(place, what, need: size) }
        defer { position += size }
        return T(littleEndian: bytes.loadUnaligned(fromByteOffset: position, as: T.self))
    }

    mutating func u32(place: String, what: String) throws -> UInt32 { try load(UInt32.self, place: place, what: what) }
    mutating func u64(place: String, what: String) throws -> UInt64 { try load(UInt64.self, place: place, what: what) }

    /// A u64 count of items, each taking at least `minimumItemSize` bytes: a count the rest of the file
    /// cannot hold is refused before anything is allocated for it.
    mutating func count(place: String, what: String, minimumItemSize: Int) throws -> Int {
        let raw = try u64(place: place, what: what)
        guard let n = Int(exactly: raw), n <= remaining / max(minimumItemSize, 1) else {
            throw FileFormatError(file: file, place: place, "\(what) \(raw) is impossible: the \(remaining) bytes left hold at most \(remaining / max(minimumItemSize, 1)); the file is truncated or corrupt")
        }
        return n
    }

    mutating func string(place: String, what: String) throws -> String {
        let length = try u64(place: place, what: "the length of \(what)")
        guard let n = Int(exactly: length), n <= remaining else {
            throw FileFormatError(file: file, place: place, "\(what) has length \(length) but only \(remaining) bytes are left; the file is truncated or corrupt")
        }
        let raw = try bytes(n, place: place, what: what)
        return String(decoding: raw, as: UTF8.self)
    }

    mutating func value(of type: GGUFValueType, place: String, depth: Int) throws -> GGUFValue {
        switch type {
        case .uint8: return .uint8(try load(UInt8.self, place: place, what: "a u8 value"))
        case .int8: return .int8(try load(Int8.self, place: place, what: "an i8 value"))
        case .uint16: return .uint16(try load(UInt16.self, place: place, what: "a u16 value"))
        case .int16: return .int16(try load(Int16.self, place: place, what: "an i16 value"))
        case .uint32: return .uint32(try load(UInt32.self, place: place, what: "a u32 value"))
        case .int32: return .int32(try load(Int32.self, place: place, what: "an i32 value"))
        case .uint64: return .uint64(try load(UInt64.self, place: place, what: "a u64 value"))
        case .int64: return .int64(try load(Int64.self, place: place, what: "an i64 value"))
        case .float32: return .float32(Float(bitPattern: try load(UInt32.self, place: place, what: "an f32 value")))
        case .float64: return .float64(Double(bitPattern: try load(UInt64.self, place: place, what: "an f64 value")))
        case .bool:
            let b = try load(UInt8.self, place: place, what: "a bool value")
            guard b <= 1 else { throw FileFormatError(file: file, place: place, "bool value \(b), expected 0 or 1") }
            return .bool(b == 1)
        case .string:
            return .string(try string(place: place, what: "a string value"))
        case .array:
            guard depth < GGUFByteReader.maxArrayDepth else {
                throw FileFormatError(file: file, place: place, "arrays nested deeper than \(GGUFByteReader.maxArrayDepth)")
            }
            let rawType = try u32(place: place, what: "the array element type")
            guard let elementType = GGUFValueType(rawValue: rawType) else {
                throw FileFormatError(file: file, place: place, "unknown array element type \(rawType), expected 0...12")
            }
            let n = try count(place: place, what: "array length", minimumItemSize: elementType.minimumSize)
            var items: [GGUFValue] = []
            items.reserveCapacity(n)
            for i in 0..<n {
                do {
                    items.append(try value(of: elementType, place: place, depth: depth + 1))
                } catch let error as FileFormatError where depth == 0 {
                    throw FileFormatError(file: error.file, place: "\(error.place), element \(i)", error.message)
                }
            }
            return .array(elementType, items)
        }
    }
}
