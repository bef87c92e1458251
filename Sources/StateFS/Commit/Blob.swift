#if canImport(Glibc)
  import Glibc
#endif

/// Where large buffers and snapshots go: unnamed files in the private directory.
public final class SpillStore: Sendable {
  /// The private directory (`.statefs`) descriptor.
  let dirFd: Int32
  /// Content above this many bytes lives in a spill file, not in RAM.
  public let threshold: Int64
  /// All buffers and snapshots together stay below this many bytes of RAM; beyond it,
  /// new content spills whatever its size.
  public let memoryLimit: Int64
  let stats: Stats

  public init(dirFd: Int32, threshold: Int64, memoryLimit: Int64 = 64 << 20, stats: Stats) {
    self.dirFd = dirFd
    self.threshold = threshold
    self.memoryLimit = memoryLimit
    self.stats = stats
  }

  /// Whether `bytes` more in RAM should go to disk instead.
  func mustSpill(size: Int64, growth: Int64) -> Bool {
    size > threshold
      || (growth > 0 && stats.memoryBytes.load(ordering: .relaxed) + growth > memoryLimit)
  }

  /// Creates an empty unnamed file that vanishes when closed.
  func makeFile() throws(Errno) -> Int32 {
    do {
      return try Sys.openat(dirFd, ".", statefs_tmpfile_flags(), 0o600)
    } catch {
      // Filesystems without O_TMPFILE: a named file unlinked at once.
      var name = ""
      for _ in 0..<16 {
        name = "spill-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        do {
          let fd = try Sys.openat(dirFd, name, O_RDWR | O_CREAT | O_EXCL, 0o600)
          unlinkat(dirFd, name, 0)
          return fd
        } catch  where error.rawValue == EEXIST {
          continue
        }
      }
      throw Errno.exists
    }
  }
}

@inline(__always) func statefs_tmpfile_flags() -> Int32 { LinuxFlags.tmpfile | O_RDWR }

/// Bytes of one file version or one write buffer: in memory while small, in a
/// spill file beyond the store's threshold. Not thread-safe; owners lock.
final class Blob: @unchecked Sendable {
  private(set) var size: Int64 = 0
  private var mem: UnsafeMutableRawPointer?
  private var capacity: Int = 0
  /// The spill file descriptor once the content left RAM.
  private(set) var fd: Int32 = -1
  /// The descriptor is the backing file itself, held under LOCK_SH (not ours to close).
  private var borrowed = false
  private let store: SpillStore

  init(store: SpillStore) { self.store = store }

  /// A version read in place from the backing file, whose LOCK_SH the owner keeps
  /// until it closes `fd` (used when there is no room for a copy).
  init(lockedFile fd: Int32, size: Int64, store: SpillStore) {
    self.store = store
    self.fd = fd
    self.size = size
    self.borrowed = true
  }

  deinit {
    if borrowed { return }
    if let mem {
      mem.deallocate()
      store.stats.memoryBytes.subtract(Int64(capacity), ordering: .relaxed)
    }
    if fd >= 0 {
      store.stats.spilledBytes.subtract(size, ordering: .relaxed)
      Sys.close(fd)
    }
  }

  /// Whether the content lives in a spill file (or is read in place).
  var isSpilled: Bool { fd >= 0 }

  /// Whether this is the backing file itself, read in place under a held LOCK_SH.
  var isInPlace: Bool { borrowed }

  /// The in-memory bytes (nil when spilled or empty).
  var memoryPointer: UnsafeRawPointer? { fd >= 0 ? nil : UnsafeRawPointer(mem) }

  private func reserve(_ needed: Int) {
    if needed <= capacity { return }
    var newCap = max(capacity * 2, 4096)
    while newCap < needed { newCap *= 2 }
    let p = UnsafeMutableRawPointer.allocate(byteCount: newCap, alignment: 16)
    if let mem {
      p.copyMemory(from: mem, byteCount: Int(size))
      mem.deallocate()
    }
    store.stats.memoryBytes.add(Int64(newCap - capacity), ordering: .relaxed)
    mem = p
    capacity = newCap
  }

  private func spill() throws(Errno) {
    let f = try store.makeFile()
    if size > 0, let mem {
      do { try Sys.pwriteFully(f, mem, Int(size), 0) } catch {
        Sys.close(f)
        throw error
      }
    }
    if let mem {
      mem.deallocate()
      store.stats.memoryBytes.subtract(Int64(capacity), ordering: .relaxed)
    }
    mem = nil
    capacity = 0
    fd = f
    store.stats.spilledBytes.add(size, ordering: .relaxed)
  }

