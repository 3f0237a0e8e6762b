import XCTest
@testable import QLoRA

/// The text readers (chat templates, JSONL datasets, YAML training configs) on mutated fixtures and token soup:
/// each case is a clear error or a result that holds together; never a crash.
final class TextReadersFuzzTests: XCTestCase {
    static let conversation: [JSONValue] = [
        .object(JSONObject([("role", .string("system")), ("content", .string("Be brief."))])),
        .object(JSONObject([("role", .string("user")), ("content", .string("Hi \u{1F600}"))])),
        .object(JSONObject([("role", .string("assistant")), ("content", .string("Hello."))])),
        .object(JSONObject([("role", .string("user")), ("content", .string("2 + 2?"))])),
    ]

    /// Pieces of Jinja for token soup. Numbers stay small and there is no `**`, so loops over `range` and repeated
    /// strings stay short (the interpreter's step and size budgets are tested with the CLI); the Int.min literals
    /// check overflow handling.
    static let soup: [String] = [
        "{{", "}}", "{%", "%}", "{#", "#}", "{%-", "-%}", " ", "\n", "for", "in", "endfor", "if", "elif", "else", "endif",
        "set", "=", "macro", "endmacro", "call", "endcall", "filter", "endfilter", "raw", "endraw", "messages", "message",
        "loop", "loop.index", ".", "[", "]", "(", ")", ",", ":", "|", "~", "+", "-", "*", "/", "//", "%", "==", "!=",
        "<", ">=", "and", "or", "not", "is", "defined", "none", "None", "true", "'x'", "\"y\"", "''", "0", "1", "2", "3",
        "-1", "2.5", "1e308", "-9223372036854775808", "x", "content",
        "role", "trim", "length", "tojson", "upper", "join", "items", "namespace", "range", "raise_exception",
        "strftime_now", "selectattr", "map", "first", "last", "reverse", "sort", "unique", "default", "string", "int",
        "int(base=1)", "int(base=0)", "int(base=37)", "abs", "float", "list", "dict", "replace", "split", "startswith",
        "'%s'", "'%d'", "format", "indent", "safe", "[1:]", "[::-1]", "[-9223372036854775808]",
        "{{ messages[0]['content'] }}", "{% for m in messages %}", "{% endfor %}", "{% if true %}", "{% endif %}",
        "{{ loop.index }}", "{% set ns = namespace(a=0) %}", "{% set ns.a = ns.a + 1 %}", "{{ ns.a }}",
        "{% for i in range(3) %}", "{{ -x }}", "{% set x = -9223372036854775807 - 1 %}", "\u{1F600}", "\u{e9}",
    ]

    func testMutatedChatTemplatesAndTokenSoupAreClearErrorsOrRender() throws {
        let folder = TestFixtures.path("chat-templates")
        let names = try FileManager.default.contentsOfDirectory(atPath: folder).filter { $0.hasSuffix(".jinja") }.sorted()
        let sources = try names.map { try fixtureBytes("chat-templates/" + $0) }
        XCTAssertGreaterThan(sources.count, 10)
        var fuzzer = Fuzzer(seed: 0x7E3B_1A7E)
        let tally = FuzzTally("chat templates")
        for _ in 0..<Fuzzer.cases(900) {
            let which = fuzzer.int(0..<sources.count)
            var label: String
            var source: String
            switch fuzzer.int(0..<4) {
            case 0, 1:
                let (what, bytes) = fuzzer.mutateBytes(sources[which])
                (label, source) = ("\(names[which]) \(what)", String(decoding: bytes, as: UTF8.self))
            case 2:
                var text = Array(String(decoding: sources[which], as: UTF8.self).unicodeScalars)
                let at = fuzzer.int(0..<(text.count + 1))
                let pieces = (0..<fuzzer.int(1..<7)).map { _ in fuzzer.pick(Self.soup) }
                text.insert(contentsOf: pieces.joined(separator: fuzzer.chance(0.5) ? " " : "").unicodeScalars, at: at)
                label = "\(names[which]) insert \(pieces) at \(at)"
                var s = ""
                s.unicodeScalars.append(contentsOf: text)
                source = s
            default:
                let pieces = (0..<fuzzer.int(3..<40)).map { _ in fuzzer.pick(Self.soup) }
                source = pieces.joined(separator: fuzzer.chance(0.5) ? " " : "")
                label = "soup \(source.debugDescription)"
            }
            let generationPrompt = fuzzer.chance(0.5)
            tally.run(label) {
                var template = try ChatTemplate(source: source)
                template.fixedNow = 0
                _ = try template.render(messages: Self.conversation, addGenerationPrompt: generationPrompt,
                                        bosToken: "<s>", eosToken: "</s>")
            }
        }
        tally.finish()
    }

