// report.html: a self-contained page with the train and eval loss curves (inline SVG, no scripts
// or external files), beside them the task metrics of each evaluation and the last evaluation's sample answers, and
// the run's settings.

#if canImport(Glibc)
import Glibc
#endif

enum TrainingReport {
    static func write(configuration c: TrainingConfiguration, history: [StepRecord], evalHistory: [(step: Int, loss: Double)],
                      metricHistory: [(step: Int, values: [(String, Double)])] = [],
                      samples: [(question: String, reference: String, answer: String)] = [], device: String? = nil,
                      to path: String) throws {
        let train = history.map { (Double($0.step), $0.loss) }
        let eval = evalHistory.map { (Double($0.step), $0.loss) }
        var html = """
        <!doctype html>
        <html><head><meta charset="utf-8"><title>qlora training report</title>
        <style>body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
        td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}.legend span{margin-right:1.5em}
        .charts{display:flex;flex-wrap:wrap;gap:1.5em}</style></head><body>
        <h1>Training report</h1>
        <p>Model <code>\(escape(c.model))</code>, data <code>\(escape(c.datasets.joined(separator: ", ")))</code>, \(history.count) steps.</p>

        """
        html += "<div class=\"charts\"><div>\n" + chart(train: train, eval: eval)
        html += "<p class=\"legend\"><span style=\"color:#1f77b4\">&#9632; train loss</span><span style=\"color:#d62728\">&#9632; eval loss</span></p>\n</div>\n"
        html += metricsChart(metricHistory) + "</div>\n"
        if let last = history.last { html += "<p>Last train loss \(String(cFormat: "%.4f", last.loss))" }
        if let best = evalHistory.min(by: { $0.loss < $1.loss }) {
            html += "; best eval loss \(String(cFormat: "%.4f", best.loss)) (perplexity \(String(cFormat: "%.3f", exp(best.loss)))) at step \(best.step)"
        }
        if let last = metricHistory.last {
            let best = c.bestModelMetricKey
            html += ".</p>\n<p>Task metrics at step \(last.step): " + last.values.map { "\(escape($0.0)) \(String(cFormat: "%.4f", $0.1))" }.joined(separator: ", ")
            html += "; best adapter by <code>\(escape(best))</code> (\(c.bestModelGreaterIsBetter ? "greater" : "smaller") is better)"
        }
        html += ".</p>\n"
        if !samples.isEmpty {
            html += "<h2>Sample answers (step \(metricHistory.last?.step ?? 0))</h2>\n<table>\n<tr><th>question</th><th>reference</th><th>answer</th></tr>\n"
            for s in samples { html += "<tr><td>\(escape(s.question))</td><td>\(escape(s.reference))</td><td>\(escape(s.answer))</td></tr>\n" }
            html += "</table>\n"
        }
        html += "<h2>Settings</h2>\n<table>\n"
        let settings: [(String, String)] = (device.map { [("device (compute type)", $0)] } ?? []) + [
            ("quantize", c.quantize), ("lora_r", "\(c.loraR)"), ("lora_alpha", "\(c.loraAlpha)"), ("lora_dropout", "\(c.loraDropout)"),
            ("target_modules", c.targetModules.joined(separator: ", ")), ("max_seq_length", "\(c.maxSeqLength)"), ("packing", "\(c.packing)"),
            ("completion_only_loss", "\(c.completionOnlyLoss)"), ("per_device_train_batch_size", "\(c.batchSize)"),
            ("gradient_accumulation_steps", "\(c.gradientAccumulationSteps)"), ("learning_rate", "\(c.learningRate)"),
            ("lr_scheduler_type", c.scheduler), ("warmup_ratio", "\(c.warmupRatio)"), ("optim", c.optimizer), ("seed", "\(c.seed)"),
        ]
        for (k, v) in settings { html += "<tr><th>\(k)</th><td>\(escape(v))</td></tr>\n" }
        html += "</table>\n</body></html>\n"
        try FileSystem.writeAtomically(path, text: html)
    }

