// Token embedding lookup.

extension CPUReference {
    /// out[t] = table[ids[t]] ([vocab, dim] table); ids outside the table give zero rows (as the kernel does).
    public static func embedding(ids: [Int32], table: [Float], vocab: Int, dim: Int) -> [Float] {
        var out = [Float](repeating: 0, count: ids.count * dim)
        for (t, id) in ids.enumerated() where id >= 0 && Int(id) < vocab {
            for i in 0..<dim { out[t * dim + i] = table[Int(id) * dim + i] }
        }
        return out
    }
}
