import XCTest
@testable import QLoRA

/// The KV cache of sliding-window layers as a ring of the window's rows (Model/DecoderModel.swift `KVCache`): on every
/// family with windows (the fixtures of Tests/Fixtures/families: mistral 6, qwen3 6 on layer 1, gemma2 5 on layer 0,
/// gemma3 5 on layers 0 and 2, phi3 with sliding_window 10, phi3-longrope with sliding_window 6), sequences several
/// windows long give bit for bit the logits of a cache that keeps every position, however the tokens are chunked; the
/// cache holds only the window's rows; and continuous batching (with longrope's switch) answers as one prompt at a time.
final class SlidingWindowCacheTests: XCTestCase {
    /// The models with windows, by name.
    static func models() throws -> [(String, DecoderModel)] {
        var models = try ["mistral", "qwen3", "gemma2", "gemma3_text"].map { ($0, try DecoderFamilyTests.load($0).model) }
        let phi3 = try Phi3Tests.editedBase("phi3", name: "ring") { $0["sliding_window"] = .int(10) }
        models.append(("phi3 window 10", try Phi3Tests.load("phi3", base: phi3)))
        let longrope = try Phi3Tests.editedBase("phi3-longrope", name: "ring") { $0["sliding_window"] = .int(6) }
        models.append(("phi3-longrope window 6", try Phi3Tests.load("phi3-longrope", base: longrope)))
        return models
    }

    /// 44 tokens (7+ windows of 6) in chunks of assorted sizes: one longer than the window, single tokens, a chunk that
    /// ends exactly on a window boundary.
    static let chunks = [9, 1, 1, 3, 6, 1, 12, 1, 1, 2, 5, 1, 1]

    static func tokens(_ count: Int, vocab: Int, seed: UInt64) -> [Int] {
        var r = SeededGenerator(seed: seed)
        return (0..<count).map { _ in Int(r.next() % UInt64(vocab)) }
    }

    /// Feeds `tokens` in `chunks` through `cache`, returning every position's logits.
    static func stepped(_ model: DecoderModel, _ tokens: [Int], chunks: [Int], cache: KVCache) throws -> [Float] {
        var logits: [Float] = [], start = 0
        for n in chunks {
            logits += try model.forward(tokens: Array(tokens[start..<(start + n)]), cache: cache)
            start += n
        }
        return logits
    }

    func testRingCacheGivesTheFullCacheLogitsBitForBit() throws {
        for (name, model) in try Self.models() {
            let c = model.config
            let count = Self.chunks.reduce(0, +)
            let tokens = Self.tokens(count, vocab: c.vocabularySize, seed: 3)
            let ring = KVCache(config: c, capacity: count + 4)
            let full = KVCache(config: c, capacity: count + 4, slidingRing: false)
            XCTAssertTrue(ring.layerRows.contains { $0 < count } && full.layerRows.allSatisfy { $0 == count + 4 }, name)
            let fromRing = try Self.stepped(model, tokens, chunks: Self.chunks, cache: ring)
            let fromFull = try Self.stepped(model, tokens, chunks: Self.chunks, cache: full)
            XCTAssertEqual(fromRing.count, count * c.vocabularySize, name)
            XCTAssertTrue(fromRing == fromFull, "\(name): the ring's logits differ from the full cache's by \(relativeError(fromRing, fromFull))")
            // One prefill of the whole sequence (longer than every window) leaves the ring the right last positions.
            let once = KVCache(config: c, capacity: count + 4), onceFull = KVCache(config: c, capacity: count + 4, slidingRing: false)
            _ = try model.forward(tokens: tokens, cache: once)
            _ = try model.forward(tokens: tokens, cache: onceFull)
            let next = Self.tokens(4, vocab: c.vocabularySize, seed: 4)
            for id in next {
                let a = try model.forward(tokens: [id], cache: once, lastOnly: true)
                let b = try model.forward(tokens: [id], cache: onceFull, lastOnly: true)
                XCTAssertTrue(a == b, "\(name): decoding after a \(count)-token prefill differs by \(relativeError(a, b))")
            }
        }
    }

    /// The ring's results are the model's (not only the full cache's): the one-shot logits of the whole sequence,
    /// which `DecoderFamilyTests` and `Phi3Tests` check against transformers.
    func testRingCacheDecodingEqualsTheOneShotForward() throws {
        for (name, model) in try Self.models() {
            let c = model.config
            let tokens = Self.tokens(40, vocab: c.vocabularySize, seed: 5)
            let oneShot = try model.forward(tokens: tokens, cache: KVCache(config: c, capacity: tokens.count, slidingRing: false))
            let cache = KVCache(config: c, capacity: tokens.count)
            var stepped = try model.forward(tokens: Array(tokens.prefix(8)), cache: cache)
            for id in tokens.dropFirst(8) { stepped += try model.forward(tokens: [id], cache: cache) }
            // longrope: positions up to 16 were computed with the short factors one-shot but are recomputed with the long
            // ones once the sequence passes 16 (as transformers), so compare from there on.
            let from = c.ropeScaling.kind == .longrope ? c.ropeScaling.originalMaxPositionEmbeddings * c.vocabularySize : 0
            XCTAssertLessThan(relativeError(Array(stepped[from...]), Array(oneShot[from...])), 1e-5, name)
        }
    }

