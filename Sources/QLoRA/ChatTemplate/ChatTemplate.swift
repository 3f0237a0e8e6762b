// Hugging Face chat templates: turn a list of chat messages into the model's prompt text, exactly as
// transformers' `apply_chat_template(..., tokenize=False)` does.
//
// transformers renders the template with jinja2's `ImmutableSandboxedEnvironment(trim_blocks=True,
// lstrip_blocks=True)` plus the `loopcontrols` extension, its own `tojson` filter, and the globals
// `raise_exception` and `strftime_now`, passing `messages`, `tools` (None unless given), `documents`
// (None), `add_generation_prompt` and the tokenizer's special tokens (`bos_token`, `eos_token`, ...).
// This is our own interpreter for the subset of Jinja2 that chat templates use; constructs outside it
// fail with a `ChatTemplateError` at load time, never a silently different prompt.
//
// Before rendering, the messages get transformers 5's normalization (`normalized(_:)`: null-valued keys dropped,
// reasoning aliased), and an empty conversation is an error, as there.
//
// Checked against jinja2 itself and transformers' `render_jinja_template` (Tests/Fixtures/chat-templates/goldens.jsonl):
// 23 real templates over 42 conversations, and thousands of hand-written and random expressions, whitespace layouts and scoping
// programs. Known differences, all rare in chat templates: integers beyond 64 bits are an error; `range()`,
// `d.items()`, `map(...)` and friends are lists here, so printing one directly shows a list where Python
// shows `range(0, 3)`, `dict_items([...])` or `<generator object ...>`; jinja2's optimizer turns a failed
// slice of a *literal* (`{{ 5[1:] }}`) into Undefined where a runtime slice raises (we always raise).
// Not supported (a ChatTemplateError when parsed or run): include/import/extends/blocks, recursive loops,
// `*args`/`**kwargs` in calls, `str.format`, printf flags and widths, `\N{...}` escapes, and the less common
// filters (batch, groupby, truncate, wordwrap, format, ...).
//
// Where transformers keeps the template: `chat_template.jinja` in the model folder (transformers ≥ 4.5x
// and 5), else the `chat_template` key of `tokenizer_config.json` (a string, or a list of
// `{"name", "template"}` of which "default" is used).

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A parse or render failure, with its place in the template.
public struct ChatTemplateError: Error, CustomStringConvertible, Equatable {
    public enum Kind: Equatable, Sendable {
        /// The template is not valid Jinja.
        case syntax
        /// Valid Jinja that this interpreter does not run (an unknown filter, `include`, ...).
        case unsupported
        /// A failure while rendering (undefined attribute access, a type error, ...).
        case runtime
        /// The template's own `raise_exception(message)`, e.g. "Conversation roles must alternate ...".
        case raised
    }

    public let kind: Kind
    /// 1-based line and column in the template source.
    public let line: Int
    public let column: Int
    public let message: String

    public init(kind: Kind, line: Int, column: Int, message: String) {
        self.kind = kind
        self.line = line
        self.column = column
        self.message = message
    }

    public var description: String {
        let what: String
        switch kind {
        case .syntax: what = "syntax error"
        case .unsupported: what = "unsupported"
        case .runtime: what = "error"
        case .raised: what = "template raised an exception"
        }
        return "chat template line \(line), column \(column): \(what): \(message)"
    }
}

/// A parsed chat template, ready to render any number of conversations.
public struct ChatTemplate: @unchecked Sendable {
    /// The template text as given.
    public let source: String
    private let body: [JinjaStmt]
    private let rootFrame = JinjaFrame()

    /// Unix time (seconds) that `strftime_now(...)` formats, in UTC, instead of the local clock.
    /// For reproducible prompts and tests; nil (the default) uses the current local time as transformers does.
    public var fixedNow: Int64? = nil

    /// The step, time and size limits of one render (a template is code from the internet).
    public var budget = ChatTemplateBudget.standard

    /// Parses a template; throws `ChatTemplateError` (with line and column) if it is not valid or uses
    /// a construct this interpreter does not support.
    public init(source: String) throws {
        self.source = source
        var lexer = JinjaLexer(source: source)
        let tokens = try lexer.tokenize()
        var parser = JinjaParser(tokens: tokens, lines: lexer.sourceLines)
        body = try parser.parseTemplate()
        JinjaScopeAnalysis.analyze(template: body, root: rootFrame)
    }

    /// Renders a conversation as transformers' `apply_chat_template(tokenize=False)` would.
    ///
    /// - Parameters:
    ///   - messages: The chat, e.g. `[{"role": "user", "content": "Hi"}]`; any JSON the template reads.
    ///   - addGenerationPrompt: Append the header that starts the assistant's reply.
    ///   - bosToken, eosToken: The tokenizer's special tokens; nil leaves `bos_token`/`eos_token` undefined.
    ///   - extra: More template variables, as `apply_chat_template`'s keyword arguments: `tools`, `documents`
    ///     (both None when absent), `date_string`, `enable_thinking`, other special tokens, ...
    public func render(messages: [JSONValue], addGenerationPrompt: Bool, bosToken: String?, eosToken: String?,
                       extra: [String: JSONValue] = [:]) throws -> String {
        guard !messages.isEmpty else {
            // transformers' own error (a ValueError there, before the template runs).
            throw ChatTemplateError(kind: .runtime, line: 1, column: 1,
                                    message: "Cannot apply chat template to an empty conversation. Provide at least one message.")
        }
        return try renderAllowingEmpty(messages: messages, addGenerationPrompt: addGenerationPrompt, bosToken: bosToken,
                                       eosToken: eosToken, extra: extra)
    }

