import CFuse
import Logging
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// Settings of the commit engine.
public struct CommitOptions: Sendable {
  /// fsync file, journal and directory before a commit returns.
  public var durable = false
  /// Buffers and snapshots larger than this go to spill files.
  public var spillThreshold: Int64 = 4 << 20
  /// RAM for all buffers and snapshots together; beyond it everything spills.
  public var memoryLimit: Int64 = 64 << 20
  /// Write-ahead journal (off only in the test that shows what it prevents).
  public var journal = true
  /// How long an open waits for an O_TRUNC handle closed with nothing written.
  public var truncationWait: Double = 0.25

  public init() {}
}

/// Buffers writes per handle, serves snapshot reads, and commits whole versions
/// in place under flock with a write-ahead journal. Knows nothing of FUSE.
public final class CommitEngine: Sendable {
  public let options: CommitOptions
  public let stats: Stats
  let spill: SpillStore
  let journal: Journal
  let logger: Logger
  /// Handles closed once with only their O_TRUNC pending, whose RELEASE is still to come.
  private let awaitingRelease = Mutex<[ObjectIdentifier: OpenFile]>([:])

  /// `privateDirFd` is the daemon's hidden directory in the source filesystem.
  public init(privateDirFd: Int32, options: CommitOptions, stats: Stats, logger: Logger) {
    self.options = options
    self.stats = stats
    self.spill = SpillStore(
      dirFd: privateDirFd, threshold: options.spillThreshold, memoryLimit: options.memoryLimit,
      stats: stats)
    self.journal = Journal(dirFd: privateDirFd, durable: options.durable, enabled: options.journal)
    self.logger = logger
  }

  // MARK: locks