    func testSlidingLayersHoldOnlyTheirWindow() throws {
        let models = Dictionary(uniqueKeysWithValues: try Self.models())
        let expected: [String: [Int]] = ["mistral": [6, 6], "qwen3": [200, 6], "gemma2": [5, 200], "gemma3_text": [5, 200, 5],
                                         "phi3 window 10": [10, 10], "phi3-longrope window 6": [6, 6]]
        for (name, rows) in expected {
            let c = try XCTUnwrap(models[name]).config
            let cache = KVCache(config: c, capacity: 200)
            XCTAssertEqual(cache.layerRows, rows, name)
            XCTAssertEqual(cache.keys.map(\.rows), rows, name)
            XCTAssertEqual(cache.values.map(\.rows), rows, name)
            XCTAssertEqual(cache.rowCount, rows.reduce(0, +), name)
            XCTAssertEqual(c.kvCacheBytes(capacity: 200, slots: 3), 3 * 2 * rows.reduce(0, +) * c.kvDim * 2, name)
            // A capacity below the window: every position, no ring.
            XCTAssertEqual(KVCache(config: c, capacity: 4).layerRows, rows.map { _ in 4 }, name)
            XCTAssertEqual(KVCache(config: c, capacity: 200, slidingRing: false).layerRows, rows.map { _ in 200 }, name)
        }
        // Memory stays the window's however long the sequence: 150 tokens through mistral's two rings of 6 rows.
        let mistral = try XCTUnwrap(models["mistral"])
        let cache = KVCache(config: mistral.config, capacity: 200)
        _ = try mistral.forward(tokens: Self.tokens(100, vocab: 128, seed: 6), cache: cache)
        for id in Self.tokens(50, vocab: 128, seed: 7) { _ = try mistral.forward(tokens: [id], cache: cache, lastOnly: true) }
        XCTAssertEqual(cache.length, 150)
        XCTAssertEqual(cache.keys.map(\.count), [6 * mistral.config.kvDim, 6 * mistral.config.kvDim])
    }

    /// Prompts longer than the windows through the CPU's batched session (3 slots, a 20-token prefill budget): the
    /// answers of one prompt at a time. With phi3-longrope (original length 16), answers cross 16 positions: the
    /// scheduler feeds a crossing sequence again from position 0, which the session requires (it refuses to pass 16 on
    /// short-factor keys).
    func testContinuousBatchingWithRingsAndLongropeMatchesOnePromptAtATime() throws {
        for (name, model) in try Self.models() {
            let c = model.config
            let prompts = [Self.tokens(13, vocab: c.vocabularySize, seed: 8), Self.tokens(3, vocab: c.vocabularySize, seed: 9),
                           Self.tokens(21, vocab: c.vocabularySize, seed: 10), Self.tokens(8, vocab: c.vocabularySize, seed: 11),
                           Self.tokens(15, vocab: c.vocabularySize, seed: 12)]
            let greedy = [SamplingOptions](repeating: SamplingOptions(), count: prompts.count)
            let sampled = prompts.indices.map { SamplingOptions(temperature: 1.1, topK: 20, seed: 40 + UInt64($0)) }
            let session = try CPUBatchedSession(model: model, slots: 3, capacity: 40, prefillTokens: 20)
            for sampling in [greedy, sampled] {
                let reference = try zip(prompts, sampling).map {
                    try Generator.generate(model: model, prompt: $0, maxTokens: 14, sampling: $1, stopIDs: [])
                }
                let batched = try BatchScheduler.generate(session: session, prompts: prompts, sampling: sampling, maxTokens: 14, stopIDs: [])
                XCTAssertEqual(batched.answers.map(\.tokens), reference.map(\.tokens), "\(name), temperature \(sampling[0].temperature)")
            }
        }
    }

    func testBatchedSessionRefusesToPassLongropesSwitchOnShortFactorKeys() throws {
        let model = try Phi3Tests.load("phi3-longrope")
        let session = try CPUBatchedSession(model: model, slots: 2, capacity: 30)
        let prompt = Self.tokens(15, vocab: 128, seed: 13)
        try session.step(prompt.enumerated().map { BatchRow(token: $1, slot: 0, position: $0) }, logitRows: [14])
        try session.step([BatchRow(token: 5, slot: 0, position: 15)], logitRows: [0])  // 16 positions: still short
        XCTAssertThrowsError(try session.step([BatchRow(token: 6, slot: 0, position: 16)], logitRows: [0])) { error in
            XCTAssertTrue("\(error)".contains("original_max_position_embeddings (16)"), "\(error)")
        }
        // Fed again from position 0, the 17 tokens rotate with the long factors and go on.
        let all = prompt + [5, 6]
        try session.step(all.enumerated().map { BatchRow(token: $1, slot: 0, position: $0) }, logitRows: [16])
        try session.step([BatchRow(token: 7, slot: 0, position: 17)], logitRows: [0])
        XCTAssertEqual(session.caches[0].length, 18)
        XCTAssertTrue(session.caches[0].usesLongRopeFactors)
        // A slot's rows in two runs of one step are refused (the GPU reads a run's keys from its rows).
        XCTAssertThrowsError(try session.step([BatchRow(token: 1, slot: 1, position: 0), BatchRow(token: 2, slot: 0, position: 18),
                                               BatchRow(token: 3, slot: 1, position: 1)], logitRows: [0]))
    }
}
