import XCTest
@testable import QLoRA
#if canImport(Glibc)
import Glibc
#endif

/// Reading and writing files never loses what was there and always names the file: folders given as files,
/// interrupted folder writes, writes that fail (a full disk), outputs that would overwrite inputs.
final class FileSystemSafetyTests: XCTestCase {
    func testReadingAFolderSaysItIsAFolder() throws {
        let dir = try TestFixtures.temporaryDirectory()
        XCTAssertThrowsError(try FileSystem.readFile(dir)) { error in
            XCTAssertEqual((error as? FileFormatError)?.file, dir)
            XCTAssertTrue("\(error)".contains("is a folder, expected a file"), "\(error)")
            XCTAssertFalse("\(error)".contains("No such device"), "\(error)")
        }
        XCTAssertThrowsError(try SafeTensorsFile(path: dir)) { XCTAssertTrue("\($0)".contains("is a folder"), "\($0)") }
    }

    func testReadingAPipeReadsItsBytes() throws {
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&fds), 0)
        let text = Array("{\"a\": 1}\n".utf8)
        XCTAssertEqual(write(fds[1], text, text.count), text.count)
        close(fds[1])
        defer { close(fds[0]) }
        XCTAssertEqual(try FileSystem.readFile("/proc/self/fd/\(fds[0])"), text)
    }

    /// A folder write that fails half-way (here: an error thrown after one file) leaves the old folder as it was.
    func testAnInterruptedFolderWriteLeavesTheOldFolder() throws {
        let root = try TestFixtures.temporaryDirectory()
        let target = root + "/model"
        try FileSystem.writeDirectory(target) { try FileSystem.writeAtomically($0 + "/config.json", text: "old") }
        struct Interrupted: Error {}
        XCTAssertThrowsError(try FileSystem.writeDirectory(target) { temporary in
            try FileSystem.writeAtomically(temporary + "/config.json", text: "new")
            throw Interrupted()
        }) { XCTAssertTrue($0 is Interrupted) }
        XCTAssertEqual(try FileSystem.readText(target + "/config.json"), "old")
        XCTAssertEqual(try FileSystem.listDirectory(root), ["model"], "no temporary folder is left")
        // A complete write replaces it.
        try FileSystem.writeDirectory(target + "/") { try FileSystem.writeAtomically($0 + "/config.json", text: "new") }
        XCTAssertEqual(try FileSystem.readText(target + "/config.json"), "new")
        XCTAssertEqual(try FileSystem.listDirectory(root), ["model"])
    }

    /// A write that fails (the file size limit stands in for a full disk: write() fails the same way) reports the
    /// target file, and the good file it would have replaced is untouched.
    func testAFailingWriteNamesTheFileAndKeepsTheOldOne() throws {
        let dir = try TestFixtures.temporaryDirectory()
        let path = dir + "/model.safetensors"
        try FileSystem.writeAtomically(path, text: "good")
        let previousHandler = signal(SIGXFSZ, SIG_IGN)
        var limit = rlimit()
        getrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &limit)
        var small = limit
        small.rlim_cur = 4096
        XCTAssertEqual(setrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &small), 0)
        defer {
            setrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &limit)
            signal(SIGXFSZ, previousHandler)
        }
        let record = TensorRecord(name: "w", floats: [Float](repeating: 1, count: 4096), shape: [4096])
        XCTAssertThrowsError(try SafeTensorsWriter.write([record], to: path)) { error in
            XCTAssertTrue("\(error)".hasPrefix("cannot write \(path): "), "\(error)")
            XCTAssertTrue("\(error)".contains("the file was not replaced"), "\(error)")
        }
        setrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &limit)
        XCTAssertEqual(try FileSystem.readText(path), "good")
        XCTAssertEqual(try FileSystem.listDirectory(dir), ["model.safetensors"], "the temporary file is removed")
    }

    func testWritingToDevFullIsAnErrorNamingTheFile() throws {
        guard FileSystem.exists("/dev/full") else { throw XCTSkip("no /dev/full") }
        let fd = open("/dev/full", O_WRONLY)
        guard fd >= 0 else { throw XCTSkip("cannot open /dev/full") }
        let writer = AtomicFileWriter(fd: fd, path: "/some/target")
        defer { close(fd) }
        XCTAssertThrowsError(try writer.write([1, 2, 3])) { error in
            XCTAssertEqual("\(error)", "cannot write /some/target: No space left on device (the file was not replaced)")
        }
    }

    func testCanonicalPathsOfOneFolderAreEqual() throws {
        let root = try TestFixtures.temporaryDirectory()
        try FileSystem.createDirectory(root + "/m")
        XCTAssertEqual(symlink(root + "/m", root + "/link"), 0)
        let real = FileSystem.canonicalPath(root + "/m")
        for spelling in [root + "/m/", root + "/./m", root + "/link", root + "/m/../m", root + "//m"] {
            XCTAssertEqual(FileSystem.canonicalPath(spelling), real, spelling)
        }
        XCTAssertEqual(FileSystem.canonicalPath(root + "/link/new/"), real + "/new", "a path that does not exist yet")
        XCTAssertEqual(FileSystem.canonicalPath(root + "/absent/../m"), real)
    }

    func testOutputsThatWouldOverwriteInputsAreRefused() throws {
        let root = try TestFixtures.temporaryDirectory()
        try FileSystem.createDirectory(root + "/base")
        XCTAssertEqual(symlink(root + "/base", root + "/alias"), 0)
        for output in [root + "/base", root + "/base/", root + "/alias", root + "/./base", root] {
            XCTAssertThrowsError(try FileSystem.refuseOverwrite(output: output, option: "--out", inputs: [("base model folder", root + "/base")]),
                                 output) { XCTAssertTrue("\($0)".hasPrefix("--out \(output) "), "\($0)") }
        }
        XCTAssertNoThrow(try FileSystem.refuseOverwrite(output: root + "/merged", option: "--out", inputs: [("base model folder", root + "/base")]))
        // A folder holding other files is never replaced as a whole.
        try FileSystem.writeAtomically(root + "/base/notes.txt", text: "mine")
        XCTAssertThrowsError(try FileSystem.checkReplaceable(root + "/base", option: "--out", replaceable: ["config.json"])) {
            XCTAssertTrue("\($0)".contains("notes.txt"), "\($0)")
        }
        XCTAssertNoThrow(try FileSystem.checkReplaceable(root + "/absent", option: "--out", replaceable: []))
    }

    /// `merge --out` naming the base folder (or the adapter folder) is refused, and the base is untouched.
    func testMergeIntoTheBaseFolderIsRefused() throws {
        let root = try TestFixtures.temporaryDirectory()
        let base = root + "/base"
        try FileManager.default.copyItem(atPath: TestFixtures.path("tiny-llama/base"), toPath: base)
        let before = try FileSystem.readFile(base + "/model.safetensors")
        let model = try ModelLoader.load(base, quantization: .none).model
        try PEFTAdapter.load(directory: TestFixtures.path("tiny-llama/adapter"), into: model)
        XCTAssertThrowsError(try AdapterMerge.write(model: model, baseDirectory: base, fromQuantizedBase: false, to: root + "/./base/")) {
            XCTAssertTrue("\($0)".contains("would overwrite it"), "\($0)")
        }
        XCTAssertEqual(try FileSystem.readFile(base + "/model.safetensors"), before)
        // An earlier merge output is replaced as a whole.
        _ = try AdapterMerge.write(model: model, baseDirectory: base, fromQuantizedBase: false, to: root + "/merged")
        _ = try AdapterMerge.write(model: model, baseDirectory: base, fromQuantizedBase: false, to: root + "/merged")
        XCTAssertEqual(try FileSystem.listDirectory(root), ["base", "merged"])
    }
}

extension FileSystemSafetyTests {
    func testAFileIsNeverReplacedByAFolder() throws {
        let root = try TestFixtures.temporaryDirectory()
        try FileSystem.writeAtomically(root + "/model", text: "a file")
        XCTAssertThrowsError(try FileSystem.writeDirectory(root + "/model") { _ in }) { XCTAssertTrue("\($0)".contains("is not a folder"), "\($0)") }
        XCTAssertEqual(try FileSystem.readText(root + "/model"), "a file")
        XCTAssertEqual(try FileSystem.listDirectory(root), ["model"])
    }
}
