import XCTest
@testable import QLoRA

final class SubprocessTests: XCTestCase {
    func testExitStatus() throws {
        XCTAssertEqual(try Subprocess.run(["sh", "-c", "exit 0"]), 0)
        XCTAssertEqual(try Subprocess.run(["sh", "-c", "exit 3"]), 3)
        XCTAssertEqual(try Subprocess.run(["sh", "-c", "kill -9 $$"]), 128 + 9)
    }

    func testArgumentsArePassedVerbatim() throws {
        let dir = try TestFixtures.temporaryDirectory()
        let path = dir + "/out.txt"
        XCTAssertEqual(try Subprocess.run(["sh", "-c", "printf '%s|' \"$@\" > \"$0\"", path, "a b", "", "ü'\""]), 0)
        XCTAssertEqual(try FileSystem.readText(path), "a b||ü'\"|")
    }

    func testMissingProgramIsAnError() {
        XCTAssertThrowsError(try Subprocess.run(["qlora-no-such-program-xyz"])) { error in
            XCTAssertTrue("\(error)".contains("qlora-no-such-program-xyz"), "\(error)")
        }
    }
}
