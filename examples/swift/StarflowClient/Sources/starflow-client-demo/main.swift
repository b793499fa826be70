// starflow-client-demo PROMPT OUT_DIR [PYTHON]: one clip from the helper, with its progress and frames shown.
import Foundation
import StarflowClient

let arguments = CommandLine.arguments
guard arguments.count >= 3 else {
    FileHandle.standardError.write("usage: starflow-client-demo PROMPT OUT_DIR [PYTHON]\n".data(using: .utf8)!)
    exit(2)
}
let helper = StarflowHelper(.python(arguments.count > 3 ? arguments[3] : "python3"))
do {
    try helper.start()
    let hello = try await helper.call("hello")
    print("helper \(hello["version"]?.string ?? "?") (protocol \(hello["protocol"]?.int ?? 0)), mlx \(hello["mlx"]?.string ?? "?")")
    _ = try await helper.call("load")
    let job = helper.stream("generate", ["prompt": .string(arguments[1]), "out_dir": .string(arguments[2])])
    for try await event in job.events {
        switch event.kind {
        case .progress: print("\(event.stage ?? "?") \(event.done ?? 0)/\(event.total ?? 0)")
        case .frame: print("frame \(event.frameIndex ?? 0): \(event.path ?? "")")
        case .result: print("wrote \(event.path ?? "")")
        default: break
        }
    }
    helper.stop()
} catch {
    FileHandle.standardError.write("error: \(error)\n".data(using: .utf8)!)
    helper.stop()
    exit(1)
}
