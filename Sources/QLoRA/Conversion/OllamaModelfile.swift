// The Ollama Modelfile written beside a GGUF export (`qlora export --ollama`), for `ollama create NAME -f Modelfile`:
//   FROM ./FILE.gguf                  the GGUF, relative to the Modelfile (Ollama resolves it from the Modelfile's folder)
//   TEMPLATE """…"""                  only for a chat template recognised as ChatML or Llama 3 (see below)
//   PARAMETER stop "<tok>"            each end-of-turn / end-of-sequence token: tokenizer_config.json's eos_token, the
//                                     eos_token_id(s) of config.json and generation_config.json, and the chat
//                                     template's end-of-turn marker (<|im_end|>, <|eot_id|>, <|end|>, <end_of_turn>)
//                                     when the tokenizer has it as a special added token
// Ollama, creating a model from a GGUF, reads `tokenizer.chat_template` and looks it up among its own built-in templates;
// a match gives that template's Go-template form, anything else gives the bare `{{ .Prompt }}` template (no chat
// format). So for the two families recognised here with certainty, the Go template is written out, and Ollama does
// not depend on recognising the Jinja text; for other templates none is written and Ollama's own lookup decides.
// Values are quoted as the Modelfile parser reads them: "…" normally, """…""" when the value holds a quote or a newline;
// the FROM path is written bare unless it holds a space or a quote.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

public enum OllamaModelfile {
    /// Ollama's Go-template forms of the chat template families recognised here.
    static let chatMLTemplate = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    static let llama3Template = "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    /// End-of-turn markers of chat templates, used as stop tokens when the template uses them and they are special tokens.
    static let endOfTurnMarkers = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"]

    /// The Modelfile text for the GGUF file `ggufFileName` (in the Modelfile's folder) exported from the model folder
    /// `directory` (tokenizer.json, tokenizer_config.json, config.json, generation_config.json, chat_template.jinja).
    public static func text(directory: String, ggufFileName: String, log: (String) -> Void = { _ in }) throws -> String {
        func parse(_ name: String) throws -> JSONValue? {
            let file = directory + "/" + name
            guard FileSystem.exists(file) else { return nil }
            do { return try JSONValue.parse(bytes: try FileSystem.readFile(file)) } catch let e as JSONParseError {
                throw FileFormatError(file: file, place: "JSON", e.description)
            }
        }
        guard let tokenizer = try parse("tokenizer.json") else {
            throw UsageError("--ollama: \(directory) has no tokenizer.json, which the Modelfile's stop tokens come from")
        }
        let tokenizerConfig = try parse("tokenizer_config.json")
        // id → token, and the special added tokens.
        var tokenByID: [Int: String] = [:]
        if let vocab = tokenizer["model"]?["vocab"]?.object { for (token, id) in vocab { if let id = id.int { tokenByID[id] = token } } }
        var special = Set<String>()
        for added in tokenizer["added_tokens"]?.array ?? [] {
            guard let id = added["id"]?.int, let content = added["content"]?.string else { continue }
            tokenByID[id] = content
            if added["special"]?.bool == true { special.insert(content) }
        }

        var stops: [String] = []
        func addStop(_ token: String?) { if let token, !token.isEmpty, !stops.contains(token) { stops.append(token) } }
        let eos = tokenizerConfig?["eos_token"]
        addStop(eos?.string ?? eos?["content"]?.string)
        for file in ["config.json", "generation_config.json"] {
            guard let value = try parse(file)?["eos_token_id"] else { continue }
            for id in value.array?.compactMap(\.int) ?? value.int.map { [$0] } ?? [] { addStop(tokenByID[id]) }
        }
        let template = try chatTemplate(directory: directory, tokenizerConfig: tokenizerConfig)
        for marker in endOfTurnMarkers where special.contains(marker) && template?.contains(marker) == true { addStop(marker) }

        var lines = [
            "# Ollama Modelfile written by `qlora export --ollama`; create the model with: ollama create NAME -f Modelfile",
            "# Ollama reads the chat template (tokenizer.chat_template) from the GGUF and uses its own Go-template form of it",
            "# when it recognises it as one of its built-in templates; otherwise it uses the bare prompt ({{ .Prompt }}).",
        ]
        var goTemplate: String?
        if let template, ["<|im_start|>", "<|im_end|>"].allSatisfy({ template.contains($0) && special.contains($0) }) {
            goTemplate = chatMLTemplate
            lines.append("# The chat template is ChatML, written out below so that Ollama does not depend on recognising it.")
        } else if let template, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"].allSatisfy({ template.contains($0) && special.contains($0) }) {
            goTemplate = llama3Template
            lines.append("# The chat template is Llama 3's, written out below so that Ollama does not depend on recognising it.")
        } else if template == nil {
            lines.append("# The model folder has no chat template.")
        }
        let from = ggufFileName.hasPrefix("/") ? ggufFileName : "./" + ggufFileName
        lines.append("FROM " + (from.contains(where: { $0.isWhitespace || $0 == "\"" }) ? try quoted(from, what: "the GGUF file name") : from))
        if let goTemplate { lines.append("TEMPLATE " + (try quoted(goTemplate, what: "the template"))) }
        for stop in stops {
            do { lines.append("PARAMETER stop " + (try quoted(stop, what: "stop token"))) } catch {
                log("warning: \(error); the Modelfile has no stop parameter for it")
            }
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// The path of the Modelfile written beside `ggufPath`: `Modelfile` in the same folder.
    public static func path(besides ggufPath: String) throws -> String {
        let fileName = GGUFExporter.lastPathComponent(ggufPath)
        guard fileName != "Modelfile" else {
            throw UsageError("--ollama: --out \(ggufPath) is named Modelfile, the file --ollama writes beside it; name the GGUF FILE.gguf")
        }
        guard let slash = ggufPath.lastIndex(of: "/") else { return "Modelfile" }
        return String(ggufPath[...slash]) + "Modelfile"
    }

    /// Writes `Modelfile` beside `ggufPath` (atomically) and returns its path; refuses to overwrite any of `inputs`.
    @discardableResult
    public static func write(besides ggufPath: String, directory: String, inputs: [String], log: (String) -> Void = { _ in }) throws -> String {
        let path = try path(besides: ggufPath)
        try GGUFExporter.refuseOverwriting(path, inputs: inputs, option: "--ollama's Modelfile")
        let text = try text(directory: directory, ggufFileName: GGUFExporter.lastPathComponent(ggufPath), log: log)
        try FileSystem.writeAtomically(path, text: text)
        return path
    }

    /// The chat template the export writes to the GGUF (tokenizer_config.json's, its "default" named one, else chat_template.jinja).
    static func chatTemplate(directory: String, tokenizerConfig: JSONValue?) throws -> String? {
        if let template = tokenizerConfig?["chat_template"] {
            if let text = template.string { return text }
            return template.array?.first(where: { $0["name"]?.string == "default" })?["template"]?.string
        }
        let jinja = directory + "/chat_template.jinja"
        return FileSystem.exists(jinja) ? try FileSystem.readText(jinja) : nil
    }

    /// A Modelfile value: "value", or """value""" when it holds a quote or a newline.
    static func quoted(_ value: String, what: String) throws -> String {
        if !value.contains("\"") && !value.contains("\n") { return "\"" + value + "\"" }
        guard !value.contains("\"\"\""), !value.hasPrefix("\""), !value.hasSuffix("\"") else {
            throw UsageError("--ollama: \(what) \(value.debugDescription) cannot be quoted in a Modelfile (it holds \"\"\" or starts or ends with a quote)")
        }
        return "\"\"\"" + value + "\"\"\""
    }
}
