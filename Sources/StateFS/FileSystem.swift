import CFuse
import Logging
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// Settings of one mounted statefs that the operations consult.
public struct FileSystemOptions: Sendable {
  /// Every write fails with EROFS.
  public var readOnly = false
  /// How long the kernel may cache entries and attributes, in seconds.
  public var cacheTimeout: Double = 1.0
  /// Mount identity shown by `statefs status`.
  public var sourcePath = ""
  public var mountpoint = ""
  public var optionString = ""

  public init() {}
}

/// The name of the daemon's private directory at the source root, hidden from the mount.
public let privateDirectoryName = ".statefs"

/// The statefs filesystem: the FUSE operations over a source directory, with
/// regular files served through the commit engine.
public final class FileSystem: Sendable {
  public let table: InodeTable
  public let engine: CommitEngine
  public let stats: Stats
  public let options: FileSystemOptions
  let logger: Logger
  let started: Int64
  private let sessionBits = Atomic<UInt>(0)

  /// `rootFd`: `O_PATH` descriptor of the source directory (the table owns it).
  public init(
    rootFd: Int32, engine: CommitEngine, stats: Stats, options: FileSystemOptions, logger: Logger
  )
    throws(Errno)
  {
    self.table = try InodeTable(rootFd: rootFd)
    self.engine = engine
    self.stats = stats
    self.options = options
    self.logger = logger
    self.started = Int64(time(nil))
  }

  /// Remembers the session so commits can invalidate the kernel's caches.
  func attach(session: OpaquePointer) {
    sessionBits.store(
      UInt(bitPattern: Int(bitPattern: UnsafeRawPointer(session))), ordering: .releasing)
  }

  /// Drops the kernel's cached attributes and data of a node after a commit.
  func invalidate(_ nodeID: UInt64) {
    let bits = sessionBits.load(ordering: .acquiring)
    guard bits != 0, let se = OpaquePointer(bitPattern: bits) else { return }
    _ = fuse_lowlevel_notify_inval_inode(se, fuse_ino_t(nodeID), 0, 0)
  }

  /// Whether `name` in `parent` is the private directory (hidden and untouchable).
  @inline(__always)
  func isHidden(_ parent: UInt64, _ name: UnsafePointer<CChar>) -> Bool {
    parent == UInt64(FUSE_ROOT_ID) && strcmp(name, privateDirectoryName) == 0
  }

  /// An entry reply for a node whose stat is `st`.
  func entryParam(_ node: Node, _ st: stat) -> fuse_entry_param {
    node.file.attributesServed()
    var e = fuse_entry_param()
    e.ino = fuse_ino_t(node.id)
    e.generation = 0
    e.attr = st
    e.attr_timeout = options.cacheTimeout
    e.entry_timeout = options.cacheTimeout
    return e
  }

  /// Looks `name` up under `parent` and adds a kernel lookup reference.
  func lookupEntry(_ parent: Node, _ name: UnsafePointer<CChar>) throws(Errno) -> fuse_entry_param {
    let fd = try Sys.openat(parent.fd, name, LinuxFlags.path | O_NOFOLLOW)
    let st: stat
    do { st = try Sys.fstat(fd) } catch {
      Sys.close(fd)
      throw error
    }
    let node = table.lookup(fd: fd, st: st)
    return entryParam(node, st)
  }

  /// Gives a new inode the caller's ownership (the daemon creates everything as root),
  /// with the group of a setgid parent as a local filesystem would.
  func chownToCaller(_ parent: Node, _ name: UnsafePointer<CChar>, uid: uid_t, gid: gid_t)
    throws(Errno)
  {
    if uid == 0 && gid == 0 { return }
    // Only a daemon running as root can give files away; otherwise they are the
    // daemon user's, as on any FUSE filesystem a user mounted.
    if geteuid() != 0 { return }
    let pst = try Sys.fstat(parent.fd)
    let group = (pst.st_mode & S_ISGID) != 0 ? pst.st_gid : gid
    _ = try retrying { fchownat(parent.fd, name, uid, group, AT_SYMLINK_NOFOLLOW) }
  }

  /// With the durable option, makes a namespace change in `dir` survive power loss.
  func syncDirectory(_ dir: Node) {
    guard engine.options.durable else { return }
    if let fd = try? Sys.openat(dir.fd, ".", O_RDONLY | O_DIRECTORY) {
      try? Sys.fsync(fd)
      Sys.close(fd)
    }
  }

  /// Human-readable status of this mount as JSON (served as a virtual xattr on the root).
  public func statusJSON() -> String {
    var fields: [String] = [
      "\"source\": \(jsonString(options.sourcePath))",
      "\"mountpoint\": \(jsonString(options.mountpoint))",
      "\"options\": \(jsonString(options.optionString))",
      "\"pid\": \(getpid())",
      "\"started\": \(started)",
      "\"uptime_s\": \(Int64(time(nil)) - started)",
      "\"nodes\": \(table.count)",
    ]
    for (k, v) in stats.snapshot() { fields.append("\"\(k)\": \(v)") }
    return "{" + fields.joined(separator: ", ") + "}"
  }
}

/// A JSON string literal.
func jsonString(_ s: String) -> String {
  var out = "\""
  for u in s.unicodeScalars {
    switch u {
    case "\"": out += "\\\""
    case "\\": out += "\\\\"
    case "\n": out += "\\n"
    case "\t": out += "\\t"
    default:
      if u.value < 0x20 {
        out +=
          "\\u" + String(repeating: "0", count: 4 - String(u.value, radix: 16).count)
          + String(u.value, radix: 16)
      } else {
        out.unicodeScalars.append(u)
      }
    }
  }
  return out + "\""
}
