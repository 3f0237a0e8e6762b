import XCTest
@testable import QLoRA

/// Values interpolated into error messages read as the file wrote them, never as Swift's enum dump.
final class ValueDescriptionTests: XCTestCase {
    func testJSONValuesReadAsJSON() {
        XCTAssertEqual("\(JSONValue.int(-128))", "-128")
        XCTAssertEqual("got \(JSONValue.string("a\"b"))", #"got "a\"b""#)
        XCTAssertEqual("\(JSONValue.array([.int(1), .null, .bool(true)]))", "[1,null,true]")
        XCTAssertFalse("\(JSONValue.array((0..<1000).map { .int(Int64($0)) }))".count > 210, "long values are cut")
        XCTAssertEqual("\(Optional(JSONValue.double(0.5))!)", "0.5")
    }

    func testGGUFValuesReadAsValues() {
        XCTAssertEqual("\(GGUFValue.int32(-128))", "-128")
        XCTAssertEqual("\(GGUFValue.string("llama"))", "\"llama\"")
        XCTAssertEqual("\(GGUFValue.array(.uint32, (0..<10).map { .uint32($0) }))", "[0, 1, 2, 3, 4, 5, 6, 7, ... (10 uint32 values)]")
    }
}