    /// `render` without the empty-conversation check: what comes before a conversation's first turn (the SFT
    /// dataset's prefix renderings) is the template run on no messages.
    func renderAllowingEmpty(messages: [JSONValue], addGenerationPrompt: Bool, bosToken: String?, eosToken: String?,
                             extra: [String: JSONValue] = [:]) throws -> String {
        let interpreter = JinjaInterpreter(fixedNow: fixedNow, budget: budget)
        // The render arguments sit in a scope of their own, under the template's frame (as jinja2's context).
        let scope = JinjaScope(parent: nil)
        scope.vars["messages"] = .list(Self.normalized(messages).map(JinjaValue.init))
        scope.vars["tools"] = JinjaValue.none
        scope.vars["documents"] = JinjaValue.none
        scope.vars["add_generation_prompt"] = .bool(addGenerationPrompt)
        if let bosToken { scope.vars["bos_token"] = .string(bosToken) }
        if let eosToken { scope.vars["eos_token"] = .string(eosToken) }
        for (k, v) in extra { scope.vars[k] = JinjaValue(v) }
        var out = ""
        _ = try interpreter.exec(body, interpreter.enter(rootFrame, scope), &out)
        return out
    }

    /// The messages as transformers 5's `apply_chat_template` hands them to the template: keys whose value is null
    /// are dropped (`_normalize_chat_messages`: many templates test `is defined`, not `is none`), and a message's
    /// reasoning under any of its names (`reasoning_content`, `thinking`, `reasoning`; the first non-null wins) is
    /// passed as both `reasoning_content` and `thinking` (`_alias_reasoning_fields`; an existing `thinking` is kept,
    /// a new one goes first, as `{"thinking": r, **message, "reasoning_content": r}` orders them).
    static func normalized(_ messages: [JSONValue]) -> [JSONValue] {
        messages.map { message in
            guard let object = message.object else { return message }
            var kept = JSONObject(object.filter { !$0.value.isNull }.map { ($0.key, $0.value) })
            guard let reasoning = ["reasoning_content", "thinking", "reasoning"].lazy.compactMap({ kept[$0] }).first else {
                return .object(kept)
            }
            if kept["thinking"] == nil { kept = JSONObject([("thinking", reasoning)] + kept.map { ($0.key, $0.value) }) }
            kept["reasoning_content"] = reasoning
            return .object(kept)
        }
    }

    /// Finds a model folder's chat template where transformers keeps it; nil if the folder has none.
    public static func load(directory: String) throws -> ChatTemplate? {
        let jinjaPath = directory + "/chat_template.jinja"
        if FileSystem.exists(jinjaPath) {
            return try parse(try FileSystem.readText(jinjaPath), file: jinjaPath)
        }
        let configPath = directory + "/tokenizer_config.json"
        if FileSystem.exists(configPath) {
            let config: JSONValue
            do {
                config = try JSONValue.parse(try FileSystem.readText(configPath))
            } catch let e as JSONParseError {
                throw FileFormatError(file: configPath, place: "byte \(e.offset)", e.message)
            }
            switch config["chat_template"] {
            case nil, .null?:
                break
            case .string(let s)?:
                return try parse(s, file: configPath)
            case .array(let list)?:
                for entry in list where entry["name"]?.string == "default" {
                    guard let s = entry["template"]?.string else {
                        throw FileFormatError(file: configPath, place: "chat_template", "the \"default\" entry has no \"template\" string")
                    }
                    return try parse(s, file: configPath)
                }
                throw FileFormatError(file: configPath, place: "chat_template",
                                      "a list of named templates with no \"default\" one")
            default:
                throw FileFormatError(file: configPath, place: "chat_template", "expected a string or a list of {name, template}")
            }
        }
        return nil
    }

    /// The special tokens transformers passes to every chat template (its `special_tokens_map`), read from a
    /// model folder's `tokenizer_config.json`: `bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`,
    /// `cls_token`, `mask_token` (each a string, or an AddedToken object whose `content` is used) and
    /// `additional_special_tokens`. Ready to pass as `render(..., extra:)`; empty if the file is missing.
    public static func specialTokens(directory: String) throws -> [String: JSONValue] {
        let configPath = directory + "/tokenizer_config.json"
        guard FileSystem.exists(configPath) else { return [:] }
        let config: JSONValue
        do {
            config = try JSONValue.parse(try FileSystem.readText(configPath))
        } catch let e as JSONParseError {
            throw FileFormatError(file: configPath, place: "byte \(e.offset)", e.message)
        }
        func content(_ v: JSONValue?) -> String? {
            if let s = v?.string { return s }
            return v?["content"]?.string
        }
        var out: [String: JSONValue] = [:]
        for key in ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"] {
            if let s = content(config[key]) { out[key] = .string(s) }
        }
        if let extra = config["additional_special_tokens"]?.array {
            out["additional_special_tokens"] = .array(extra.compactMap { content($0).map(JSONValue.string) })
        }
        return out
    }

    private static func parse(_ text: String, file: String) throws -> ChatTemplate {
        do {
            return try ChatTemplate(source: text)
        } catch let e as ChatTemplateError {
            throw FileFormatError(file: file, place: "chat template line \(e.line), column \(e.column)", e.message)
        }
    }
}
