// The pieces of a SentencePiece `tokenizer.model`: what llama.cpp's converter reads from it for a GGUF vocabulary.
//
// The file is a protobuf ModelProto. Only field 1 is read, the repeated pieces:
//   message ModelProto  { repeated SentencePiece pieces = 1; TrainerSpec trainer_spec = 2; NormalizerSpec ... = 3; ... }
//   message SentencePiece { string piece = 1; float score = 2; Type type = 3 [default = NORMAL]; }
//   enum Type { NORMAL = 1; UNKNOWN = 2; CONTROL = 3; USER_DEFINED = 4; UNUSED = 5; BYTE = 6; }
// Wire format: each field is a varint key (field number << 3 | wire type) followed by a varint (type 0), 8 bytes
// (type 1), a varint length and that many bytes (type 2), or 4 bytes (type 5); the rest of the file is skipped field
// by field. Every length is checked against the bytes left before it is used.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The pieces of a SentencePiece model file, in id order.
public struct SentencePieceModel: Sendable {
    public enum PieceType: Int, Sendable { case normal = 1, unknown = 2, control = 3, userDefined = 4, unused = 5, byte = 6 }

    public struct Piece: Sendable, Equatable {
        public var text: String
        public var score: Float
        public var type: PieceType
    }

    public let pieces: [Piece]

    public init(path: String) throws {
        try self.init(bytes: try FileSystem.readFile(path), file: path)
    }

    public init(bytes: [UInt8], file: String) throws {
        var reader = ProtoReader(bytes: bytes[...], file: file, message: "ModelProto")
        var pieces: [Piece] = []
        while let (field, wire) = try reader.nextKey() {
            guard field == 1 else { try reader.skip(wire); continue }
            let place = "ModelProto.pieces[\(pieces.count)]"
            guard wire == 2 else { throw reader.error("\(place): expected a length-delimited message (wire type 2), got wire type \(wire)") }
            pieces.append(try Self.piece(reader.lengthDelimited(), file: file, place: place))
        }
        guard !pieces.isEmpty else { throw FileFormatError(file: file, place: "ModelProto", "no pieces (is this a SentencePiece model?)") }
        self.pieces = pieces
    }

    static func piece(_ bytes: ArraySlice<UInt8>, file: String, place: String) throws -> Piece {
        var reader = ProtoReader(bytes: bytes, file: file, message: place)
        var text: String?, score: Float = 0, type = PieceType.normal
        while let (field, wire) = try reader.nextKey() {
            switch (field, wire) {
            case (1, 2):
                let raw = try reader.lengthDelimited()
                guard let s = String(validating: raw, as: UTF8.self) else { throw reader.error("\(place).piece: not valid UTF-8") }
                text = s
            case (2, 5):
                score = Float(bitPattern: try reader.fixed32())
            case (3, 0):
                let raw = try reader.varint()
                guard let t = PieceType(rawValue: Int(truncatingIfNeeded: raw)), raw <= 6 else {
                    throw reader.error("\(place).type: \(raw) is not a piece type (expected 1...6)")
                }
                type = t
            case (1, _), (2, _), (3, _):
                throw reader.error("\(place): field \(field) has wire type \(wire), expected \(field == 1 ? 2 : field == 2 ? 5 : 0)")
            default:
                try reader.skip(wire)
            }
        }
        guard let text else { throw FileFormatError(file: file, place: place, "the piece has no text (field 1)") }
        return Piece(text: text, score: score, type: type)
    }
}

/// A bounds-checked reader of protobuf wire format over one message's bytes.
struct ProtoReader {
    var bytes: ArraySlice<UInt8>
    let file: String
    let message: String

    func error(_ text: String) -> FileFormatError {
        FileFormatError(file: file, place: "\(message), byte \(bytes.startIndex)", text)
    }

    /// The next field's number and wire type; nil at the end of the message.
    mutating func nextKey() throws -> (Int, Int)? {
        guard !bytes.isEmpty else { return nil }
        let key = try varint()
        let field = key >> 3
        guard field > 0, field < 1 << 29 else { throw error("field number \(field) is out of range") }
        return (Int(field), Int(key & 7))
    }

    mutating func varint() throws -> UInt64 {
        var value: UInt64 = 0
        for shift in stride(from: 0, to: 64, by: 7) {
            guard let byte = bytes.first else { throw error("the file ends inside a varint") }
            bytes = bytes.dropFirst()
            value |= UInt64(byte & 0x7f) << UInt64(shift)
            if byte & 0x80 == 0 { return value }
        }
        throw error("a varint longer than 10 bytes")
    }

    mutating func take(_ count: Int) throws -> ArraySlice<UInt8> {
        guard count >= 0, count <= bytes.count else {
            throw error("expected \(count) more bytes, only \(bytes.count) left")
        }
        let part = bytes.prefix(count)
        bytes = bytes.dropFirst(count)
        return part
    }

    mutating func lengthDelimited() throws -> ArraySlice<UInt8> {
        let length = try varint()
        guard length <= UInt64(bytes.count) else { throw error("a field of \(length) bytes, only \(bytes.count) left") }
        return try take(Int(length))
    }

    mutating func fixed32() throws -> UInt32 {
        let b = try take(4)
        return b.reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
    }

    mutating func skip(_ wire: Int) throws {
        switch wire {
        case 0: _ = try varint()
        case 1: _ = try take(8)
        case 2: _ = try lengthDelimited()
        case 5: _ = try take(4)
        default: throw error("wire type \(wire) is not one this reader knows (expected 0, 1, 2 or 5)")
        }
    }
}
