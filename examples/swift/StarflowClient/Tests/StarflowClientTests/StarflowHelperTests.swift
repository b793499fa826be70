import Foundation
import XCTest
@testable import StarflowClient
#if canImport(Glibc)
import Glibc
#endif

/// These tests drive the real `starflow-mlx helper` (Python, the package's shipped default model), started from
/// the repository this package lives in. `STARFLOW_PYTHON` names the Python that has starflow-mlx installed.
final class StarflowHelperTests: XCTestCase {
    static let repository = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    let prompt: JSONValue = "a red square moving right"

    func makeHelper(restartOnExit: Bool = true) throws -> StarflowHelper {
        let python = ProcessInfo.processInfo.environment["STARFLOW_PYTHON"] ?? "python3"
        let helper = StarflowHelper(.python(python, workingDirectory: Self.repository, restartOnExit: restartOnExit))
        try helper.start()
        return helper
    }

    func makeFolder() throws -> URL {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("starflow-client-\(UUID())")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(at: folder) }
        return folder
    }

    /// The shipped model loaded and a clip long enough (41 frames, sequential) to be stopped while it runs.
    func startLongJob(_ helper: StarflowHelper, in folder: URL) async throws
        -> (id: RequestID, events: AsyncThrowingStream<HelperEvent, Error>) {
        _ = try await helper.call("load")
        return helper.stream("generate", ["prompt": prompt, "out_dir": .string(folder.path),
                                          "settings": ["frames": 41, "jacobi": false]])
    }

    func testHelloSpeaksTheProtocolThisClientKnows() async throws {
        let helper = try makeHelper()
        defer { helper.stop() }
        let hello = try await helper.call("hello")
        XCTAssertEqual(hello.version, helperProtocolVersion)
        XCTAssertEqual(hello["protocol"]?.int, helperProtocolVersion)
        XCTAssertEqual(hello["methods"], ["hello", "load", "plan", "generate", "score", "cancel", "unload", "shutdown"])
    }

    func testGenerateStreamsProgressAndFramesThenTheResult() async throws {
        let helper = try makeHelper()
        defer { helper.stop() }
        let folder = try makeFolder()
        let loaded = try await helper.call("load")
        XCTAssertEqual(loaded["model"]?.string, "default")
        let job = helper.stream("generate", ["prompt": prompt, "out_dir": .string(folder.path), "name": "clip.mp4",
                                             "settings": ["frames": 9, "seed": 3]])
        var events: [HelperEvent] = []
        for try await event in job.events { events.append(event) }
        XCTAssertEqual(events.first?.kind, .accepted)
        XCTAssertEqual(events.last?.kind, .result)
        let stages = events.filter { $0.kind == .progress }.compactMap { $0.stage }
        XCTAssertEqual(stages.first, "text")
        XCTAssertEqual(stages.last, "decode")
        let frames = events.filter { $0.kind == .frame }
        XCTAssertEqual(frames.compactMap { $0.frameIndex }, Array(0..<9))
        for frame in frames { XCTAssertTrue(FileManager.default.fileExists(atPath: frame.path ?? "")) }
        let result = try XCTUnwrap(events.last)
        XCTAssertEqual(result.path, folder.appendingPathComponent("clip.mp4").path)
        XCTAssertEqual(result["seed"]?.int, 3)
        XCTAssertTrue(FileManager.default.fileExists(atPath: result.path ?? ""))
    }

    func testAHelperErrorIsTypedAndTheHelperGoesOn() async throws {
        let helper = try makeHelper()
        defer { helper.stop() }
        do {
            _ = try await helper.call("generate", ["prompt": 3, "out_dir": "/tmp"])
            XCTFail("a prompt that is not text was accepted")
        } catch StarflowClientError.helper(let code, let message) {
            XCTAssertEqual(code, "bad_params")
            XCTAssertEqual(message, "prompt must be str, got int")
        }
        let hello = try await helper.call("hello")
        XCTAssertEqual(hello.kind, .result)
    }

    func testCancelStopsTheRunningJobAndDeletesItsOutput() async throws {
        let helper = try makeHelper()
        defer { helper.stop() }
        let folder = try makeFolder()
        let job = try await startLongJob(helper, in: folder)
        var cancelled = false
        do {
            for try await event in job.events where event.kind == .frame && !cancelled {
                cancelled = true
                try await helper.cancel(job.id)
            }
            XCTFail("the cancelled job finished")
        } catch StarflowClientError.cancelled {
            XCTAssertTrue(cancelled)
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: folder.path), [])
    }

    func testAKilledHelperFailsItsPendingRequestsAndIsRestarted() async throws {
        let helper = try makeHelper()
        defer { helper.stop() }
        let job = try await startLongJob(helper, in: try makeFolder())
        do {
            for try await event in job.events where event.kind == .progress {
                if let pid = helper.processIdentifier, pid > 0 { kill(pid, SIGKILL) }
            }
            XCTFail("the job finished although its helper was killed")
        } catch StarflowClientError.helperExited(let status) {
            XCTAssertEqual(status, SIGKILL)
        }
        // started again: a new process that answers, and holds no model until told to load one
        var waited = 0
        while !helper.isRunning && waited < 100 {
            try await Task.sleep(nanoseconds: 100_000_000)
            waited += 1
        }
        XCTAssertEqual(helper.restarts, 1)
        let hello = try await helper.call("hello")
        XCTAssertEqual(hello["loaded"], .null)
    }

    func testAStoppedHelperIsNotRestartedAndRefusesRequests() async throws {
        let helper = try makeHelper()
        helper.stop()
        XCTAssertFalse(helper.isRunning)
        do {
            _ = try await helper.call("hello")
            XCTFail("a stopped helper answered")
        } catch StarflowClientError.notRunning {
        }
        XCTAssertEqual(helper.restarts, 0)
    }
}
