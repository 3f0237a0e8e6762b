import XCTest
@testable import QLoRA

final class LearningRateScheduleTests: XCTestCase {
    /// Every rate equals transformers' lr_lambda times the base rate, evaluated in Python (schedules.json).
    func testMatchesTransformersExactly() throws {
        let json = try JSONValue.parse(bytes: try FileSystem.readFile(TestFixtures.path("optimizers/schedules.json")))
        let cases = try XCTUnwrap(json["cases"]?.array)
        XCTAssertEqual(cases.count, 20)
        for c in cases {
            let kind = try ScheduleKind.parse(try XCTUnwrap(c["kind"]?.string))
            let total = try XCTUnwrap(c["total"]?.int)
            let schedule = try LearningRateSchedule(kind: kind, baseLearningRate: try XCTUnwrap(c["base_lr"]?.double),
                                                    trainingSteps: total, warmupSteps: c["warmup_steps"]?.int ?? 0,
                                                    warmupRatio: c["warmup_ratio"]?.double ?? 0)
            XCTAssertEqual(schedule.warmupSteps, c["resolved_warmup"]?.int, "\(kind) total \(total)")
            let expected = try XCTUnwrap(c["lrs"]?.array).compactMap(\.double)
            XCTAssertEqual(expected.count, total + 3)
            for (s, lr) in expected.enumerated() {
                XCTAssertEqual(schedule.learningRate(atStep: s), lr, "\(kind) total \(total) warmup \(schedule.warmupSteps) step \(s)")
            }
        }
    }

    func testShapes() throws {
        let cosine = try LearningRateSchedule(kind: .cosine, baseLearningRate: 1e-3, trainingSteps: 100, warmupRatio: 0.1)
        XCTAssertEqual(cosine.warmupSteps, 10)
        XCTAssertEqual(cosine.learningRate(atStep: 0), 0)
        XCTAssertEqual(cosine.learningRate(atStep: 5), 5e-4)
        XCTAssertEqual(cosine.learningRate(atStep: 10), 1e-3)
        XCTAssertEqual(cosine.learningRate(atStep: 100), 0, accuracy: 1e-18)
        XCTAssertEqual(try LearningRateSchedule(kind: .linear, baseLearningRate: 1, trainingSteps: 10).learningRate(atStep: 5), 0.5)
        XCTAssertEqual(try LearningRateSchedule(kind: .constant, baseLearningRate: 1, trainingSteps: 10, warmupSteps: 5).learningRate(atStep: 0), 1)
        XCTAssertEqual(try LearningRateSchedule(kind: .constantWithWarmup, baseLearningRate: 1, trainingSteps: 10, warmupSteps: 4).learningRate(atStep: 1), 0.25)
        XCTAssertThrowsError(try ScheduleKind.parse("polynomial"))
        XCTAssertThrowsError(try LearningRateSchedule(kind: .linear, baseLearningRate: 1, trainingSteps: 10, warmupRatio: 1.5))
    }
}

final class GradientClippingTests: XCTestCase {
    func testMatchesTorchClipGradNorm() throws {
        let file = try SafeTensorsFile(path: TestFixtures.path("optimizers/clip.safetensors"))
        let norms = try XCTUnwrap(JSONValue.parse(file.metadata["total_norm"] ?? "").array).compactMap(\.double)
        for (k, maxNorm) in [1.0, 1000.0].enumerated() {
            var grads = try (0..<3).map { try file.floats("grad\($0)") }
            let total = GradientClipping.clip(&grads, maxNorm: maxNorm)
            XCTAssertEqual(total, norms[k], accuracy: norms[k] * 1e-6)
            for i in 0..<3 {
                XCTAssertLessThan(relativeError(grads[i], try file.floats("clipped\(Int(maxNorm)).grad\(i)")), 1e-6, "max norm \(maxNorm) grad \(i)")
            }
        }
    }

    func testPointerFormAndHelpers() {
        var a: [Float] = [3, 0], b: [Float] = [0, 4]
        let total = a.withUnsafeMutableBufferPointer { pa in
            b.withUnsafeMutableBufferPointer { pb in GradientClipping.clip([pa, pb], maxNorm: 1) }
        }
        XCTAssertEqual(total, 5)
        XCTAssertEqual(a[0], Float(3 / (5 + 1e-6)), accuracy: 1e-7)
        XCTAssertEqual(b[1], Float(4 / (5 + 1e-6)), accuracy: 1e-7)

        var acc: [Float] = [1, 2, 3]
        let micro: [Float] = [1, 1, 1]
        acc.withUnsafeMutableBufferPointer { dst in
            micro.withUnsafeBufferPointer { GradientClipping.accumulate($0, into: dst, scale: 0.5) }
            GradientClipping.scale(dst, by: 2)
        }
        XCTAssertEqual(acc, [3, 5, 7])
        acc.withUnsafeMutableBufferPointer { GradientClipping.zero($0) }
        XCTAssertEqual(acc, [0, 0, 0])

        var bad: [[Float]] = [[.nan, 1]]
        XCTAssertTrue(GradientClipping.clip(&bad, maxNorm: 1).isNaN)
        XCTAssertEqual(bad[0][1], 1, "a non-finite norm leaves gradients as they are")
    }

    /// A step skipped by the fp16 loss scaler does not advance the schedule (accelerate steps its scheduler only when
    /// the optimizer stepped): with skips at steps 2, 3 and 7, each step's rate is the rate of the updates taken before it.
    func testSkippedStepsHoldTheScheduleBack() throws {
        let schedule = try LearningRateSchedule(kind: .linear, baseLearningRate: 1, trainingSteps: 10)
        let skipped: Set<Int> = [2, 3, 7]
        var taken = 0, skippedSoFar = 0
        for step in 0..<10 {
            let rate = schedule.learningRate(atStep: Trainer.schedulerStep(trainerStep: step, skippedSteps: skippedSoFar))
            XCTAssertEqual(rate, schedule.learningRate(atStep: taken), "step \(step)")
            if skipped.contains(step) { skippedSoFar += 1 } else { taken += 1 }
        }
        XCTAssertEqual(Trainer.schedulerStep(trainerStep: 4, skippedSteps: 2), 2)
        XCTAssertEqual(schedule.learningRate(atStep: Trainer.schedulerStep(trainerStep: 9, skippedSteps: 3)), 0.4, accuracy: 1e-6)
    }
}
