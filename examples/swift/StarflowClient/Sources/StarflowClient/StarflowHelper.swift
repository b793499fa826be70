import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A `starflow-mlx helper` process, driven over its pipes: requests are written as JSON lines, events are read
/// back, decoded and routed to the request they answer. A helper that dies fails its pending requests with
/// `StarflowClientError.helperExited` and, with `restartOnExit`, is started again.
public final class StarflowHelper: @unchecked Sendable {
    public struct Configuration: Sendable {
        public var executable: URL
        public var arguments: [String]
        public var environment: [String: String]?
        public var workingDirectory: URL?
        public var restartOnExit: Bool

        public init(executable: URL, arguments: [String] = [], environment: [String: String]? = nil,
                    workingDirectory: URL? = nil, restartOnExit: Bool = true) {
            self.executable = executable
            self.arguments = arguments
            self.environment = environment
            self.workingDirectory = workingDirectory
            self.restartOnExit = restartOnExit
        }

        /// `python -m starflow_mlx.cli helper`, `python` found on the PATH unless a path is given.
        public static func python(_ python: String = "python3", workingDirectory: URL? = nil,
                                  environment: [String: String]? = nil, restartOnExit: Bool = true) -> Configuration {
            Configuration(executable: URL(fileURLWithPath: "/usr/bin/env"),
                          arguments: [python, "-m", "starflow_mlx.cli", "helper"], environment: environment,
                          workingDirectory: workingDirectory, restartOnExit: restartOnExit)
        }
    }

    public let configuration: Configuration
    /// Every event the helper writes, in order, across restarts.
    public let events: AsyncStream<HelperEvent>
    private let eventsContinuation: AsyncStream<HelperEvent>.Continuation
    private let lock = NSLock()
    private var process: Process?
    private var input: FileHandle?
    private var nextID = 1
    private var pending: [RequestID: AsyncThrowingStream<HelperEvent, Error>.Continuation] = [:]
    private var stopping = false
    private var restartCount = 0

    public init(_ configuration: Configuration) {
        self.configuration = configuration
        (events, eventsContinuation) = AsyncStream.makeStream(of: HelperEvent.self)
    }

    deinit {
        stop()
    }

    /// The helper's process id while it runs.
    public var processIdentifier: Int32? { locked { process?.isRunning == true ? process?.processIdentifier : nil } }
    public var isRunning: Bool { processIdentifier != nil }
    /// How many times a dead helper was started again.
    public var restarts: Int { locked { restartCount } }

    /// Starts the helper process (once; a running helper is left as it is).
    public func start() throws {
        signal(SIGPIPE, SIG_IGN)  // a write to a dead helper's stdin must be an error, not a signal that kills the app
        try locked {
            stopping = false
            if process?.isRunning == true { return }
            try launch()
        }
    }

    /// Closes the helper's stdin (it cancels what is queued or running and exits) and waits for it.
    public func stop() {
        let running: Process? = locked {
            stopping = true
            try? input?.close()
            input = nil
            return process
        }
        running?.waitUntilExit()
    }

    /// All events of one request, ending with its final one: a `result` finishes the stream, an `error` or
    /// `cancelled` event throws (`StarflowClientError.helper` / `.cancelled`), and so does the helper's death.
    public func stream(_ method: String, _ params: [String: JSONValue] = [:])
        -> (id: RequestID, events: AsyncThrowingStream<HelperEvent, Error>) {
        let (stream, continuation) = AsyncThrowingStream.makeStream(of: HelperEvent.self, throwing: Error.self)
        let id: RequestID = locked {
            let id = RequestID.int(nextID)
            nextID += 1
            pending[id] = continuation
            return id
        }
        do {
            try write(["id": id.json, "method": .string(method), "params": .object(params)])
        } catch {
            locked { pending[id] = nil }
            continuation.finish(throwing: error)
        }
        return (id, stream)
    }

    /// One request's `result` event (the events before it are skipped).
    public func call(_ method: String, _ params: [String: JSONValue] = [:]) async throws -> HelperEvent {
        for try await event in stream(method, params).events where event.kind == .result {
            return event
        }
        throw StarflowClientError.cancelled
    }

    /// Asks the helper to cancel request `id`: a queued job leaves the queue, a running one stops at its next chunk
    /// boundary and deletes its partial output; the cancelled request's stream then throws `.cancelled`.
    public func cancel(_ id: RequestID) async throws {
        _ = try await call("cancel", ["target": id.json])
    }

    // ---- the process ----

    private func launch() throws {
        let process = Process()
        process.executableURL = configuration.executable
        process.arguments = configuration.arguments
        if let environment = configuration.environment { process.environment = environment }
        if let folder = configuration.workingDirectory { process.currentDirectoryURL = folder }
        let stdin = Pipe(), stdout = Pipe()
        process.standardInput = stdin
        process.standardOutput = stdout
        process.standardError = FileHandle.standardError  // the helper's logs, for the app's own log
        let drained = DispatchSemaphore(value: 0)
        process.terminationHandler = { [weak self] ended in
            // the last lines may still be in the pipe: route them before failing what is left
            _ = drained.wait(timeout: .now() + 10)
            self?.exited(ended)
        }
        try process.run()
        self.process = process
        input = stdin.fileHandleForWriting
        let output = stdout.fileHandleForReading
        Thread.detachNewThread { [weak self] in
            var buffer = Data()
            while true {
                let chunk = output.availableData
                if chunk.isEmpty { break }
                buffer.append(chunk)
                while let newline = buffer.firstIndex(of: 0x0A) {
                    let line = buffer[buffer.startIndex..<newline]
                    buffer = Data(buffer[buffer.index(after: newline)...])
                    self?.received(Data(line))
                }
            }
            drained.signal()
        }
    }

    private func received(_ line: Data) {
        guard let event = try? JSONDecoder().decode(HelperEvent.self, from: line) else {
            return  // not a protocol line: the helper never writes one, so there is nothing to route
        }
        eventsContinuation.yield(event)
        guard let id = event.id else { return }
        let continuation: AsyncThrowingStream<HelperEvent, Error>.Continuation? = locked {
            event.isFinal ? pending.removeValue(forKey: id) : pending[id]
        }
        guard let continuation else { return }
        switch event.kind {
        case .error:
            continuation.finish(throwing: StarflowClientError.helper(code: event.code ?? "", message: event.message ?? ""))
        case .cancelled:
            continuation.finish(throwing: StarflowClientError.cancelled)
        case .result:
            continuation.yield(event)
            continuation.finish()
        default:
            continuation.yield(event)
        }
    }

    private func exited(_ ended: Process) {
        let (failed, restart): ([AsyncThrowingStream<HelperEvent, Error>.Continuation], Bool) = locked {
            guard process === ended else { return ([], false) }
            let failed = Array(pending.values)
            pending.removeAll()
            process = nil
            input = nil
            return (failed, !stopping && configuration.restartOnExit)
        }
        for continuation in failed {
            continuation.finish(throwing: StarflowClientError.helperExited(status: ended.terminationStatus))
        }
        if restart {
            locked {
                if (try? launch()) != nil { restartCount += 1 }
            }
        }
    }

    private func write(_ request: JSONValue) throws {
        var line = try JSONEncoder().encode(request)
        line.append(0x0A)
        let handle: FileHandle? = locked { input }
        guard let handle else { throw StarflowClientError.notRunning }
        do {
            try handle.write(contentsOf: line)
        } catch {
            throw StarflowClientError.notRunning
        }
    }

    private func locked<T>(_ body: () throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }
}
