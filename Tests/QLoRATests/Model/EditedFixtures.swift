import XCTest
@testable import QLoRA

/// Copies of the tiny-llama fixtures with their JSON and tensors edited, for tests of bad model files.
enum EditedFixtures {
    /// The tensors of a safetensors file as records that can be edited and written back.
    static func records(_ path: String) throws -> [TensorRecord] {
        let file = try SafeTensorsFile(path: path)
        return try file.names.map { name in
            let info = file.info(name)!
            return TensorRecord(name: name, dtype: info.dtype, shape: info.shape, data: Array(try file.bytes(name)))
        }
    }

    /// A copy of `tiny-llama/<folder>` (config.json, model.safetensors) with `config` and `tensors` applied.
    static func tinyLlama(_ folder: String = "base", config: (inout JSONObject) -> Void = { _ in },
                          tensors: (inout [TensorRecord]) throws -> Void = { _ in }, name: String = #function) throws -> String {
        try editedCopy("tiny-llama/" + folder, jsonFile: "config.json", tensorsFile: "model.safetensors", config: config,
                       tensors: tensors, name: name)
    }

    /// A copy of fixture folder `source`'s JSON file and safetensors file, each edited.
    private static func editedCopy(_ source: String, jsonFile: String, tensorsFile: String, config: (inout JSONObject) -> Void,
                                   tensors: (inout [TensorRecord]) throws -> Void, name: String) throws -> String {
        let source = TestFixtures.path(source)
        let dir = try TestFixtures.temporaryDirectory(name)
        var json = try XCTUnwrap(try JSONValue.parse(bytes: FileSystem.readFile(source + "/" + jsonFile)).object)
        config(&json)
        try FileSystem.writeAtomically(dir + "/" + jsonFile, text: JSONValue.object(json).serialized(.init(indent: 2)))
        var list = try records(source + "/" + tensorsFile)
        try tensors(&list)
        try SafeTensorsWriter.write(list, metadata: ["format": "pt"], to: dir + "/" + tensorsFile)
        return dir
    }

    /// Replaces one tensor's values (written as f32) with `edit` applied to them.
    static func editValues(_ list: inout [TensorRecord], _ name: String, _ edit: (inout [Float]) -> Void) throws {
        let i = try XCTUnwrap(list.firstIndex { $0.name == name }, name)
        var values = list[i].floatValues
        edit(&values)
        list[i] = TensorRecord(name: name, floats: values, shape: list[i].shape)
    }

    /// A copy of the tiny-llama adapter with its config and tensors edited.
    static func adapter(config: (inout JSONObject) -> Void = { _ in }, tensors: (inout [TensorRecord]) throws -> Void = { _ in },
                        name: String = #function) throws -> String {
        try editedCopy("tiny-llama/adapter", jsonFile: "adapter_config.json", tensorsFile: "adapter_model.safetensors",
                       config: config, tensors: tensors, name: name)
    }
}

extension TensorRecord {
    /// The values of an f32, bf16 or f16 record.
    var floatValues: [Float] {
        var out = [Float](repeating: 0, count: shape.reduce(1, *))
        data.withUnsafeBytes { raw in out.withUnsafeMutableBufferPointer { convertToFloat(raw, dtype: dtype, into: $0) } }
        return out
    }
}

/// Asserts that `body` throws an error whose text contains every one of `parts`.
func assertRejected<T>(_ body: @autoclosure () throws -> T, _ parts: String..., file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertThrowsError(try body(), file: file, line: line) { error in
        let text = "\(error)"
        for part in parts { XCTAssertTrue(text.contains(part), "'\(part)' not in: \(text)", file: file, line: line) }
    }
}