  /// Takes a flock, counting the wait when another holder makes us wait.
  func lock(_ fd: Int32, _ op: Int32) throws(Errno) {
    if try Sys.tryFlock(fd, op) { return }
    var t0 = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t0)
    try Sys.flock(fd, op)
    var t1 = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t1)
    stats.recordLockWait(
      nanos: Int64(t1.tv_sec - t0.tv_sec) * 1_000_000_000 + Int64(t1.tv_nsec - t0.tv_nsec))
  }

  func unlock(_ fd: Int32) { Sys.unlock(fd) }

  /// Captures the committed version of the file open as `fd`, under LOCK_SH.
  /// With `holdIfNoSpace`, a version too large for RAM when the disk has no room for
  /// a copy is read in place instead, and LOCK_SH stays held until `fd` is closed
  /// (writers wait for that reader rather than the read failing).
  func snapshot(of fd: Int32, holdIfNoSpace: Bool = false) throws(Errno) -> Blob {
    try lock(fd, LOCK_SH)
    heal(fd, held: LOCK_SH)
    var keepLock = false
    defer { if !keepLock { unlock(fd) } }
    let st = try Sys.fstat(fd)
    if holdIfNoSpace && Int64(st.st_size) > spill.threshold {
      // A large version is read in place: no copy at open (a copy is made only if this
      // daemon commits a new version while the reader is still open).
      keepLock = true
      stats.snapshots.add(1, ordering: .relaxed)
      return Blob(lockedFile: fd, size: Int64(st.st_size), store: spill)
    }
    let blob = Blob(store: spill)
    do {
      try blob.fill(from: fd, count: Int64(st.st_size))
    } catch {
      guard holdIfNoSpace && (error.rawValue == ENOSPC || error.rawValue == EDQUOT) else {
        throw error
      }
      keepLock = true
      logger.warning(
        "no space for a snapshot copy: reading in place under a held shared lock",
        metadata: ["path": "\(describe(fd))", "bytes": "\(st.st_size)"])
      stats.snapshots.add(1, ordering: .relaxed)
      return Blob(lockedFile: fd, size: Int64(st.st_size), store: spill)
    }
    stats.snapshots.add(1, ordering: .relaxed)
    return blob
  }

  // MARK: handles

  /// Makes the handle for an open of a regular file; `fd` becomes the handle's
  /// (closed with it, or here on failure).
  public func open(
    fd: Int32, inode: UInt64, nodeID: UInt64, flags: Int32, file: FileState, pid: Int32 = 0,
    uid: uid_t = 0
  ) throws(Errno)
    -> OpenFile
  {
    let acc = flags & O_ACCMODE
    let writable = acc != O_RDONLY
    let truncate = writable && (flags & O_TRUNC) != 0
    // O_TRUNC|O_APPEND writes a whole new version: it is not an append of bytes.
    let append = writable && (flags & O_APPEND) != 0 && !truncate
    if !truncate { file.waitForPendingTruncations(timeout: options.truncationWait) }
    var snap: Blob? = nil
    if !truncate && (!append || acc == O_RDWR) {
      do { snap = try snapshot(of: fd, holdIfNoSpace: !writable) } catch {
        Sys.close(fd)
        throw error
      }
    }
    let inPlace = snap?.isInPlace ?? false
    let handle = OpenFile(
      fd: fd, inode: inode, nodeID: nodeID, writable: writable, append: append, file: file,
      readSnapshot: writable || inPlace ? nil : snap, pid: pid, dropsPrivileges: uid != 0)
    if pid != 0 { file.views.withLock { $0[ObjectIdentifier(handle)] = (pid, handle) } }
    if inPlace {
      handle.state.withLock { $0.snapshot = snap }
      file.inPlaceReaders.withLock { $0[ObjectIdentifier(handle)] = handle }
    }
    if writable {
      handle.state.withLock { s in
        s.snapshot = snap
        if truncate || append { s.buffer = Blob(store: spill) }
        s.truncationPending = truncate
      }
    }
    stats.openHandles.add(1, ordering: .relaxed)
    return handle
  }

  /// Reads a handle's own view into `buf`: the version it opened, or once it has
  /// written its buffer (for O_APPEND: the version, then the pending bytes).
  public func read(_ h: OpenFile, offset: Int64, count: Int, into buf: UnsafeMutableRawPointer)
    throws(Errno) -> Int
  {
    if let snap = h.readSnapshot { return try snap.read(into: buf, count: count, offset: offset) }
    return try h.state.withLock { (s: inout OpenFileState) throws(Errno) -> Int in
      if h.append {
        if s.snapshot == nil || s.snapshotStale {
          s.snapshot = try snapshot(of: h.fd)
          s.snapshotStale = false
        }
        let base = s.snapshot!.size
        var done = 0
        if offset < base { done = try s.snapshot!.read(into: buf, count: count, offset: offset) }
        if done < count, let extra = s.buffer {
          let at = offset + Int64(done) - base
          if at >= 0 { done += try extra.read(into: buf + done, count: count - done, offset: at) }
        }
        return done
      }
      guard let blob = s.buffer ?? s.snapshot else { return 0 }
      return try blob.read(into: buf, count: count, offset: offset)
    }
  }

  /// The size of a handle's own view.
  public func viewSize(_ h: OpenFile) -> Int64 {
    if let snap = h.readSnapshot { return snap.size }
    return h.state.withLock { s in
      if h.append { return (s.snapshot?.size ?? 0) + (s.buffer?.size ?? 0) }
      return (s.buffer ?? s.snapshot)?.size ?? 0
    }
  }

  /// Whether a handle holds content not yet committed (written, or an O_TRUNC pending).
  public func hasPendingContent(_ h: OpenFile) -> Bool {
    h.state.withLock { $0.dirty || $0.truncationPending }
  }

  /// fallocate(2) on a handle: mode 0 extends the buffer; KEEP_SIZE alone changes nothing
  /// visible; PUNCH_HOLE|KEEP_SIZE zeroes a range.
  public func fallocate(_ h: OpenFile, mode: Int32, offset: Int64, length: Int64) throws(Errno) {
    guard h.writable, !h.append else { throw Errno.badFile }
    let keepSize: Int32 = 0x01
    let punchHole: Int32 = 0x02
    if mode == keepSize { return }
    if mode == 0 {
      if offset + length > viewSize(h) { try truncate(h, size: offset + length) }
      return
    }
    if mode == keepSize | punchHole {
      let end = min(offset + length, viewSize(h))
      if end <= offset { return }
      let chunk = 1 << 16
      let zeros = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 16)
      defer { zeros.deallocate() }
      zeros.initializeMemory(as: UInt8.self, repeating: 0, count: chunk)
      var at = offset
      while at < end {
        let n = Int(min(Int64(chunk), end - at))
        try write(h, bytes: zeros, count: n, offset: at)
        at += Int64(n)
      }
      return
    }
    throw Errno.notSupported
  }

  /// Buffers a write; nothing reaches the backing file until a commit.
  public func write(
    _ h: OpenFile, bytes: UnsafeRawPointer, count: Int, offset: Int64, owner: UInt64 = 0
  )
    throws(Errno)
  {
    guard h.writable else { throw Errno.badFile }
    try h.state.withLock { (s: inout OpenFileState) throws(Errno) in
      do throws(Errno) {
        try writeLocked(h, &s, bytes: bytes, count: count, offset: offset, owner: owner)
        s.writeError = nil
      } catch {
        s.writeError = error
        throw error
      }
    }
  }

  private func writeLocked(
    _ h: OpenFile, _ s: inout OpenFileState, bytes: UnsafeRawPointer, count: Int, offset: Int64,
    owner: UInt64
  ) throws(Errno) {
    if s.buffer == nil {
      let b = Blob(store: spill)
      if let snap = s.snapshot { try snap.copy(into: b) }
      s.buffer = b
    }
    if h.append {
      try s.buffer!.append(bytes, count: count)
    } else {
      try s.buffer!.write(bytes, count: count, offset: offset)
    }
    s.dirty = true
    s.epochAtWrite = h.file.attrEpoch.load(ordering: .relaxed)
    if !s.writerOwners.contains(owner) { s.writerOwners.append(owner) }
    clearPending(h, &s)
  }

  /// ftruncate(2) on a handle: cuts or extends its buffer.
  public func truncate(_ h: OpenFile, size: Int64) throws(Errno) {
    guard h.writable else { throw Errno.invalid }
    try h.state.withLock { (s: inout OpenFileState) throws(Errno) in
      if h.append {
        // An O_APPEND handle that truncates becomes a whole-content writer of its view.
        throw Errno.notSupported
      }
      if s.buffer == nil {
        let b = Blob(store: spill)
        if let snap = s.snapshot { try snap.copy(into: b) }
        s.buffer = b
      }
      try s.buffer!.truncate(size)
      s.dirty = true
      s.epochAtWrite = h.file.attrEpoch.load(ordering: .relaxed)
      // ftruncate carries no lock owner: the next close() by anyone commits it.
      if !s.writerOwners.contains(0) { s.writerOwners.append(0) }
      clearPending(h, &s)
    }
  }

  private func clearPending(_ h: OpenFile, _ s: inout OpenFileState) {
    if s.countedPending {
      s.countedPending = false
      h.file.pendingTruncations.subtract(1, ordering: .releasing)
      _ = awaitingRelease.withLock { $0.removeValue(forKey: ObjectIdentifier(h)) }
    }
  }

  /// Forgets uncommitted content: the handle goes back to the version it last committed.
  private func discardPending(_ h: OpenFile, _ s: inout OpenFileState) {
    s.dirty = false
    s.truncationPending = false
    s.writerOwners.removeAll()
    clearPending(h, &s)
  }

  /// At shutdown: publish the truncations of handles that were closed but whose
  /// RELEASE never arrived (the program's close() already returned), then delete the
  /// journal slots that hold nothing.
  public func shutdown() {
    let left = awaitingRelease.withLock { Array($0.values) }
    for h in left { _ = release(h) }
    journal.removeIdleSlots()
  }

  /// What a close() (FLUSH) does: commit if the handle wrote since its last commit.
  /// Returns true when a commit happened (the caller invalidates the kernel's caches).
  /// `owner` is the closing process's lock owner (0 if unknown). Returns true when a
  /// commit happened that the kernel's cached attributes do not reflect.
  public func flush(_ h: OpenFile, owner: UInt64 = 0) throws(Errno) -> Bool {
    guard h.writable else { return false }
    return try h.state.withLock { (s: inout OpenFileState) throws(Errno) -> Bool in
      if let e = s.writeError {
        // The program's last write failed: its new version is not whole. Report that at
        // close() and publish nothing, not even the O_TRUNC.
        s.writeError = nil
        discardPending(h, &s)
        throw e
      }
      if s.dirty {
        // A process that did not write (say a child closing its inherited copy at exec)
        // is not the writer finishing: publishing now would show half-written content.
        if owner != 0 && !s.writerOwners.contains(0) && !s.writerOwners.contains(owner) {
          return false
        }
        // The kernel saw every write of this direct_io handle and marks size and times
        // stale itself; its caches need dropping only if attributes were handed out
        // since the last write, or for an append (where the kernel guessed the size).
        let stale = h.append || h.file.attrEpoch.load(ordering: .relaxed) != s.epochAtWrite
        return try commitLocked(h, &s, sync: false) && stale
      }
      if s.truncationPending && !s.countedPending {
        // Maybe `echo x > f`'s dup2 close, with the write still to come: publish at
        // release, and let other opens wait for it meanwhile.
        s.countedPending = true
        h.file.pendingTruncations.add(1, ordering: .releasing)
        awaitingRelease.withLock { $0[ObjectIdentifier(h)] = h }
      }
      return false
    }
  }

  /// fsync/fdatasync: commit pending content durably.
  public func fsync(_ h: OpenFile) throws(Errno) -> Bool {
    guard h.writable else {
      try Sys.fsync(h.fd)
      return false
    }
    return try h.state.withLock { (s: inout OpenFileState) throws(Errno) -> Bool in
      if s.dirty || s.truncationPending { return try commitLocked(h, &s, sync: true) }
      try Sys.fsync(h.fd)
      return false
    }
  }

  /// The last close: commit whatever is still pending (errors can only be logged).
  public func release(_ h: OpenFile) -> Bool {
    defer { stats.openHandles.subtract(1, ordering: .relaxed) }
    _ = h.file.views.withLock { $0.removeValue(forKey: ObjectIdentifier(h)) }
    _ = h.file.inPlaceReaders.withLock { $0.removeValue(forKey: ObjectIdentifier(h)) }
    guard h.writable else { return false }
    return h.state.withLock { s -> Bool in
      defer { clearPending(h, &s) }
      if s.writeError != nil { return false }
      if s.dirty || s.truncationPending {
        return (try? commitLocked(h, &s, sync: false)) ?? false
      }
      return false
    }
  }

  private func commitLocked(_ h: OpenFile, _ s: inout OpenFileState, sync: Bool) throws(Errno)
    -> Bool
  {
    let content = s.buffer ?? Blob(store: spill)
    s.dirty = false
    s.writerOwners.removeAll()
    s.truncationPending = false
    clearPending(h, &s)
    do {
      try commitContent(
        fd: h.fd, inode: h.inode, content: content, append: h.append, sync: sync,
        dropPrivileges: h.dropsPrivileges, file: h.file)
    } catch {
      stats.commitFailures.add(1, ordering: .relaxed)
      logger.error(
        "commit failed",
        metadata: [
          "inode": "\(h.inode)", "errno": "\(error.rawValue)", "error": "\(error)",
          "path": "\(describe(h.fd))",
        ]
      )
      throw error
    }
    if h.append {
      s.buffer = Blob(store: spill)
      s.snapshotStale = true
    } else {
      s.snapshot = nil
    }
    return true
  }

  /// Writes one whole version (or one append) into the file open as `fd`, under LOCK_EX.
  func commitContent(
    fd: Int32, inode: UInt64, content: Blob, append: Bool, sync: Bool, dropPrivileges: Bool = false,
    file: FileState? = nil
  )
    throws(Errno)
  {
    if let file { detachInPlaceReaders(file) }
    try lock(fd, LOCK_EX)
    defer { unlock(fd) }
    heal(fd, held: LOCK_EX)
    let st = try Sys.fstat(fd)
    let size = Int64(st.st_size)
    if dropPrivileges { dropPrivilegeBits(fd, st) }
    let offset: Int64 = append ? size : 0
    let length = content.size
    // Reserve the blocks first: a full disk then fails here, before the file is touched.
    // Rewriting within the current size reuses blocks the file already has.
    if length > 0 && (append || length > size) {
      do { try Sys.fallocate(fd, statefs_FALLOC_FL_KEEP_SIZE, offset, length) } catch {
        if error.rawValue != EOPNOTSUPP && error.rawValue != ENOSYS { throw error }
      }
    }
    let slot = try journal.begin(
      target: fd, inode: inode, kind: append ? .append : .replace, offset: offset, content: content)
    let marked = slot.map { InFlightMarker.set(fd, journal: journal.fileName($0)) } ?? false
    do {
      try content.writeAll(to: fd, at: offset)
      if !append { try Sys.ftruncate(fd, length) }
      if marked { InFlightMarker.clear(fd) }
    } catch {
      // The file may now be half written: write it whole once more, and if that fails
      // too, keep the journal record so the next mount (or `statefs recover`) completes it.
      do {
        try content.writeAll(to: fd, at: offset)
        if !append { try Sys.ftruncate(fd, length) }
      } catch {
        journal.abandon(slot)
        throw error
      }
    }
    defer { journal.retire(slot) }
    if sync || options.durable { try Sys.fsync(fd) }
    stats.commits.add(1, ordering: .relaxed)
    stats.bytesCommitted.add(length, ordering: .relaxed)
  }

  /// Rolls forward a commit that a dead daemon left half done in this file.
  private func heal(_ fd: Int32, held: Int32) {
    guard options.journal else { return }
    if InFlightMarker.heal(
      fd, held: held, privateDirFd: spill.dirFd, durable: options.durable, logger: logger)
    {
      stats.recoveries.add(1, ordering: .relaxed)
    }
  }

  /// What the kernel leaves to us under FUSE_HANDLE_KILLPRIV_V2: a write or truncate
  /// by an unprivileged user clears setuid, setgid (with group execute) and capabilities.
  func dropPrivilegeBits(_ fd: Int32, _ st: stat) {
    let mode = st.st_mode
    if mode & S_ISUID != 0 || (mode & S_ISGID != 0 && mode & S_IXGRP != 0) {
      _ = fchmod(fd, mode & 0o7777 & ~(S_ISUID | S_ISGID))
    }
    _ = fremovexattr(fd, "security.capability")
  }

  /// Gives every reader of `file` that reads a large version in place its own copy and
  /// drops its LOCK_SH, so this daemon's commit need not wait for it to close. A reader
  /// whose copy fails (no space) stays in place, and the commit waits for it.
  func detachInPlaceReaders(_ file: FileState) {
    let readers = file.inPlaceReaders.withLock { Array($0.values) }
    for r in readers {
      let detached = r.state.withLock { s -> Bool in
        guard let current = s.snapshot, current.isInPlace else { return true }
        let copy = Blob(store: spill)
        do throws(Errno) { try copy.fill(from: r.fd, count: current.size) } catch {
          logger.warning(
            "no space to copy an open reader's version: the commit waits for it to close",
            metadata: ["path": "\(describe(r.fd))", "errno": "\(error.rawValue)"])
          return false
        }
        s.snapshot = copy
        unlock(r.fd)
        return true
      }
      if detached {
        _ = file.inPlaceReaders.withLock { $0.removeValue(forKey: ObjectIdentifier(r)) }
      }
    }
  }

  /// truncate(2) by path: committed at once under LOCK_EX.
  public func truncateFile(
    fd: Int32, size: Int64, dropPrivileges: Bool = false, file: FileState? = nil
  )
    throws(Errno)
  {
    if let file { detachInPlaceReaders(file) }
    try lock(fd, LOCK_EX)
    defer { unlock(fd) }
    heal(fd, held: LOCK_EX)
    if dropPrivileges, let st = try? Sys.fstat(fd) { dropPrivilegeBits(fd, st) }
    try Sys.ftruncate(fd, size)
    if options.durable { try Sys.fsync(fd) }
    stats.commits.add(1, ordering: .relaxed)
  }

  /// A readable name for a descriptor in logs.
  func describe(_ fd: Int32) -> String {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink(Sys.procPath(fd), &buf, 4095)
    if n <= 0 { return "fd \(fd)" }
    return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }
}
