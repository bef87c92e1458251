// swift-tools-version: 6.0
import PackageDescription

let package = Package(
  name: "statefs",
  platforms: [.macOS(.v15)],
  products: [
    .executable(name: "statefs", targets: ["statefs"]),
    .library(name: "StateFS", targets: ["StateFS"]),
  ],
  dependencies: [
    .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
  ],
  targets: [
    .systemLibrary(
      name: "CFuse",
      pkgConfig: "fuse3",
      providers: [.apt(["libfuse3-dev"])]
    ),
    .target(
      name: "StateFS",
      dependencies: [
        "CFuse",
        .product(name: "Logging", package: "swift-log"),
      ],
      swiftSettings: [.swiftLanguageMode(.v6)]
    ),
    .executableTarget(
      name: "statefs",
      dependencies: [
        "StateFS",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
        .product(name: "Logging", package: "swift-log"),
      ],
      swiftSettings: [.swiftLanguageMode(.v6)]
    ),
    .testTarget(
      name: "StateFSTests",
      dependencies: ["StateFS"],
      swiftSettings: [.swiftLanguageMode(.v6)]
    ),
  ]
)
