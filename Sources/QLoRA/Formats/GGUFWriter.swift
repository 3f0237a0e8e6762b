// GGUF writer: the inverse of GGUFFile (see the numbered format spec in GGUF.swift).
// Used by the tests to build small files, and by GGUF export.

/// A tensor to be written to a GGUF file: its bytes are already in the ggml layout of `type`.
public struct GGUFTensorRecord: Sendable {
    public var name: String
    public var type: GGMLType
    /// ggml dimensions, fastest-varying first (a row-major [rows, cols] matrix is [cols, rows]).
    public var dimensions: [Int]
    public var data: [UInt8]

    public init(name: String, type: GGMLType, dimensions: [Int], data: [UInt8]) {
        self.name = name
        self.type = type
        self.dimensions = dimensions
        self.data = data
    }

    /// A tensor of Floats stored as `type` (F32, F16, BF16, or quantized to Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).
    public init(name: String, floats: [Float], dimensions: [Int], type: GGMLType = .f32) {
        precondition(type.canQuantize, "GGUFTensorRecord(floats:) cannot store \(type.name)")
        self.init(name: name, type: type, dimensions: dimensions, data: type.quantize(floats))
    }
}

public enum GGUFWriter {
    /// The bytes of a GGUF file. `general.alignment` is added to the metadata when `alignment` is not 32.
    public static func serialize(metadata: [(key: String, value: GGUFValue)], tensors: [GGUFTensorRecord],
                                 alignment: Int = GGUFFile.defaultAlignment, version: UInt32 = 3) throws -> [UInt8] {
        let layout = try header(metadata: metadata, tensors: tensors.map { ($0.name, $0.type, $0.dimensions) },
                                alignment: alignment, version: version)
        var out = layout.bytes
        for (i, t) in tensors.enumerated() {
            guard t.data.count == layout.sizes[i] else {
                throw UsageError("GGUF tensor '\(t.name)': \(t.type.name) \(t.dimensions) needs \(layout.sizes[i]) bytes; got \(t.data.count) bytes")
            }
            out += [UInt8](repeating: 0, count: layout.bytes.count + layout.offsets[i] - out.count)
            out += t.data
        }
        pad(&out, alignment)
        return out
    }

    /// Writes a GGUF file atomically.
    public static func write(metadata: [(key: String, value: GGUFValue)], tensors: [GGUFTensorRecord],
                             alignment: Int = GGUFFile.defaultAlignment, to path: String) throws {
        let bytes = try serialize(metadata: metadata, tensors: tensors, alignment: alignment)
        try FileSystem.writeAtomically(path, bytes: bytes)
    }

    /// Writes a GGUF file atomically, one tensor at a time: `data(i)` gives the bytes of `tensors[i]` when they are
    /// due, so that a model larger than memory twice over can be written. Nothing replaces `path` unless every tensor
    /// was produced with the announced size.
    public static func write(metadata: [(key: String, value: GGUFValue)], tensors: [(name: String, type: GGMLType, dimensions: [Int])],
                             alignment: Int = GGUFFile.defaultAlignment, to path: String,
                             data: (Int) throws -> [UInt8]) throws {
        let layout = try header(metadata: metadata, tensors: tensors, alignment: alignment, version: 3)
        try FileSystem.writeAtomically(path) { file in
            try file.write(layout.bytes)
            var written = 0
            for i in tensors.indices {
                let bytes = try data(i)
                guard bytes.count == layout.sizes[i] else {
                    throw UsageError("GGUF tensor '\(tensors[i].name)': \(bytes.count) bytes, expected \(layout.sizes[i])")
                }
                if layout.offsets[i] > written { try file.write([UInt8](repeating: 0, count: layout.offsets[i] - written)) }
                try file.write(bytes)
                written = layout.offsets[i] + bytes.count
            }
            let end = (written + alignment - 1) / alignment * alignment
            if end > written { try file.write([UInt8](repeating: 0, count: end - written)) }
        }
    }

    /// The header, tensor infos and padding up to the data section; each tensor's offset in the data section and its size.
    static func header(metadata: [(key: String, value: GGUFValue)], tensors: [(name: String, type: GGMLType, dimensions: [Int])],
                       alignment: Int, version: UInt32) throws -> (bytes: [UInt8], offsets: [Int], sizes: [Int]) {
        precondition(alignment > 0 && alignment & (alignment - 1) == 0, "alignment must be a power of two")
        var metadata = metadata
        if alignment != GGUFFile.defaultAlignment && !metadata.contains(where: { $0.key == "general.alignment" }) {
            metadata.append(("general.alignment", .uint32(UInt32(alignment))))
        }
        var out: [UInt8] = []
        out += GGUFFile.magic
        append(version, to: &out)
        append(UInt64(tensors.count), to: &out)
        append(UInt64(metadata.count), to: &out)
        for (key, value) in metadata {
            appendString(key, to: &out)
            append(value.type.rawValue, to: &out)
            try appendValue(value, to: &out, key: key)
        }
        var offset = 0
        var offsets: [Int] = [], sizes: [Int] = []
        for t in tensors {
            let elements = t.dimensions.reduce(1, *)
            guard t.dimensions.count >= 1, t.dimensions.count <= GGUFFile.maxDimensions,
                  t.dimensions[0] % t.type.blockSize == 0 else {
                throw UsageError("GGUF tensor '\(t.name)': \(t.type.name) \(t.dimensions) needs ne[0] a multiple of \(t.type.blockSize)")
            }
            appendString(t.name, to: &out)
            append(UInt32(t.dimensions.count), to: &out)
            for d in t.dimensions { append(UInt64(d), to: &out) }
            append(t.type.rawValue, to: &out)
            append(UInt64(offset), to: &out)
            offsets.append(offset)
            sizes.append(t.type.byteCount(elements: elements))
            offset = (offset + sizes.last! + alignment - 1) / alignment * alignment
        }
        pad(&out, alignment)
        return (out, offsets, sizes)
    }

    private static func pad(_ out: inout [UInt8], _ alignment: Int) {
        let n = (out.count + alignment - 1) / alignment * alignment - out.count
        out += [UInt8](repeating: 0, count: n)
    }

    private static func append<T: FixedWidthInteger>(_ v: T, to out: inout [UInt8]) {
        withUnsafeBytes(of: v.littleEndian) { out += $0 }
    }

    private static func appendString(_ s: String, to out: inout [UInt8]) {
        append(UInt64(s.utf8.count), to: &out)
        out += Array(s.utf8)
    }

    private static func appendValue(_ value: GGUFValue, to out: inout [UInt8], key: String) throws {
        switch value {
        case .uint8(let v): append(v, to: &out)
        case .int8(let v): append(v, to: &out)
        case .uint16(let v): append(v, to: &out)
        case .int16(let v): append(v, to: &out)
        case .uint32(let v): append(v, to: &out)
        case .int32(let v): append(v, to: &out)
        case .uint64(let v): append(v, to: &out)
        case .int64(let v): append(v, to: &out)
        case .float32(let v): append(v.bitPattern, to: &out)
        case .float64(let v): append(v.bitPattern, to: &out)
        case .bool(let v): out.append(v ? 1 : 0)
        case .string(let s): appendString(s, to: &out)
        case .array(let type, let items):
            append(type.rawValue, to: &out)
            append(UInt64(items.count), to: &out)
            for item in items {
                guard item.type == type else {
                    throw UsageError("GGUF metadata '\(key)': an array of \(type) holds a \(item.type) element")
                }
                try appendValue(item, to: &out, key: key)
            }
        }
    }
}
