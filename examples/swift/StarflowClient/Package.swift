// swift-tools-version:5.9
// A client for `starflow-mlx helper`: Foundation only, no outside packages.
import PackageDescription

let package = Package(
    name: "StarflowClient",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "StarflowClient", targets: ["StarflowClient"]),
        .executable(name: "starflow-client-demo", targets: ["starflow-client-demo"]),
    ],
    targets: [
        .target(name: "StarflowClient"),
        .executableTarget(name: "starflow-client-demo", dependencies: ["StarflowClient"]),
        .testTarget(name: "StarflowClientTests", dependencies: ["StarflowClient"]),
    ]
)
