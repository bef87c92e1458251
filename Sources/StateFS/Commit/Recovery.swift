import CFuse
import Logging

#if canImport(Glibc)
  import Glibc
#endif

/// What a recovery pass found and did.
public struct RecoveryReport: Sendable {
  /// Interrupted commits written again.
  public var rolledForward = 0
  /// Records whose content was incomplete (the file kept its previous version).
  public var dropped = 0
  /// Records whose file no longer exists.
  public var orphaned = 0
  /// Journal files of a live daemon, left alone.
  public var skippedLive = 0
  /// Stale spill and temporary files removed.
  public var removedStale = 0
}

/// A journal that cannot be read or understood; mounting stops rather than risk data.
public struct JournalError: Error, CustomStringConvertible, Sendable {
  public let file: String
  public let problem: String
  public var description: String {
    "journal \(file): \(problem) (run `statefs recover --discard-corrupt DIR` to set it aside as \(file).corrupt)"
  }
}

/// Rolls forward the commits a killed daemon left in its journals, before any
/// request is served (at mount, or by `statefs recover`).
public enum Recovery {
  /// Runs over the private directory `privateDirFd` of the source `sourceFd`.
  /// With `discardCorrupt`, unreadable journals are renamed aside instead of stopping.
  public static func run(
    sourceFd: Int32, privateDirFd: Int32, durable: Bool, discardCorrupt: Bool = false,
    logger: Logger,
    stats: Stats? = nil
  ) throws -> RecoveryReport {
    var report = RecoveryReport()
    let listFd = try Sys.openat(privateDirFd, ".", O_RDONLY | O_DIRECTORY)
    guard let dir = fdopendir(listFd) else {
      Sys.close(listFd)
      throw Errno.current
    }
    defer { closedir(dir) }
    var names: [String] = []
    while let de = readdir(dir) {
      let name = withUnsafeBytes(of: de.pointee.d_name) { raw in
        String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
      }
      names.append(name)
    }
    for name in names.sorted() {
      if name.hasPrefix("spill-") {
        if unlinkat(privateDirFd, name, 0) == 0 { report.removedStale += 1 }
        continue
      }
      guard name.hasPrefix(Journal.prefix), !name.hasSuffix(".corrupt") else { continue }
      let fd: Int32
      do { fd = try Sys.openat(privateDirFd, name, O_RDWR) } catch {
        if discardCorrupt {
          renameat(privateDirFd, name, privateDirFd, name + ".corrupt")
          continue
        }
        throw JournalError(file: ".statefs/\(name)", problem: "cannot open: \(error)")
      }
      defer { Sys.close(fd) }
      // A journal whose owner is alive holds its lock: leave it to its owner.
      if try !Sys.tryFlock(fd, LOCK_EX) {
        report.skippedLive += 1
        continue
      }
      do {
        try recoverOne(
          fd: fd, name: name, sourceFd: sourceFd, privateDirFd: privateDirFd, durable: durable,
          logger: logger, report: &report, stats: stats)
      } catch let e as JournalError {
        if discardCorrupt {
          logger.error(
            "journal set aside", metadata: ["file": "\(e.file)", "problem": "\(e.problem)"])
          renameat(privateDirFd, name, privateDirFd, name + ".corrupt")
          continue
        }
        throw e
      }
      if durable { try? Sys.fsync(fd) }
      unlinkat(privateDirFd, name, 0)
    }
    // Data files of large commits whose journal slot is gone (recovered above, or
    // retired by a daemon that died before deleting them) are stale.
    for name in names where name.hasPrefix("data-") {
      let journal = String(name.dropFirst(5))
      if faccessat(privateDirFd, journal, F_OK, AT_SYMLINK_NOFOLLOW) != 0 {
        if unlinkat(privateDirFd, name, 0) == 0 { report.removedStale += 1 }
      }
    }
    if durable { try? Sys.fsync(privateDirFd) }
    return report
  }

