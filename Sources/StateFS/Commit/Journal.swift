import CFuse
import Logging
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// What a journal record does to its target when rolled forward.
enum JournalKind: UInt32 {
  /// Replace the whole content.
  case replace = 1
  /// Write the content at an offset and cut the file there (an append).
  case append = 2
  /// Replace the whole content with a data file in the private directory, whose name
  /// the record holds (large commits: their spill file is linked, not copied).
  case replaceFromFile = 3
}

extension RecordHeader {
  /// Bytes of the record's own content area: the new content, or the data file's name.
  var contentBytes: UInt64 { kind == .replaceFromFile ? offset : length }
}

/// A 64-bit checksum over a byte stream, fed in chunks whose sizes are multiples of 8
/// (except the last).
struct Checksum {
  private(set) var value: UInt64 = 0x9E37_79B9_7F4A_7C15

  mutating func update(_ bytes: UnsafeRawBufferPointer) {
    var h = value
    let words = bytes.count / 8
    if let base = bytes.baseAddress {
      for i in 0..<words {
        let w = base.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)
        h = (h ^ w) &* 0x100_0000_01B3
        h = (h << 31) | (h >> 33)
      }
      for i in (words * 8)..<bytes.count {
        h = (h ^ UInt64(base.load(fromByteOffset: i, as: UInt8.self))) &* 0x100_0000_01B3
      }
    }
    value = h
  }
}

/// The fixed-size head of a journal record; the content follows at `Journal.contentOffset`.
struct RecordHeader {
  static let magic: UInt64 = 0x314A_5346_4554_4154  // "TATEFSJ1" little-endian-ish tag
  static let size = 256
  var kind: JournalKind
  var sequence: UInt64
  var inode: UInt64
  var offset: UInt64
  var length: UInt64
  var handleType: Int32
  var handle: [UInt8]
  var checksum: UInt64

  /// The bytes written to disk.
  func encode() -> [UInt8] {
    var out = [UInt8](repeating: 0, count: RecordHeader.size)
    out.withUnsafeMutableBytes { p in
      p.storeBytes(of: RecordHeader.magic, toByteOffset: 0, as: UInt64.self)
      p.storeBytes(of: kind.rawValue, toByteOffset: 8, as: UInt32.self)
      p.storeBytes(of: UInt32(handle.count), toByteOffset: 12, as: UInt32.self)
      p.storeBytes(of: sequence, toByteOffset: 16, as: UInt64.self)
      p.storeBytes(of: inode, toByteOffset: 24, as: UInt64.self)
      p.storeBytes(of: offset, toByteOffset: 32, as: UInt64.self)
      p.storeBytes(of: length, toByteOffset: 40, as: UInt64.self)
      p.storeBytes(of: handleType, toByteOffset: 48, as: Int32.self)
      p.storeBytes(of: checksum, toByteOffset: 56, as: UInt64.self)
      for (i, b) in handle.enumerated() { p[64 + i] = b }
    }
    return out
  }

