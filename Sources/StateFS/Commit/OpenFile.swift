import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// State shared by every handle this daemon has open on one backing file.
public final class FileState: Sendable {
  /// Handles opened with O_TRUNC that were closed once (a FLUSH) with nothing
  /// written yet: their truncation is still to be published.
  let pendingTruncations = Atomic<Int>(0)

  /// Read-only handles serving a large version in place under a held LOCK_SH; a commit
  /// by this daemon first gives each its own copy, so the lock can go.
  let inPlaceReaders = Mutex<[ObjectIdentifier: OpenFile]>([:])

  /// Handles open on the file, with the process (thread) id that opened each.
  let views = Mutex<[ObjectIdentifier: (pid: Int32, handle: OpenFile)]>([:])

  /// Counts attribute replies to the kernel for this file: a commit whose writes the
  /// kernel saw need not drop its cached attributes unless some were handed out since.
  public let attrEpoch = Atomic<UInt64>(0)

  public init() {}

  /// Notes that the kernel was just given this file's attributes.
  public func attributesServed() { attrEpoch.add(1, ordering: .relaxed) }

  /// A handle that `pid` opened (a writable one first), for showing that process its own size.
  public func handle(openedBy pid: Int32) -> OpenFile? {
    views.withLock { v in
      let mine = v.values.filter { $0.pid == pid }.map(\.handle)
      return mine.first { $0.writable } ?? mine.first
    }
  }

  /// Waits up to `timeout` seconds for pending truncations to be written or released,
  /// so an open right after `: > f` sees the empty file.
  func waitForPendingTruncations(timeout: Double) {
    if pendingTruncations.load(ordering: .acquiring) == 0 { return }
    var waited: Double = 0
    var step: UInt32 = 50
    while pendingTruncations.load(ordering: .acquiring) > 0 && waited < timeout {
      usleep(step)
      waited += Double(step) / 1e6
      step = min(step * 2, 5000)
    }
  }
}

/// Mutable part of an open handle, guarded by the handle's mutex.
struct OpenFileState: ~Copyable {
  /// The committed version captured at open (reads of read-only handles, base of writers).
  var snapshot: Blob?
  /// The handle's private content: the whole new version, or for O_APPEND the bytes to append.
  var buffer: Blob?
  /// Written since the last commit.
  var dirty = false
  /// `FileState.attrEpoch` at the handle's last write.
  var epochAtWrite: UInt64 = 0
  /// The lock owners (one per process's file table) that wrote since the last commit;
  /// a close() by any other process (a child inheriting the descriptor) commits nothing.
  var writerOwners: [UInt64] = []
  /// Opened with O_TRUNC and the truncation not yet committed.
  var truncationPending = false
  /// Counted in `FileState.pendingTruncations`.
  var countedPending = false
  /// The last write failed (say ENOSPC): the close() reports it and publishes nothing.
  var writeError: Errno?
  /// The snapshot no longer matches what this handle committed (after an append).
  var snapshotStale = false
}

/// One open() of a regular file through the mount: its backing descriptor and its
/// private buffer or snapshot.
public final class OpenFile: Sendable {
  /// The backing file, opened O_RDONLY or O_RDWR (never O_TRUNC/O_APPEND).
  public let fd: Int32
  /// The backing inode number (for the journal and logs).
  public let inode: UInt64
  /// The kernel's node id, for invalidations.
  public let nodeID: UInt64
  public let writable: Bool
  public let append: Bool
  public let file: FileState
  /// The process (thread) id that opened the handle.
  public let pid: Int32
  /// Opened by an unprivileged user: commits clear setuid/setgid bits and file
  /// capabilities, as a local filesystem does when such a user writes.
  public let dropsPrivileges: Bool
  /// A read-only handle's version, fixed for its whole life (read without locking).
  let readSnapshot: Blob?
  let state: Mutex<OpenFileState>

  init(
    fd: Int32, inode: UInt64, nodeID: UInt64, writable: Bool, append: Bool, file: FileState,
    readSnapshot: Blob?, pid: Int32, dropsPrivileges: Bool = false
  ) {
    self.pid = pid
    self.dropsPrivileges = dropsPrivileges
    self.readSnapshot = readSnapshot
    self.fd = fd
    self.inode = inode
    self.nodeID = nodeID
    self.writable = writable
    self.append = append
    self.file = file
    self.state = Mutex(OpenFileState())
  }

  deinit { Sys.close(fd) }
}