  private static func recoverOne(
    fd: Int32, name: String, sourceFd: Int32, privateDirFd: Int32, durable: Bool, logger: Logger,
    report: inout RecoveryReport,
    stats: Stats?
  ) throws {
    guard let (h, complete) = try readRecord(fd: fd, name: name, logger: logger, report: &report)
    else { return }
    guard complete else {
      report.dropped += 1
      logger.warning(
        "incomplete journal record dropped; the file keeps its previous version",
        metadata: ["journal": "\(name)", "inode": "\(h.inode)"])
      return
    }
    guard let target = openTarget(h, sourceFd: sourceFd) else {
      report.orphaned += 1
      logger.warning(
        "journal record for a file that no longer exists", metadata: ["inode": "\(h.inode)"])
      return
    }
    defer { Sys.close(target) }
    try Sys.flock(target, LOCK_EX)
    defer { Sys.unlock(target) }
    try apply(h, journalFd: fd, target: target, durable: durable, privateDirFd: privateDirFd)
    report.rolledForward += 1
    stats?.recoveries.add(1, ordering: .relaxed)
    logger.notice(
      "interrupted commit rolled forward",
      metadata: [
        "path": "\(pathOf(target))", "inode": "\(h.inode)", "bytes": "\(h.length)",
        "kind": "\(h.kind == .append ? "append" : "replace")",
      ])
  }

