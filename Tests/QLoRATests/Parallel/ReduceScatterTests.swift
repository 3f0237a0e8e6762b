import XCTest
@testable import QLoRA

/// `reduceScatter`: each rank receives its part of the sum over the ranks, added in rank order, so that the part is
/// the same bits as that part of `allReduce`'s result (ZeRO-style adapter sharding relies on it to equal the
/// all-reducing run). The values are chosen so that another order of addition gives other bits.
final class ReduceScatterTests: XCTestCase {
    /// Rank r's buffer of `world` parts of `part` values: large and small magnitudes mixed, so that float addition
    /// is not associative on them.
    static func values(rank r: Int, world: Int, part: Int) -> [Float] {
        (0..<(world * part)).map { i in
            let big: Float = (i + r) % 3 == 0 ? 1e8 : -3e7
            return (r % 2 == 0 ? big : -big) + Float(i + 1) * 0.37 + Float(r) * 1.1e-3
        }
    }

    /// The sum of part `rank` in rank order, (((v₀ + v₁) + v₂) + …), and its mean.
    static func expected(rank: Int, world: Int, part: Int, average: Bool) -> [Float] {
        let all = (0..<world).map { values(rank: $0, world: world, part: part) }
        return (0..<part).map { j in
            let i = rank * part + j
            var sum = all[0][i]
            for r in 1..<world { sum += all[r][i] }
            return average ? sum / Float(world) : sum
        }
    }

    func check(_ collective: Collective, part: Int) throws -> (sum: [UInt32], mean: [UInt32], allReducedPart: [UInt32]) {
        let w = collective.worldSize, r = collective.rank
        let mine = Self.values(rank: r, world: w, part: part)
        let sum = try collective.reduceScatter(mine, .sum)
        let mean = try collective.reduceScatter(mine, .average)
        var whole = mine
        try collective.allReduce(&whole, .sum)
        return (sum.map(\.bitPattern), mean.map(\.bitPattern), Array(whole[(r * part)..<((r + 1) * part)]).map(\.bitPattern))
    }

    func testThreadWorldsOfOneToFourRanks() throws {
        for world in 1...4 {
            for part in [1, 7] {
                let results = try ThreadWorld.run(size: world) { try self.check($0, part: part) }
                for (rank, result) in results.enumerated() {
                    XCTAssertEqual(result.sum, Self.expected(rank: rank, world: world, part: part, average: false).map(\.bitPattern),
                                   "world \(world), rank \(rank), part \(part)")
                    XCTAssertEqual(result.mean, Self.expected(rank: rank, world: world, part: part, average: true).map(\.bitPattern))
                    XCTAssertEqual(result.sum, result.allReducedPart, "the part of allReduce's result, bit for bit")
                }
            }
        }
        // The values are order-sensitive: adding the ranks the other way round gives other bits somewhere.
        let all = (0..<3).map { Self.values(rank: $0, world: 3, part: 7) }
        let forward = (0..<21).map { (all[0][$0] + all[1][$0]) + all[2][$0] }
        let backward = (0..<21).map { (all[2][$0] + all[1][$0]) + all[0][$0] }
        XCTAssertNotEqual(forward.map(\.bitPattern), backward.map(\.bitPattern))
    }

    func testLocalCollectiveKeepsItsOnlyPart() throws {
        let values: [Float] = [1, 2.5, -3]
        XCTAssertEqual(try LocalCollective().reduceScatter(values), values)
    }

    func testSocketsGiveTheThreadWorldsBits() throws {
        let port = try Launcher.freePort()
        let results = try ThreadWorld.run(size: 3) { thread in
            try self.check(try SocketCollective(rank: thread.rank, worldSize: 3, host: "127.0.0.1", port: port, timeout: 20), part: 5)
        }
        for (rank, result) in results.enumerated() {
            XCTAssertEqual(result.sum, Self.expected(rank: rank, world: 3, part: 5, average: false).map(\.bitPattern), "rank \(rank)")
            XCTAssertEqual(result.mean, Self.expected(rank: rank, world: 3, part: 5, average: true).map(\.bitPattern))
            XCTAssertEqual(result.sum, result.allReducedPart)
        }
    }

    func testPartsThatDoNotAddUpAreAnError() {
        XCTAssertThrowsError(try ThreadWorld.run(size: 2) { collective -> Int in
            var shard = [Float](repeating: 0, count: 2)
            try [Float](repeating: 1, count: 5).withUnsafeBufferPointer { v in
                try shard.withUnsafeMutableBufferPointer { try collective.reduceScatter(v, into: $0, .sum) }
            }
            return 0
        }) { error in XCTAssertTrue("\(error)".contains("reduceScatter") && "\(error)".contains("expected 4"), "\(error)") }
        XCTAssertThrowsError(try ThreadWorld.run(size: 2) { collective -> Int in
            // Ranks that disagree on the count: a clear error, not a read past a shorter buffer.
            _ = try collective.reduceScatter([Float](repeating: 1, count: collective.rank == 0 ? 4 : 6))
            return 0
        }) { error in XCTAssertTrue("\(error)".contains("reduceScatter") && "\(error)".contains("different sizes"), "\(error)") }
    }
}
