import XCTest
@testable import QLoRA

/// Sampling options out of range are errors naming the option, before anything is allocated.
final class SamplingOptionsTests: XCTestCase {
    func testOutOfRangeOptionsAreRefused() {
        let cases: [(Int, SamplingOptions, String)] = [
            (-5, SamplingOptions(), "max_tokens (--max-tokens) must be a positive integer, got -5"),
            (0, SamplingOptions(), "max_tokens (--max-tokens) must be a positive integer, got 0"),
            (8, SamplingOptions(temperature: -1), "temperature (--temperature) must be a finite number >= 0 (0: greedy), got -1.0"),
            (8, SamplingOptions(temperature: .nan), "temperature (--temperature) must be a finite number >= 0 (0: greedy), got nan"),
            (8, SamplingOptions(topK: -3), "top_k (--top-k) must be a non-negative integer (0: no cut), got -3"),
            (8, SamplingOptions(topP: 2), "top_p (--top-p) must be in (0, 1] (1: no cut), got 2.0"),
            (8, SamplingOptions(topP: 0), "top_p (--top-p) must be in (0, 1] (1: no cut), got 0.0"),
        ]
        for (maxTokens, options, message) in cases {
            XCTAssertThrowsError(try Generator.validate(maxTokens: maxTokens, sampling: options)) { XCTAssertEqual("\($0)", message) }
        }
        XCTAssertNoThrow(try Generator.validate(maxTokens: 1, sampling: SamplingOptions(temperature: 0.7, topK: 50, topP: 0.9)))
    }

    /// The library entry point checks too (a negative count once sized a KV cache of 2^64 bytes).
    func testGenerateWithNegativeMaxTokensIsAnError() throws {
        let model = try LlamaForwardTests.loadTinyLlama()
        XCTAssertThrowsError(try Generator.generate(model: model, prompt: [1, 2], maxTokens: -5, sampling: SamplingOptions(), stopIDs: [])) {
            XCTAssertTrue("\($0)".hasPrefix("max_tokens"), "\($0)")
        }
    }
}
