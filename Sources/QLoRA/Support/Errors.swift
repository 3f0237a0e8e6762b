// Errors that name the file, the place in it and what was expected.

/// A file that does not hold what its format promises.
public struct FileFormatError: Error, CustomStringConvertible, Equatable {
    /// The file (or folder) that was being read.
    public let file: String
    /// Where in the file: "header", "tensor 'model.norm.weight'", "line 12", ...
    public let place: String
    /// What was wrong and what was expected.
    public let message: String

    public init(file: String, place: String, _ message: String) {
        self.file = file
        self.place = place
        self.message = message
    }

    public var description: String { "\(file): \(place): \(message)" }
}

/// A request the program cannot carry out: a missing file, an unsupported option, inconsistent arguments.
public struct UsageError: Error, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
