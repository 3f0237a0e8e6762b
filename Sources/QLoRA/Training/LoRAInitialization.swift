// Attaching fresh LoRA adapters the way PEFT initialises them.
//
// PEFT's default (`init_lora_weights=True`): A ~ kaiming_uniform(a=√5), which for a [r, in] matrix is
// U(−1/√in, 1/√in) (gain √(2/(1+5)) = √(1/3), bound = √3·gain/√in); B = 0, so the adapted model starts
// equal to the base.

extension DecoderModel {
    /// Attaches adapters to every targeted linear layer. Returns how many layers got one.
    @discardableResult
    public func attachLoRA(_ config: LoRAConfig, seed: UInt64) throws -> Int {
        // A name that matches nothing (a typo, another architecture's name) must not quietly train fewer modules.
        for target in config.targetModules where target != "all-linear" && !linearLayers.contains(where: { LoRAConfig.name(target, matches: $0.name) }) {
            throw UsageError("target_modules: '\(target)' names no linear layer of the model (its projections: \(projectionNames.joined(separator: ", ")))")
        }
        var rng = SeededGenerator(seed: seed)
        var attached = 0
        for layer in linearLayers where config.targets(layer.name) {
            let r = config.rank(for: layer.name)
            let a = Matrix(rows: r, columns: layer.inFeatures)
            let bound = 1 / Float(layer.inFeatures).squareRoot()
            for i in 0..<a.count { a.pointer[i] = (rng.nextFloat() * 2 - 1) * bound }
            let b = Matrix(rows: layer.outFeatures, columns: r)
            layer.lora = LoRAAdapter(a: a, b: b, scale: config.scale(rank: r, alpha: config.alpha(for: layer.name)), dropout: Float(config.dropout))
            attached += 1
        }
        guard attached > 0 else {
            throw UsageError("no linear layer matches target_modules \(config.targetModules) (the model has \(Set(linearLayers.map { $0.name.split(separator: ".").last! }).sorted().joined(separator: ", ")))")
        }
        return attached
    }

    /// Trainable (LoRA) and total parameter counts, as PEFT's `print_trainable_parameters` reports them.
    public var parameterCounts: (trainable: Int, total: Int) {
        let trainable = linearLayers.reduce(0) { $0 + ($1.lora.map { $0.a.count + $0.b.count } ?? 0) }
        return (trainable, config.parameterCount + trainable)
    }
}