    func testMutatedJSONLDatasetsAreClearErrorsOrConsistentExamples() throws {
        let tokenizer = try Tokenizer(directory: TestFixtures.path("bytelevel-bpe/gpt2"))
        let template = try ChatTemplate(source: String(decoding: try fixtureBytes("smollm2-tokenizer/chat_template.jinja"), as: UTF8.self))
        let lines: [String] = [
            #"{"text": "The quick brown fox."}"#,
            #"{"prompt": "2 + 2 =", "completion": " 4"}"#,
            #"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#,
            #"{"instruction": "Add.", "input": "2 and 2", "output": "4"}"#,
            #"{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}"#,
            #"{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}"#,
        ]
        let documents = try lines.map { try JSONValue.parse($0) }
        var fuzzer = Fuzzer(seed: 0xDA7A_5E7)
        let tally = FuzzTally("JSONL datasets")
        for _ in 0..<Fuzzer.cases(700) {
            var rows = lines
            var label: String
            switch fuzzer.int(0..<4) {
            case 0, 1:
                let k = fuzzer.int(0..<rows.count)
                let (what, edited) = fuzzer.mutateJSON(documents[k])
                rows[k] = edited.serialized()
                label = "line \(k + 1) \(what)"
            case 2:
                let (what, bytes) = fuzzer.mutateBytes(Array(lines.joined(separator: "\n").utf8))
                rows = [String(decoding: bytes, as: UTF8.self)]
                label = what
            default:
                let variants = ["\r\n", "\n\n", "\r", "\n   \n"]
                let separator = fuzzer.pick(variants)
                rows = [(fuzzer.chance(0.5) ? "\u{FEFF}" : "") + lines.joined(separator: separator)]
                label = "lines joined by \(separator.debugDescription)"
            }
            let formatting = SFTFormatting(completionOnly: fuzzer.chance(0.5), maxSequenceLength: fuzzer.pick([2, 8, 64, 1024]),
                                           skipBadLines: fuzzer.chance(0.3))
            let text = rows.joined(separator: "\n")
            tally.run(label) {
                let dataset = try SFTDataset(jsonl: text, source: "data.jsonl", tokenizer: tokenizer, template: template, formatting: formatting)
                for example in dataset.examples {
                    XCTAssertEqual(example.tokens.count, example.labels.count, label)
                    XCTAssertLessThanOrEqual(example.tokens.count, formatting.maxSequenceLength, label)
                    XCTAssertTrue(example.tokens.allSatisfy { $0 >= 0 && $0 < tokenizer.vocabularySize }, label)
                }
            }
        }
        tally.finish()
    }

    func testMutatedYAMLTrainingConfigsAreClearErrorsOrValidSettings() throws {
        let original = """
        # a training configuration
        model: smollm2-135m
        quantize: nf4
        dataset:
          - a.jsonl
          - "b.jsonl"
        eval_split: 0.1
        max_seq_length: 512
        packing: true
        lora_r: 8
        lora_alpha: 16
        lora_dropout: 0.05
        target_modules: [q_proj, v_proj, 'o_proj']
        per_device_train_batch_size: 2
        gradient_accumulation_steps: 4
        num_train_epochs: 1
        learning_rate: 2e-4   # inline comment
        warmup_ratio: 0.03
        lr_scheduler_type: "cosine"
        weight_decay: 0.0
        max_grad_norm: 1.0
        optim: adamw
        seed: 42
        logging_steps: 10
        save_steps: 100
        output_dir: runs/x
        """
        let values = ["-1", "0", "1e400", "-1e400", "9223372036854775808", "-9223372036854775809", "nan", ".inf", "[", "]",
                      "[a, [b]]", "[]", "\"unterminated", "'", "''", "null", "~", "yes", "off", "x: y", "- item", "#", "0x10",
                      "1_000", "\t", "\u{1F600}", "true", "3.5", "\"42\""]
        var fuzzer = Fuzzer(seed: 0x9A41_C0F)
        let tally = FuzzTally("YAML training configs")
        var lines = original.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        lines.removeAll { $0.isEmpty }
        for _ in 0..<Fuzzer.cases(700) {
            var edited = lines
            var label: String
            switch fuzzer.int(0..<5) {
            case 0, 1:
                let k = fuzzer.int(0..<edited.count)
                let value = fuzzer.pick(values)
                if let colon = edited[k].firstIndex(of: ":") {
                    edited[k] = String(edited[k][...colon]) + " " + value
                } else {
                    edited[k] = "  - " + value
                }
                label = "line \(k + 1) value \(value.debugDescription)"
            case 2:
                let k = fuzzer.int(0..<edited.count)
                switch fuzzer.int(0..<3) {
                case 0: edited.remove(at: k); label = "delete line \(k + 1)"
                case 1: edited.insert(edited[k], at: k); label = "repeat line \(k + 1)"
                default: edited[k] = "  " + edited[k]; label = "indent line \(k + 1)"
                }
            default:
                let (what, bytes) = fuzzer.mutateBytes(Array(lines.joined(separator: "\n").utf8))
                edited = [String(decoding: bytes, as: UTF8.self)]
                label = what
            }
            let text = edited.joined(separator: "\n")
            tally.run(label) {
                var configuration = TrainingConfiguration()
                try configuration.apply(try SimpleYAML.parse(text, file: "train.yaml"), file: "train.yaml")
                try configuration.validate()
                XCTAssertGreaterThan(configuration.loraR, 0)
                XCTAssertGreaterThan(configuration.batchSize, 0)
            }
        }
        tally.finish()
    }
}
