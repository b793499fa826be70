import Foundation

/// The helper protocol's version this client speaks (`"v"` of every event).
public let helperProtocolVersion = 1

/// Any JSON value: the parameters of a request and the fields of an event.
public enum JSONValue: Codable, Equatable, Sendable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let value = try? container.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? container.decode(Double.self) {
            self = .number(value)
        } else if let value = try? container.decode(String.self) {
            self = .string(value)
        } else if let value = try? container.decode([JSONValue].self) {
            self = .array(value)
        } else {
            self = .object(try container.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .null: try container.encodeNil()
        case .bool(let value): try container.encode(value)
        case .number(let value):
            // integers go out as integers: the helper refuses 9.0 where it wants an int
            if value.rounded() == value, abs(value) < 9.0e15 {
                try container.encode(Int64(value))
            } else {
                try container.encode(value)
            }
        case .string(let value): try container.encode(value)
        case .array(let value): try container.encode(value)
        case .object(let value): try container.encode(value)
        }
    }

    public var string: String? { if case .string(let s) = self { return s } else { return nil } }
    public var number: Double? { if case .number(let n) = self { return n } else { return nil } }
    public var int: Int? { number.map { Int($0) } }
    public var bool: Bool? { if case .bool(let b) = self { return b } else { return nil } }
    public subscript(key: String) -> JSONValue? { if case .object(let o) = self { return o[key] } else { return nil } }
}

extension JSONValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByFloatLiteral,
    ExpressibleByBooleanLiteral, ExpressibleByDictionaryLiteral, ExpressibleByArrayLiteral, ExpressibleByNilLiteral {
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int) { self = .number(Double(value)) }
    public init(floatLiteral value: Double) { self = .number(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(dictionaryLiteral elements: (String, JSONValue)...) {
        self = .object(Dictionary(elements, uniquingKeysWith: { _, last in last }))
    }
    public init(arrayLiteral elements: JSONValue...) { self = .array(elements) }
    public init(nilLiteral: ()) { self = .null }
}

/// A request's id: the client numbers its requests; the helper also accepts strings.
public enum RequestID: Codable, Hashable, Sendable, CustomStringConvertible {
    case int(Int)
    case string(String)

    public init(from decoder: Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let value = try? container.decode(Int.self) {
            self = .int(value)
        } else {
            self = .string(try container.decode(String.self))
        }
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .int(let value): try container.encode(value)
        case .string(let value): try container.encode(value)
        }
    }

    public var description: String {
        switch self {
        case .int(let value): return String(value)
        case .string(let value): return value
        }
    }

    var json: JSONValue {
        switch self {
        case .int(let value): return .number(Double(value))
        case .string(let value): return .string(value)
        }
    }
}

/// One event line of the helper: `{"v": 1, "id": ..., "event": "...", ...fields}`.
public struct HelperEvent: Decodable, Sendable {
    public enum Kind: String, Decodable, Sendable {
        case accepted, progress, frame, result, error, cancelled
    }

    public let version: Int
    public let id: RequestID?
    public let kind: Kind
    /// Every field of the line, `v`, `id` and `event` included.
    public let fields: [String: JSONValue]

    public init(from decoder: Decoder) throws {
        fields = try decoder.singleValueContainer().decode([String: JSONValue].self)
        let keys = try decoder.container(keyedBy: Keys.self)
        version = try keys.decode(Int.self, forKey: .v)
        id = try keys.decodeIfPresent(RequestID.self, forKey: .id)
        kind = try keys.decode(Kind.self, forKey: .event)
    }

    private enum Keys: String, CodingKey { case v, id, event }

    public subscript(key: String) -> JSONValue? { fields[key] }
    /// Whether this event ends its request (`result`, `error` or `cancelled`).
    public var isFinal: Bool { kind == .result || kind == .error || kind == .cancelled }
    // progress
    public var stage: String? { fields["stage"]?.string }
    public var done: Int? { fields["done"]?.int }
    public var total: Int? { fields["total"]?.int }
    // frame
    public var frameIndex: Int? { fields["index"]?.int }
    public var path: String? { fields["path"]?.string }
    // error
    public var code: String? { fields["code"]?.string }
    public var message: String? { fields["message"]?.string }
}

/// What a request can fail with.
public enum StarflowClientError: Error, Equatable, Sendable {
    /// The helper answered with an `error` event.
    case helper(code: String, message: String)
    /// The request was cancelled (`cancel`, `shutdown`, or the helper's stdin closed).
    case cancelled
    /// The helper process exited before answering (crashed or killed); pending requests all fail with this.
    case helperExited(status: Int32)
    /// No helper is running: `start()` was not called, or `stop()` was.
    case notRunning
}