  private func setSpilledSize(_ newSize: Int64) {
    store.stats.spilledBytes.add(newSize - size, ordering: .relaxed)
    size = newSize
  }

  /// Reads up to `count` bytes at `offset`; returns how many were read.
  func read(into buf: UnsafeMutableRawPointer, count: Int, offset: Int64) throws(Errno) -> Int {
    if offset >= size || count <= 0 { return 0 }
    let n = Int(min(Int64(count), size - offset))
    if fd >= 0 { return try Sys.preadFully(fd, buf, n, offset) }
    buf.copyMemory(from: mem! + Int(offset), byteCount: n)
    return n
  }

  /// Writes bytes at `offset`, growing (zero-filled) as needed; spills beyond the threshold.
  func write(_ bytes: UnsafeRawPointer, count: Int, offset: Int64) throws(Errno) {
    if count <= 0 { return }
    let end = offset + Int64(count)
    if fd < 0 && end > Int64(capacity) && store.mustSpill(size: end, growth: end - Int64(capacity))
    {
      try spill()
    }
    if fd >= 0 {
      try Sys.pwriteFully(fd, bytes, count, offset)
      if end > size { setSpilledSize(end) }
      return
    }
    reserve(Int(end))
    if offset > size {
      (mem! + Int(size)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(offset - size))
    }
    (mem! + Int(offset)).copyMemory(from: bytes, byteCount: count)
    if end > size { size = end }
  }

  /// Appends bytes at the end.
  func append(_ bytes: UnsafeRawPointer, count: Int) throws(Errno) {
    try write(bytes, count: count, offset: size)
  }

  /// Cuts or zero-extends the content to `newSize`.
  func truncate(_ newSize: Int64) throws(Errno) {
    if fd < 0 && newSize > Int64(capacity)
      && store.mustSpill(size: newSize, growth: newSize - Int64(capacity))
    {
      try spill()
    }
    if fd >= 0 {
      try Sys.ftruncate(fd, newSize)
      setSpilledSize(newSize)
      return
    }
    if newSize > size {
      reserve(Int(newSize))
      (mem! + Int(size)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(newSize - size))
    }
    size = newSize
  }

  /// Fills an empty blob with `count` bytes of `src` from `offset` (a snapshot or a base copy).
  func fill(from src: Int32, offset: Int64 = 0, count: Int64) throws(Errno) {
    if count <= 0 { return }
    if store.mustSpill(size: count, growth: count) {
      try spill()
      let copied = try Sys.copyRange(from: src, at: offset, to: fd, at: 0, count: count)
      setSpilledSize(copied)
      return
    }
    reserve(Int(count))
    size = Int64(try Sys.preadFully(src, mem!, Int(count), offset))
  }

  /// Copies the whole content into another blob (used to start a buffer from a snapshot).
  func copy(into other: Blob) throws(Errno) {
    if fd >= 0 {
      try other.fill(from: fd, count: size)
    } else if size > 0 {
      try other.write(mem!, count: Int(size), offset: 0)
    }
  }

  /// Writes the whole content into `dst` at `offset`.
  func writeAll(to dst: Int32, at offset: Int64) throws(Errno) {
    if size == 0 { return }
    if fd >= 0 {
      let n = try Sys.copyRange(from: fd, at: 0, to: dst, at: offset, count: size)
      if n != size { throw Errno.ioError }
    } else {
      try Sys.pwriteFully(dst, mem!, Int(size), offset)
    }
  }

  /// Byte-for-byte equality with another blob, for sharing snapshots.
  func sameContent(as other: Blob) -> Bool {
    guard size == other.size, fd < 0, other.fd < 0 else { return false }
    if size == 0 { return true }
    return memcmp(mem!, other.mem!, Int(size)) == 0
  }

  /// Calls `body` with chunks of the content in order (for checksums and journal writes).
  func forEachChunk(_ body: (UnsafeRawBufferPointer) throws(Errno) -> Void) throws(Errno) {
    if size == 0 { return }
    if fd < 0 {
      try body(UnsafeRawBufferPointer(start: mem!, count: Int(size)))
      return
    }
    let chunk = 1 << 20
    let buf = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 16)
    defer { buf.deallocate() }
    var off: Int64 = 0
    while off < size {
      let n = try Sys.preadFully(fd, buf, Int(min(Int64(chunk), size - off)), off)
      if n == 0 { throw Errno.ioError }
      try body(UnsafeRawBufferPointer(start: buf, count: n))
      off += Int64(n)
    }
  }
}
