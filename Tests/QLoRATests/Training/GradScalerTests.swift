import XCTest
@testable import QLoRA

/// GradScaler against torch.amp.GradScaler's own numbers (Tests/Fixtures/grad-scaler, scripts/make_grad_scaler_fixture.py).
final class GradScalerTests: XCTestCase {
    func testScalesAndSkippedStepsEqualTorch() throws {
        let json = try fixtureJSON("grad-scaler/sequences.json")
        let cases = try XCTUnwrap(json["cases"]?.array)
        XCTAssertEqual(cases.count, 4)
        for c in cases {
            let name = c["name"]?.string ?? "?"
            var scaler = GradScaler(initialScale: Float(try XCTUnwrap(c["init_scale"]?.double)),
                                    growthFactor: Float(try XCTUnwrap(c["growth_factor"]?.double)),
                                    backoffFactor: Float(try XCTUnwrap(c["backoff_factor"]?.double)),
                                    growthInterval: try XCTUnwrap(c["growth_interval"]?.int))
            let flags = Array(try XCTUnwrap(c["flags"]?.string)).map { $0 == "1" }
            let scales = try XCTUnwrap(c["scales"]?.array).compactMap(\.double)
            let stepped = Array(try XCTUnwrap(c["stepped"]?.string)).map { $0 == "1" }
            let trackers = try XCTUnwrap(c["growth_trackers"]?.array).compactMap(\.int)
            XCTAssertEqual(scales.count, flags.count, name)
            var mismatches = 0
            for (k, found) in flags.enumerated() {
                let taken = scaler.update(foundInf: found)
                if taken != stepped[k] || Double(scaler.scale) != scales[k] || scaler.growthTracker != trackers[k] {
                    mismatches += 1
                    if mismatches < 4 { XCTFail("\(name) step \(k): scale \(scaler.scale) vs \(scales[k]), taken \(taken) vs \(stepped[k])") }
                }
            }
            XCTAssertEqual(mismatches, 0, name)
            XCTAssertEqual(scaler.skippedSteps, stepped.filter { !$0 }.count, name)
        }
    }

    func testCollapseAfterSeventeenSkipsFromTheDefaultScale() {
        var scaler = GradScaler()
        for _ in 0..<16 { scaler.update(foundInf: true) }
        XCTAssertFalse(scaler.hasCollapsed)
        XCTAssertEqual(scaler.scale, 1)
        scaler.update(foundInf: true)
        XCTAssertTrue(scaler.hasCollapsed)
        XCTAssertEqual(scaler.consecutiveSkips, 17)
        scaler.update(foundInf: false)
        XCTAssertEqual(scaler.consecutiveSkips, 0)
    }

    func testComputeDTypeChoice() throws {
        XCTAssertEqual(try ComputeDTypeChoice(parsing: "float16"), .fp16)
        XCTAssertEqual(try ComputeDTypeChoice(parsing: "torch.bfloat16"), .bf16)
        XCTAssertEqual(try ComputeDTypeChoice(parsing: "AUTO"), .auto)
        XCTAssertThrowsError(try ComputeDTypeChoice(parsing: "float32"))
        XCTAssertEqual(try ComputeDTypeChoice.auto.resolve(major: 7, minor: 5), .fp16)
        XCTAssertEqual(try ComputeDTypeChoice.auto.resolve(major: 8, minor: 6), .bf16)
        XCTAssertEqual(try ComputeDTypeChoice.fp16.resolve(major: 9, minor: 0), .fp16)
        XCTAssertThrowsError(try ComputeDTypeChoice.bf16.resolve(major: 7, minor: 5)) { error in
            XCTAssertTrue("\(error)".contains("fp16"), "\(error)")
        }
        // fp16 overflows to inf (never clamped); bf16 keeps the value's range.
        XCTAssertEqual(ComputeDType.fp16.round(70000), .infinity)
        XCTAssertEqual(ComputeDType.fp16.round(65504), 65504)
        XCTAssertEqual(ComputeDType.bf16.round(70000), 70144)
        XCTAssertEqual(ComputeDType.fp16.round(1 + 0x1p-11 + 0x1p-20), 1 + 0x1p-10)
    }
}