  /// Parses a header; nil when the slot holds no live record.
  static func decode(_ bytes: [UInt8]) -> RecordHeader? {
    guard bytes.count >= size else { return nil }
    return bytes.withUnsafeBytes { p -> RecordHeader? in
      guard p.loadUnaligned(fromByteOffset: 0, as: UInt64.self) == magic else { return nil }
      guard let kind = JournalKind(rawValue: p.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
      else { return nil }
      let hlen = Int(p.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
      guard hlen <= 128 else { return nil }
      return RecordHeader(
        kind: kind,
        sequence: p.loadUnaligned(fromByteOffset: 16, as: UInt64.self),
        inode: p.loadUnaligned(fromByteOffset: 24, as: UInt64.self),
        offset: p.loadUnaligned(fromByteOffset: 32, as: UInt64.self),
        length: p.loadUnaligned(fromByteOffset: 40, as: UInt64.self),
        handleType: p.loadUnaligned(fromByteOffset: 48, as: Int32.self),
        handle: Array(p[64..<(64 + hlen)]),
        checksum: p.loadUnaligned(fromByteOffset: 56, as: UInt64.self))
    }
  }

  /// The checksum over the identifying fields and the content's checksum.
  static func seal(
    kind: JournalKind, inode: UInt64, offset: UInt64, length: UInt64, handle: [UInt8],
    content: UInt64
  )
    -> UInt64
  {
    var c = Checksum()
    let fields: [UInt64] = [
      UInt64(kind.rawValue), inode, offset, length, content, UInt64(handle.count),
    ]
    fields.withUnsafeBytes { c.update($0) }
    handle.withUnsafeBytes { c.update($0) }
    return c.value
  }
}

/// A journal slot in use by one commit.
struct JournalSlot {
  let index: Int
  let fd: Int32
  /// Bytes of the last record written into the slot (header and content).
  var recordBytes: Int64 = 0
  /// The data file the live record names (`replaceFromFile`), deleted at retirement.
  var dataFile: String?
}

/// Write-ahead records of in-place commits: each record is written to a reusable
/// slot file before the target is touched and retired after, so a killed daemon's
/// interrupted commits can be rolled forward at the next mount.
public final class Journal: Sendable {
  /// Where a record's content starts inside its slot file.
  static let contentOffset: Int64 = Int64(RecordHeader.size)
  /// The journal files' name prefix inside the private directory.
  static let prefix = "journal-"

  let dirFd: Int32
  let durable: Bool
  let enabled: Bool
  let instance: String
  private let free = Mutex<[JournalSlot]>([])
  private let created = Atomic<Int>(0)
  private let sequence = Atomic<UInt64>(1)

  /// `enabled: false` exists only so the kill -9 test can show what the journal prevents.
  public init(dirFd: Int32, durable: Bool, enabled: Bool = true) {
    self.dirFd = dirFd
    self.durable = durable
    self.enabled = enabled
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    self.instance = "\(getpid())-\(ts.tv_sec)\(ts.tv_nsec)"
    // One slot made and given 256 KiB of disk up front: small commits then need no new
    // space, so rewriting a state file in place still works on a full disk.
    if enabled, let slot = try? acquire() {
      try? Sys.fallocate(slot.fd, statefs_FALLOC_FL_KEEP_SIZE, 0, 256 << 10)
      release(slot)
    }
  }

  deinit { removeIdleSlots() }

  /// Deletes the slots holding no live record (at a clean stop): what a crash could
  /// still need stays.
  public func removeIdleSlots() {
    let idle = free.withLock { f -> [JournalSlot] in
      defer { f.removeAll() }
      return f
    }
    for s in idle {
      unlinkat(dirFd, fileName(s), 0)
      Sys.close(s.fd)
    }
  }

  private func acquire() throws(Errno) -> JournalSlot {
    if let s = free.withLock({ $0.popLast() }) { return s }
    let index = created.add(1, ordering: .relaxed).newValue
    let fd = try Sys.openat(
      dirFd, "\(Journal.prefix)\(instance)-\(index)", O_RDWR | O_CREAT | O_TRUNC, 0o600)
    // The lock tells a later recovery that this journal's owner is alive.
    _ = try? Sys.tryFlock(fd, LOCK_EX)
    if durable { try? Sys.fsync(dirFd) }
    return JournalSlot(index: index, fd: fd)
  }

  private func release(_ slot: JournalSlot) {
    free.withLock { $0.append(slot) }
  }

  /// Records the intent to write `content` into the file open as `target`; returns
  /// the slot to retire once the in-place write is done.
  func begin(target: Int32, inode: UInt64, kind: JournalKind, offset: Int64, content: Blob)
    throws(Errno)
    -> JournalSlot?
  {
    guard enabled else { return nil }
    // Emptying a file is one ftruncate, which a crash cannot tear.
    if kind == .replace && content.size == 0 { return nil }
    var slot = try acquire()
    do throws(Errno) {
      // A large spilled version is linked into the private directory rather than copied
      // into the journal: one copy of it less per commit.
      var kind = kind
      var nameBytes: [UInt8] = []
      if kind == .replace && content.isSpilled && !content.isInPlace {
        let name = "data-" + fileName(slot)
        unlinkat(dirFd, name, 0)
        if linkat(AT_FDCWD, Sys.procPath(content.fd), dirFd, name, AT_SYMLINK_FOLLOW) == 0 {
          if durable { try Sys.fdatasync(content.fd) }
          kind = .replaceFromFile
          nameBytes = Array(name.utf8)
          slot.dataFile = name
        }
      }
      var handle = [UInt8](repeating: 0, count: 128)
      var type: Int32 = 0
      let n = handle.withUnsafeMutableBytes {
        statefs_fd_to_handle(target, $0.baseAddress, 128, &type)
      }
      handle = n > 0 ? Array(handle[0..<Int(n)]) : []
      // Content first, header last: a header is only ever seen with its content.
      var sum = Checksum()
      var at = Journal.contentOffset
      let fd = slot.fd
      if kind == .replaceFromFile {
        nameBytes.withUnsafeBytes { sum.update($0) }
        try Sys.pwriteFully(fd, nameBytes, at)
        at += Int64(nameBytes.count)
      } else {
        try content.forEachChunk { (chunk) throws(Errno) in
          sum.update(chunk)
          try Sys.pwriteFully(fd, chunk.baseAddress!, chunk.count, at)
          at += Int64(chunk.count)
        }
      }
      let length = UInt64(content.size)
      let recordOffset = kind == .replaceFromFile ? UInt64(nameBytes.count) : UInt64(offset)
      let header = RecordHeader(
        kind: kind, sequence: sequence.add(1, ordering: .relaxed).newValue, inode: inode,
        offset: recordOffset, length: length, handleType: type, handle: handle,
        checksum: RecordHeader.seal(
          kind: kind, inode: inode, offset: recordOffset, length: length, handle: handle,
          content: sum.value))
      let bytes = header.encode()
      try Sys.pwriteFully(fd, bytes, 0)
      if durable { try Sys.fdatasync(fd) }
      slot.recordBytes = at
      return slot
    } catch {
      retire(slot)
      throw error
    }
  }

  /// The slot's file name inside the private directory.
  func fileName(_ slot: JournalSlot) -> String { "\(Journal.prefix)\(instance)-\(slot.index)" }

  /// Leaves the slot's record live for recovery and takes the slot out of use.
  func abandon(_ slot: JournalSlot?) {
    guard let slot else { return }
    if durable { try? Sys.fdatasync(slot.fd) }
    // The descriptor (and its lock) stays open until exit, so no one reuses or recovers
    // the record while this daemon lives.
  }

  /// Marks the slot's record done and returns the slot to the pool.
  func retire(_ slot: JournalSlot?) {
    guard let slot else { return }
    var zero: UInt64 = 0
    let ok = (try? Sys.pwriteFully(slot.fd, &zero, 8, 0)) != nil
    if ok && durable { try? Sys.fdatasync(slot.fd) }
    if ok {
      if let data = slot.dataFile { unlinkat(dirFd, data, 0) }
      // Keep big slots from pinning disk space after a large commit.
      if slot.recordBytes > 64 << 20 {
        try? Sys.ftruncate(slot.fd, Journal.contentOffset)
      }
      var idle = slot
      idle.dataFile = nil
      idle.recordBytes = 0
      release(idle)
    } else {
      // A slot whose record could not be retired must not be reused or deleted.
      Sys.close(slot.fd)
    }
  }
}
