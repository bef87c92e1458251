import CFuse
import Logging

#if canImport(Glibc)
  import Glibc
#endif

/// An extended attribute on a backing file naming the journal slot whose record is
/// being written into it. Set before the in-place write and removed after, it lets any
/// daemon that later takes the file's lock see that a writer died mid-commit, and roll
/// that record forward before reading or replacing the file.
public enum InFlightMarker {
  /// The attribute's name (hidden from the mount).
  public static let name = "user.statefs.commit"
  /// Attributes with this prefix belong to statefs and are invisible through the mount.
  public static let reservedPrefix = "user.statefs."

  /// Marks `fd` as being written from the journal file `journal`; false when the
  /// filesystem has no user xattrs.
  @discardableResult
  static func set(_ fd: Int32, journal: String) -> Bool {
    let bytes = Array(journal.utf8)
    return bytes.withUnsafeBytes { fsetxattr(fd, name, $0.baseAddress, $0.count, 0) } == 0
  }

  /// Removes the marker.
  static func clear(_ fd: Int32) {
    _ = fremovexattr(fd, name)
  }

  /// The journal file named by the marker, if any.
  static func read(_ fd: Int32) -> String? {
    var buf = [UInt8](repeating: 0, count: 256)
    let n = fgetxattr(fd, name, &buf, buf.count)
    guard n > 0 else { return nil }
    return String(decoding: buf[0..<n], as: UTF8.self)
  }

  /// Called with the file's lock held (`held` is LOCK_SH or LOCK_EX): if a dead writer
  /// left the file mid-commit, rolls its record forward now. Returns true if it did.
  static func heal(_ fd: Int32, held: Int32, privateDirFd: Int32, durable: Bool, logger: Logger)
    -> Bool
  {
    guard let journal = read(fd) else { return false }
    guard journal.hasPrefix(Journal.prefix), !journal.contains("/") else { return false }
    guard let jfd = try? Sys.openat(privateDirFd, journal, O_RDWR) else {
      // Its journal is gone: someone already recovered it. Drop the stale marker.
      if held == LOCK_EX { clear(fd) }
      return false
    }
    defer { Sys.close(jfd) }
    // A live owner holds its slot's lock (it kept a record it could not complete itself).
    guard (try? Sys.tryFlock(jfd, LOCK_EX)) == true else { return false }
    if held == LOCK_SH { try? Sys.flock(fd, LOCK_EX) }
    defer { if held == LOCK_SH { try? Sys.flock(fd, LOCK_SH) } }
    // Another daemon may have healed it while we waited for LOCK_EX.
    guard read(fd) == journal else { return false }
    var report = RecoveryReport()
    let record: (RecordHeader, Bool)?
    do {
      record = try Recovery.readRecord(fd: jfd, name: journal, logger: logger, report: &report)
    } catch {
      logger.warning(
        "unreadable journal named by an in-flight marker",
        metadata: ["journal": "\(journal)", "error": "\(error)"])
      return false
    }
    guard let (h, complete) = record else {
      // The record was retired: the commit completed; only the marker was left.
      clear(fd)
      return false
    }
    let ino = (try? Sys.fstat(fd)).map { UInt64($0.st_ino) }
    guard complete, ino == h.inode else {
      logger.warning(
        "in-flight marker names an incomplete or foreign record; dropped",
        metadata: [
          "journal": "\(journal)", "complete": "\(complete)", "inode": "\(h.inode)",
          "file_inode": "\(ino ?? 0)",
        ])
      clear(fd)
      return false
    }
    do {
      // The lock stays on `fd` (a reader's may be read-only); the bytes go through a
      // writable descriptor of the same file.
      let wfd = try Sys.reopen(fd, O_RDWR)
      defer { Sys.close(wfd) }
      try Recovery.apply(
        h, journalFd: jfd, target: wfd, durable: durable, privateDirFd: privateDirFd)
    } catch {
      logger.error(
        "rolling forward a dead writer's commit failed",
        metadata: [
          "journal": "\(journal)", "errno": "\(error.rawValue)", "error": "\(error)",
          "path": "\(Recovery.pathOf(fd))",
        ])
      return false
    }
    unlinkat(privateDirFd, journal, 0)
    logger.notice(
      "rolled forward a commit interrupted by a dead writer",
      metadata: [
        "journal": "\(journal)", "inode": "\(h.inode)", "bytes": "\(h.length)",
        "path": "\(Recovery.pathOf(fd))",
      ])
    return true
  }
}