  /// Reads the live record of a journal slot file and whether its content is complete;
  /// nil when the slot holds no live record. Throws for a file that is no journal.
  static func readRecord(fd: Int32, name: String, logger: Logger, report: inout RecoveryReport)
    throws
    -> (RecordHeader, Bool)?
  {
    let st = try Sys.fstat(fd)
    if st.st_size == 0 { return nil }
    var head = [UInt8](repeating: 0, count: RecordHeader.size)
    let n: Int
    do {
      n = try head.withUnsafeMutableBytes { (p) throws(Errno) -> Int in
        try Sys.preadFully(fd, p.baseAddress!, RecordHeader.size, 0)
      }
    } catch {
      throw JournalError(file: ".statefs/\(name)", problem: "cannot read: \(error)")
    }
    if n < 8 { return nil }
    guard let h = RecordHeader.decode(head) else {
      // No live record (retired, or never completed its header).
      let tag = head.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
      if tag != 0 && tag != RecordHeader.magic {
        throw JournalError(
          file: ".statefs/\(name)", problem: "unrecognised record header (not a statefs journal?)")
      }
      if tag == RecordHeader.magic {
        report.dropped += 1
        logger.warning("journal record with a bad header dropped", metadata: ["file": "\(name)"])
      }
      return nil
    }
    // Verify the content before touching the target: incomplete means "never happened".
    var sum = Checksum()
    let bytes = Int64(h.contentBytes)
    var complete = Int64(st.st_size) >= Journal.contentOffset + bytes
    if complete {
      let chunk = 1 << 20
      let buf = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 16)
      defer { buf.deallocate() }
      var off: Int64 = 0
      while off < bytes {
        let want = Int(min(Int64(chunk), bytes - off))
        let got = try Sys.preadFully(fd, buf, want, Journal.contentOffset + off)
        if got != want {
          complete = false
          break
        }
        sum.update(UnsafeRawBufferPointer(start: buf, count: got))
        off += Int64(got)
      }
    }
    let sealed = RecordHeader.seal(
      kind: h.kind, inode: h.inode, offset: h.offset, length: h.length, handle: h.handle,
      content: sum.value)
    return (h, complete && sealed == h.checksum)
  }

  /// Writes a verified record into its target (the caller holds LOCK_EX on it), then
  /// retires the record and clears the target's in-flight marker.
  static func apply(
    _ h: RecordHeader, journalFd fd: Int32, target: Int32, durable: Bool, privateDirFd: Int32
  ) throws(Errno) {
    if h.kind == .replaceFromFile {
      guard let name = dataFileName(h, journalFd: fd) else { throw Errno.ioError }
      let data = try Sys.openat(privateDirFd, name, O_RDONLY | O_NOFOLLOW)
      defer { Sys.close(data) }
      guard Int64(try Sys.fstat(data).st_size) == Int64(h.length) else { throw Errno.ioError }
      let copied = try Sys.copyRange(from: data, at: 0, to: target, at: 0, count: Int64(h.length))
      if copied != Int64(h.length) { throw Errno.ioError }
      try Sys.ftruncate(target, Int64(h.length))
    } else {
      let copied = try Sys.copyRange(
        from: fd, at: Journal.contentOffset, to: target, at: Int64(h.offset), count: Int64(h.length)
      )
      if copied != Int64(h.length) { throw Errno.ioError }
      try Sys.ftruncate(target, Int64(h.offset + h.length))
    }
    if durable { try Sys.fsync(target) }
    var zero: UInt64 = 0
    try Sys.pwriteFully(fd, &zero, 8, 0)
    InFlightMarker.clear(target)
    if h.kind == .replaceFromFile, let name = dataFileName(h, journalFd: fd) {
      unlinkat(privateDirFd, name, 0)
    }
  }

  /// The data file a `replaceFromFile` record names.
  static func dataFileName(_ h: RecordHeader, journalFd fd: Int32) -> String? {
    guard h.kind == .replaceFromFile, h.offset > 0, h.offset <= 255 else { return nil }
    var name = [UInt8](repeating: 0, count: Int(h.offset))
    let n =
      (try? name.withUnsafeMutableBytes { (p) throws(Errno) -> Int in
        try Sys.preadFully(fd, p.baseAddress!, p.count, Journal.contentOffset)
      }) ?? 0
    guard n == name.count else { return nil }
    let text = String(decoding: name, as: UTF8.self)
    return text.hasPrefix("data-") && !text.contains("/") ? text : nil
  }

  /// Opens the record's file by its handle, else by a walk of the source tree for its inode.
  private static func openTarget(_ h: RecordHeader, sourceFd: Int32) -> Int32? {
    if !h.handle.isEmpty {
      let fd = h.handle.withUnsafeBytes {
        statefs_open_by_handle(
          sourceFd, $0.baseAddress, Int32(h.handle.count), h.handleType, O_RDWR | O_CLOEXEC)
      }
      if fd >= 0 { return fd }
      if errno == ESTALE || errno == ENOENT { return nil }
    }
    return walk(sourceFd, ino: h.inode, depth: 0)
  }

  private static func walk(_ dirFd: Int32, ino: UInt64, depth: Int) -> Int32? {
    if depth > 64 { return nil }
    guard let fd = try? Sys.openat(dirFd, ".", O_RDONLY | O_DIRECTORY), let dir = fdopendir(fd)
    else { return nil }
    defer { closedir(dir) }
    while let de = readdir(dir) {
      let name = withUnsafeBytes(of: de.pointee.d_name) { raw in Array(raw.prefix { $0 != 0 }) }
      if name == [46] || name == [46, 46] { continue }
      if depth == 0 && name == Array(privateDirectoryName.utf8) { continue }
      let cname = name.map { CChar(bitPattern: $0) } + [0]
      if UInt64(de.pointee.d_ino) == ino && de.pointee.d_type == UInt8(DT_REG) {
        if let f = try? Sys.openat(dirfd(dir), cname, O_RDWR | O_NOFOLLOW) { return f }
      }
      if de.pointee.d_type == UInt8(DT_DIR) {
        if let sub = try? Sys.openat(dirfd(dir), cname, O_RDONLY | O_DIRECTORY | O_NOFOLLOW) {
          defer { Sys.close(sub) }
          if let found = walk(sub, ino: ino, depth: depth + 1) { return found }
        }
      }
    }
    return nil
  }

  static func pathOf(_ fd: Int32) -> String {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink(Sys.procPath(fd), &buf, 4095)
    if n <= 0 { return "fd \(fd)" }
    return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }
}