    static let metricColors = ["#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]

    /// The task metrics of each evaluation on one chart, each scaled to its own range (bleu is 0-100, the others 0-1):
    /// the axis is 0 to the largest value of the metrics' natural scales.
    static func metricsChart(_ history: [(step: Int, values: [(String, Double)])]) -> String {
        var names: [String] = []
        for entry in history { for (k, _) in entry.values where !names.contains(k) { names.append(k) } }
        guard !names.isEmpty else { return "" }
        let width = 480.0, height = 320.0, margin = 48.0
        let maxX = max(Double(history.map(\.step).max() ?? 1), 1)
        func scale(_ name: String) -> Double { name.hasSuffix("bleu") ? 100 : 1 }
        func x(_ v: Double) -> Double { margin + (v / maxX) * (width - 2 * margin) }
        func y(_ v: Double, _ name: String) -> Double { height - margin - min(max(v / scale(name), 0), 1) * (height - 2 * margin) }
        var svg = "<div><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(height))\" style=\"border:1px solid #ddd\">\n"
        svg += "<line x1=\"\(margin)\" y1=\"\(height - margin)\" x2=\"\(width - margin)\" y2=\"\(height - margin)\" stroke=\"#888\"/>\n"
        svg += "<line x1=\"\(margin)\" y1=\"\(margin)\" x2=\"\(margin)\" y2=\"\(height - margin)\" stroke=\"#888\"/>\n"
        for i in 0...4 {
            let v = Double(i) / 4
            svg += "<text x=\"4\" y=\"\(String(cFormat: "%.1f", y(v, "") + 4))\" font-size=\"11\">\(String(cFormat: "%.2f", v))</text>\n"
        }
        svg += "<text x=\"\(width - margin)\" y=\"\(height - 16)\" font-size=\"11\" text-anchor=\"end\">step \(Int(maxX))</text>\n"
        var legend = "<p class=\"legend\">"
        for (i, name) in names.enumerated() {
            let color = metricColors[i % metricColors.count]
            let points = history.compactMap { e in e.values.first { $0.0 == name }.map { (Double(e.step), $0.1) } }
            let path = points.map { String(cFormat: "%.1f,%.1f", x($0.0), y($0.1, name)) }.joined(separator: " ")
            if points.count > 1 { svg += "<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\" points=\"\(path)\"/>\n" }
            for p in points {
                svg += "<circle cx=\"\(String(cFormat: "%.1f", x(p.0)))\" cy=\"\(String(cFormat: "%.1f", y(p.1, name)))\" r=\"3\" fill=\"\(color)\"/>\n"
            }
            legend += "<span style=\"color:\(color)\">&#9632; \(escape(name))\(scale(name) == 100 ? " (/100)" : "")</span>"
        }
        return svg + "</svg>\n" + legend + "</p>\n</div>\n"
    }

    /// The sample answers as a Markdown table (TensorBoard's text tab).
    static func samplesMarkdown(_ samples: [(question: String, reference: String, answer: String)]) -> String {
        func cell(_ s: String) -> String { s.replacing("|", with: "\\|").replacing("\n", with: " ") }
        return "| question | reference | answer |\n| --- | --- | --- |\n"
            + samples.map { "| \(cell($0.question)) | \(cell($0.reference)) | \(cell($0.answer)) |\n" }.joined()
    }

    static func chart(train: [(Double, Double)], eval: [(Double, Double)]) -> String {
        let width = 720.0, height = 320.0, margin = 48.0
        let all = train + eval
        guard !all.isEmpty else { return "<p>No steps yet.</p>\n" }
        let maxX = max(all.map(\.0).max()!, 1)
        var minY = all.map(\.1).min()!, maxY = all.map(\.1).max()!
        if maxY - minY < 1e-9 { minY -= 0.5; maxY += 0.5 }
        func x(_ v: Double) -> Double { margin + (v / maxX) * (width - 2 * margin) }
        func y(_ v: Double) -> Double { height - margin - (v - minY) / (maxY - minY) * (height - 2 * margin) }
        func path(_ points: [(Double, Double)]) -> String {
            points.map { String(cFormat: "%.1f,%.1f", x($0.0), y($0.1)) }.joined(separator: " ")
        }
        var svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(height))\" style=\"border:1px solid #ddd\">\n"
        svg += "<line x1=\"\(margin)\" y1=\"\(height - margin)\" x2=\"\(width - margin)\" y2=\"\(height - margin)\" stroke=\"#888\"/>\n"
        svg += "<line x1=\"\(margin)\" y1=\"\(margin)\" x2=\"\(margin)\" y2=\"\(height - margin)\" stroke=\"#888\"/>\n"
        for i in 0...4 {
            let v = minY + (maxY - minY) * Double(i) / 4
            svg += "<text x=\"4\" y=\"\(String(cFormat: "%.1f", y(v) + 4))\" font-size=\"11\">\(String(cFormat: "%.3f", v))</text>\n"
        }
        svg += "<text x=\"\(width - margin)\" y=\"\(height - 16)\" font-size=\"11\" text-anchor=\"end\">step \(Int(maxX))</text>\n"
        if train.count > 1 { svg += "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"\(path(train))\"/>\n" }
        if eval.count > 1 { svg += "<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\" points=\"\(path(eval))\"/>\n" }
        for p in eval { svg += "<circle cx=\"\(String(cFormat: "%.1f", x(p.0)))\" cy=\"\(String(cFormat: "%.1f", y(p.1)))\" r=\"3\" fill=\"#d62728\"/>\n" }
        return svg + "</svg>\n"
    }

    static func escape(_ s: String) -> String {
        s.replacing("&", with: "&amp;").replacing("<", with: "&lt;").replacing(">", with: "&gt;").replacing("\"", with: "&quot;")
    }
}
