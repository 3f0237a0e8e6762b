import XCTest
@testable import QLoRA

/// The task metrics against the reference packages' numbers (Tests/Fixtures/metrics/goldens.json, made by
/// scripts/make_metric_goldens.py with rouge-score and sacrebleu).
final class TextMetricsTests: XCTestCase {
    static let goldens: JSONValue = {
        try! JSONValue.parse(bytes: try! FileSystem.readFile(TestFixtures.path("metrics/goldens.json")))
    }()

    func cases(_ key: String) -> [JSONValue] { Self.goldens[key]?.array ?? [] }
    func strings(_ v: JSONValue?) -> [String] { (v?.array ?? []).map { $0.string! } }

    func assertClose(_ a: Double, _ b: Double, _ message: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertLessThanOrEqual(abs(a - b), 1e-9 * max(1, abs(b)), "\(message): \(a) vs \(b)", file: file, line: line)
    }

    func testRougeTokenizerEqualsRougeScores() {
        let all = cases("rouge_tokens")
        XCTAssertEqual(all.count, 70)
        for c in all { XCTAssertEqual(RougeL.tokens(c["text"]!.string!), strings(c["tokens"]), c["text"]!.string!.debugDescription) }
    }

    func testRougeLEqualsRougeScore() {
        let all = cases("rouge_l")
        XCTAssertGreaterThan(all.count, 50)
        var maxError = 0.0
        for c in all {
            let s = RougeL.score(prediction: c["prediction"]!.string!, references: strings(c["references"]))
            let name = "\(c["prediction"]!.string!.debugDescription) vs \(strings(c["references"]))"
            assertClose(s.precision, c["precision"]!.double!, name + " precision")
            assertClose(s.recall, c["recall"]!.double!, name + " recall")
            assertClose(s.fmeasure, c["fmeasure"]!.double!, name + " F")
            maxError = max(maxError, abs(s.fmeasure - c["fmeasure"]!.double!))
        }
        XCTAssertEqual(maxError, 0, "ROUGE-L F is computed in the same order as rouge-score: bit-identical")
    }

    func testThe13aTokenizerEqualsSacrebleus() {
        for c in cases("bleu_13a") {
            XCTAssertEqual(SacreBLEU.tokenize13a(c["text"]!.string!).unicodeScalars.map(\.value),
                           c["tokenized"]!.string!.unicodeScalars.map(\.value), c["text"]!.string!.debugDescription)
        }
    }

    func testCorpusBLEUEqualsSacrebleu() {
        let all = cases("bleu_corpus")
        XCTAssertGreaterThan(all.count, 25)
        for c in all {
            let references = (c["references"]!.array!).map { strings($0) }
            let s = SacreBLEU.corpusScore(hypotheses: strings(c["hypotheses"]), references: references)
            let name = "\(strings(c["hypotheses"]))"
            assertClose(s.score, c["score"]!.double!, name)
            XCTAssertEqual(s.counts, c["counts"]!.array!.map { $0.int! }, name)
            XCTAssertEqual(s.totals, c["totals"]!.array!.map { $0.int! }, name)
            XCTAssertEqual(s.hypothesisLength, c["sys_len"]!.int!, name)
            XCTAssertEqual(s.referenceLength, c["ref_len"]!.int!, name)
            assertClose(s.brevityPenalty, c["bp"]!.double!, name + " bp")
            for (a, b) in zip(s.precisions, c["precisions"]!.array!.map { $0.double! }) { assertClose(a, b, name + " precision") }
        }
    }

    func testSentenceBLEUEqualsSacrebleu() {
        for c in cases("bleu_sentence") {
            let s = SacreBLEU.sentenceScore(hypothesis: c["hypothesis"]!.string!, references: strings(c["references"]))
            assertClose(s.score, c["score"]!.double!, c["hypothesis"]!.string!)
            XCTAssertEqual(TaskMetric.bleu.score(prediction: c["hypothesis"]!.string!, references: strings(c["references"])), s.score)
        }
    }

    func testExactMatchStripsPythonWhitespaceAndComparesCodePoints() {
        for c in cases("exact_match") {
            XCTAssertEqual(ExactMatch.score(prediction: c["prediction"]!.string!, references: strings(c["references"])), c["score"]!.double!,
                           c["prediction"]!.string!.debugDescription)
        }
    }

    func testAccuracyLabelAndNormalisation() {
        let all = cases("accuracy")
        XCTAssertGreaterThan(all.count, 30)
        for c in all {
            let prediction = c["prediction"]!.string!
            XCTAssertEqual(LabelAccuracy.label(of: prediction), c["label"]!.string!, prediction.debugDescription)
            XCTAssertEqual(LabelAccuracy.normalize(c["label"]!.string!).unicodeScalars.map(\.value),
                           c["normalized_label"]!.string!.unicodeScalars.map(\.value), prediction.debugDescription)
            XCTAssertEqual(LabelAccuracy.score(prediction: prediction, references: strings(c["references"])), c["score"]!.double!,
                           prediction.debugDescription)
        }
    }

    /// Means over examples, except BLEU (corpus); names as users type them.
    func testAggregatesAndNames() throws {
        let predictions = ["the cat sat", "Positive.", "x"], references = [["the cat sat on the mat"], ["positive"], ["y"]]
        for metric in TaskMetric.allCases {
            let per = zip(predictions, references).map { metric.score(prediction: $0, references: $1) }
            let value = try XCTUnwrap(metric.aggregate(predictions: predictions, references: references, perExample: per))
            if metric == .bleu {
                XCTAssertEqual(value, SacreBLEU.corpusScore(hypotheses: predictions, references: references).score)
            } else {
                XCTAssertEqual(value, per.reduce(0, +) / 3)
            }
        }
        XCTAssertEqual(TaskMetric.accuracy.aggregate(predictions: ["Positive."], references: [["positive"]], perExample: [1]), 1)
        XCTAssertNil(TaskMetric.rougeL.aggregate(predictions: [], references: [], perExample: []))
        XCTAssertEqual(try TaskMetric.parseList("exact_match, rougeL,eval_bleu,ACC,bleu", option: "--metric"), [.exactMatch, .rougeL, .bleu, .accuracy])
        XCTAssertThrowsError(try TaskMetric.parseList("rouge_l,meteor", option: "--metric")) {
            XCTAssertEqual("\($0)", "--metric: unknown metric 'meteor'; expected exact_match, rouge_l, bleu, accuracy")
        }
    }

    func testSHA256EqualsHashlib() throws {
        for c in cases("sha256") { XCTAssertEqual(SHA256.hex(of: Array(c["text"]!.string!.utf8)), c["hex"]!.string!) }
        // Fed in uneven pieces, the same digest.
        var h = SHA256()
        let text = Array(String(repeating: "a", count: 1000).utf8)
        h.update(text[..<7]); h.update(text[7..<700]); h.update(text[700...])
        XCTAssertEqual(SHA256.hex(h.finalize()), cases("sha256")[2]["hex"]!.string!)
        let file = try XCTUnwrap(Self.goldens["sha256_file"])
        let described = try SHA256.file(TestFixtures.path(file["path"]!.string!))
        XCTAssertEqual(described.hex, file["hex"]!.string!)
        XCTAssertEqual(described.bytes, file["bytes"]!.int!)
        XCTAssertEqual(described.lines, file["lines"]!.int!)
    }
}
