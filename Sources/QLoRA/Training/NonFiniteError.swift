// Training numerics: a NaN or infinite loss, gradient norm or adapter weight stops the run where it appears,
// before anything non-finite reaches the optimizer state or a saved adapter.

/// A loss, gradient norm or weight that became NaN or infinite: training or evaluation stops there.
public struct NonFiniteError: Error, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }

    /// "nan", "inf" or "-inf" (Swift prints a NaN with its sign bit set as "-nan").
    static func name(_ value: Double) -> String { value.isNaN ? "nan" : value > 0 ? "inf" : "-inf" }
}

extension DecoderModel {
    /// The first adapter matrix holding a NaN or infinite value, if any.
    func firstNonFiniteAdapter() -> String? {
        for layer in linearLayers {
            guard let lora = layer.lora else { continue }
            if !lora.a.storage.allSatisfy(\.isFinite) { return layer.name + ".lora_A.weight" }
            if !lora.b.storage.allSatisfy(\.isFinite) { return layer.name + ".lora_B.weight" }
        }
        return nil
    }
}
