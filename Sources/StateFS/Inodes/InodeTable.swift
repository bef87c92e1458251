import CFuse
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// One backing inode the kernel knows: an `O_PATH` descriptor and a lookup count.
public final class Node: Sendable {
  /// The id the kernel uses for this node (`fuse_ino_t`).
  public let id: UInt64
  /// `O_PATH | O_NOFOLLOW` descriptor of the backing inode; closed when the node dies.
  public let fd: Int32
  public let dev: UInt64
  public let ino: UInt64
  /// The file type bits (`S_IFMT`) at lookup.
  public let type: mode_t
  /// Commit coordination shared by this daemon's handles on the file.
  public let file = FileState()

  init(id: UInt64, fd: Int32, dev: UInt64, ino: UInt64, type: mode_t) {
    self.id = id
    self.fd = fd
    self.dev = dev
    self.ino = ino
    self.type = type
  }

  deinit { Sys.close(fd) }

  var isRegular: Bool { type == S_IFREG }
  var isDirectory: Bool { type == S_IFDIR }
}

/// Identity of a backing inode.
struct InodeKey: Hashable {
  let dev: UInt64
  let ino: UInt64
}

/// The kernel-visible nodes, with lookup counts kept as libfuse's passthrough
/// examples do: +1 per entry handed to the kernel, -n per forget, gone at zero.
/// Lock order: the table mutex is a leaf lock; nothing else is taken inside it.
public final class InodeTable: Sendable {
  private struct Entry {
    let node: Node
    var lookups: UInt64
  }

  private struct State: ~Copyable {
    var byID: [UInt64: Entry] = [:]
    var byKey: [InodeKey: UInt64] = [:]
    var nextID: UInt64 = 2
  }

  private let state = Mutex(State())
  /// The source directory's node (kernel id 1, never forgotten).
  public let root: Node

  /// `rootFd` is an `O_PATH` descriptor of the source directory; the table owns it.
  public init(rootFd: Int32) throws(Errno) {
    let st = try Sys.fstat(rootFd)
    root = Node(
      id: UInt64(FUSE_ROOT_ID), fd: rootFd, dev: UInt64(st.st_dev), ino: UInt64(st.st_ino),
      type: st.st_mode & S_IFMT)
  }

  /// The node for a kernel id, or nil when the kernel sent an id it was never given.
  public func node(_ id: UInt64) -> Node? {
    if id == UInt64(FUSE_ROOT_ID) { return root }
    return state.withLock { $0.byID[id]?.node }
  }

  /// Adds one lookup for the inode open as `fd` (whose stat is `st`): the existing
  /// node if known (and `fd` is closed), else a new node owning `fd`.
  public func lookup(fd: Int32, st: stat) -> Node {
    let key = InodeKey(dev: UInt64(st.st_dev), ino: UInt64(st.st_ino))
    if key.dev == root.dev && key.ino == root.ino {
      Sys.close(fd)
      return root
    }
    let (node, duplicate) = state.withLock { s -> (Node, Bool) in
      if let id = s.byKey[key], var e = s.byID[id] {
        e.lookups += 1
        s.byID[id] = e
        return (e.node, true)
      }
      let id = s.nextID
      s.nextID += 1
      let n = Node(id: id, fd: fd, dev: key.dev, ino: key.ino, type: st.st_mode & S_IFMT)
      s.byID[id] = Entry(node: n, lookups: 1)
      s.byKey[key] = id
      return (n, false)
    }
    if duplicate { Sys.close(fd) }
    return node
  }

  /// Drops `count` lookups; the node dies when none are left.
  public func forget(_ id: UInt64, _ count: UInt64) {
    if id == UInt64(FUSE_ROOT_ID) { return }
    let dead: Node? = state.withLock { s in
      guard var e = s.byID[id] else { return nil }
      if e.lookups <= count {
        s.byID[id] = nil
        let key = InodeKey(dev: e.node.dev, ino: e.node.ino)
        if s.byKey[key] == id { s.byKey[key] = nil }
        return e.node
      }
      e.lookups -= count
      s.byID[id] = e
      return nil
    }
    _ = dead  // closed by deinit outside the lock
  }

  /// How many nodes besides the root are alive (for tests and status).
  public var count: Int { state.withLock { $0.byID.count } }
}
