#if canImport(Glibc)
  import Glibc
#endif

/// The `-o` options of a statefs mount, split into what libfuse mounts with and
/// what statefs itself uses.
public struct MountOptions: Sendable, Equatable {
  /// Options handed to libfuse / the kernel mount, in order.
  public var fuse: [String] = []
  public var allowOther = false
  public var readOnly = false
  public var durable = false
  public var journal = true
  public var spillThreshold: Int64 = 4 << 20
  public var memoryLimit: Int64 = 64 << 20
  public var logPath: String?
  public var logLevel: String?
  public var threads = 64
  public var cacheTimeout = 1.0
  public var fsname: String?

  /// FUSE and kernel mount options passed through as they are.
  static let passThrough: Set<String> = [
    "allow_other", "allow_root", "default_permissions", "auto_unmount", "ro", "rw", "nosuid",
    "suid",
    "nodev", "dev", "noexec", "exec", "noatime", "atime", "nodiratime", "diratime", "relatime",
    "norelatime",
    "strictatime", "lazytime", "nolazytime", "sync", "async", "dirsync",
  ]
  /// Options that belong to mount(8) or fstab, not to the filesystem.
  static let mountOnly: Set<String> = [
    "nofail", "_netdev", "auto", "noauto", "user", "users", "defaults", "owner", "group", "nouser",
  ]

  public init() {}

  /// Parses comma-separated option lists; throws a one-line message naming a bad option.
  public static func parse(_ lists: [String]) throws(UsageError) -> MountOptions {
    var o = MountOptions()
    for list in lists {
      for raw in list.split(separator: ",", omittingEmptySubsequences: true) {
        let item = String(raw)
        let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
        let key = parts[0]
        let value = parts.count > 1 ? parts[1] : nil
        func need() throws(UsageError) -> String {
          guard let v = value, !v.isEmpty else {
            throw UsageError("mount option '\(key)' needs a value (\(key)=...)")
          }
          return v
        }
        if passThrough.contains(key) && value == nil {
          switch key {
          case "ro": o.readOnly = true
          case "rw": o.readOnly = false
          case "allow_other": o.allowOther = true
          default: break
          }
          if key != "ro" && key != "rw" && !o.fuse.contains(key) { o.fuse.append(key) }
          continue
        }
        if mountOnly.contains(key) || key.hasPrefix("x-") || key == "comment" { continue }
        switch key {
        case "fsname": o.fsname = try need()
        case "subtype": _ = try need()  // always "statefs"
        case "durable": o.durable = true
        case "nodurable": o.durable = false
        case "spill_threshold": o.spillThreshold = try parseSize(try need(), key: key)
        case "memory_limit": o.memoryLimit = try parseSize(try need(), key: key)
        case "log": o.logPath = try need()
        case "log_level":
          let v = try need()
          guard ["trace", "debug", "info", "notice", "warning", "error", "critical"].contains(v)
          else {
            throw UsageError(
              "mount option log_level=\(v): expected trace, debug, info, notice, warning, error or critical"
            )
          }
          o.logLevel = v
        case "threads":
          guard let n = Int(try need()), n >= 1, n <= 1024 else {
            throw UsageError(
              "mount option threads=\(value ?? ""): expected a number from 1 to 1024")
          }
          o.threads = n
        case "cache_timeout":
          guard let t = Double(try need()), t >= 0, t <= 3600 else {
            throw UsageError(
              "mount option cache_timeout=\(value ?? ""): expected seconds from 0 to 3600")
          }
          o.cacheTimeout = t
        case "statefs_test_no_journal": o.journal = false
        case "max_read", "blksize", "uid", "gid", "user_id", "group_id", "rootmode", "fd":
          // Set by mount helpers; the kernel values come from the daemon itself.
          continue
        default:
          throw UsageError("unknown mount option '\(item)'")
        }
      }
    }
    // The daemon runs as root: the kernel must check permissions for every caller.
    if !o.fuse.contains("default_permissions") { o.fuse.append("default_permissions") }
    return o
  }

  /// The option string for libfuse.
  public func fuseOptionString(source: String) -> String {
    var items = fuse
    if readOnly { items.append("ro") }
    items.append("fsname=" + escape(fsname ?? source))
    items.append("subtype=statefs")
    return items.joined(separator: ",")
  }

  /// The options as a user would write them (for status).
  public func describe() -> String {
    var items = fuse
    if readOnly { items.append("ro") }
    if durable { items.append("durable") }
    if spillThreshold != 4 << 20 { items.append("spill_threshold=\(spillThreshold)") }
    if memoryLimit != 64 << 20 { items.append("memory_limit=\(memoryLimit)") }
    if !journal { items.append("statefs_test_no_journal") }
    return items.joined(separator: ",")
  }

  private func escape(_ s: String) -> String {
    s.replacingAll(",", with: "\\,")
  }

  static func parseSize(_ s: String, key: String) throws(UsageError) -> Int64 {
    var digits = s
    var mult: Int64 = 1
    if let last = s.last, "kKmMgG".contains(last) {
      digits = String(s.dropLast())
      mult = "kK".contains(last) ? 1 << 10 : "mM".contains(last) ? 1 << 20 : 1 << 30
    }
    guard let n = Int64(digits), n >= 0 else {
      throw UsageError("mount option \(key)=\(s): expected a size such as 4M, 512K or 1048576")
    }
    return n * mult
  }
}

extension String {
  func replacingAll(_ what: Character, with: String) -> String {
    var out = ""
    for c in self { if c == what { out += with } else { out.append(c) } }
    return out
  }
}

/// A problem with what the user typed: reported as one line, exit status 2.
public struct UsageError: Error, CustomStringConvertible, Sendable {
  public let description: String
  public init(_ message: String) { description = message }
}
