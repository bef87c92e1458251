import CFuse
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// Reusable buffers for read replies, so a read costs no allocation (a fresh 128 KiB
/// allocation is an mmap and munmap each time).
final class ReadBuffers: Sendable {
  static let shared = ReadBuffers()
  static let size = (1 << 20) + 4096
  private let free = Mutex<[UInt]>([])

  /// A buffer of at least `size` bytes.
  func take(_ size: Int) -> UnsafeMutableRawPointer {
    if size <= ReadBuffers.size, let bits = free.withLock({ $0.popLast() }),
      let b = UnsafeMutableRawPointer(bitPattern: bits)
    {
      return b
    }
    return UnsafeMutableRawPointer.allocate(byteCount: max(size, ReadBuffers.size), alignment: 16)
  }

  /// Returns a buffer from `take`.
  func give(_ b: UnsafeMutableRawPointer, _ size: Int) {
    if size <= ReadBuffers.size {
      let bits = UInt(bitPattern: b)
      let kept = free.withLock { f -> Bool in
        if f.count >= 16 { return false }
        f.append(bits)
        return true
      }
      if kept { return }
    }
    b.deallocate()
  }
}

/// Open files: every regular-file handle goes through the commit engine.
extension FileSystem {
  /// The handle behind a `fuse_file_info.fh`.
  func openFile(_ fh: UInt64) -> OpenFile? {
    guard let p = UnsafeRawPointer(bitPattern: UInt(fh)) else { return nil }
    return Unmanaged<OpenFile>.fromOpaque(p).takeUnretainedValue()
  }

  /// Hands a new handle to the kernel with the flags every statefs handle uses.
  private func publish(_ h: OpenFile, _ fi: UnsafeMutablePointer<fuse_file_info>) {
    fi.pointee.fh = UInt64(UInt(bitPattern: Unmanaged.passRetained(h).toOpaque()))
    // Two handles may serve two versions at once; the page cache is per inode and
    // would splice them, so every read and write comes here.
    fi.pointee.direct_io = 1
    fi.pointee.keep_cache = 0
    // A read-only close commits nothing: spare it the FLUSH round trip.
    fi.pointee.noflush = h.writable ? 0 : 1
  }

  func open(_ req: consuming Request, _ ino: UInt64, _ fi: UnsafeMutablePointer<fuse_file_info>) {
    guard let n = table.node(ino) else { return req.reply(.noEntry) }
    guard n.isRegular else { return req.reply(n.isDirectory ? .isDirectory : .invalid) }
    let flags = fi.pointee.flags
    let acc = flags & O_ACCMODE
    if options.readOnly && (acc != O_RDONLY || flags & O_TRUNC != 0) { return req.reply(.readOnly) }
    do {
      if acc == O_RDONLY && flags & O_TRUNC != 0 {
        // Linux empties a file opened O_RDONLY|O_TRUNC: commit that at once.
        let wfd = try Sys.reopen(n.fd, O_WRONLY)
        defer { Sys.close(wfd) }
        try engine.truncateFile(fd: wfd, size: 0, dropPrivileges: req.uid != 0, file: n.file)
      }
      let fd = try reopenForHandle(n.fd, writable: acc != O_RDONLY)
      let h = try engine.open(
        fd: fd, inode: n.ino, nodeID: n.id, flags: flags, file: n.file, pid: req.pid, uid: req.uid)
      publish(h, fi)
      req.open(fi)
    } catch {
      req.reply(error)
    }
  }

  func create(
    _ req: consuming Request, _ parent: UInt64, _ name: UnsafePointer<CChar>, _ mode: mode_t,
    _ fi: UnsafeMutablePointer<fuse_file_info>
  ) {
    guard let p = table.node(parent) else { return req.reply(.noEntry) }
    if isHidden(parent, name) { return req.reply(.permission) }
    if options.readOnly { return req.reply(.readOnly) }
    let flags = fi.pointee.flags
    let uid = req.uid
    let gid = req.gid
    let pid = req.pid
    do {
      let (fd, created) = try openOrCreate(p.fd, name, mode: mode, exclusive: flags & O_EXCL != 0)
      if created {
        do { try chownToCaller(p, name, uid: uid, gid: gid) } catch {
          Sys.close(fd)
          unlinkat(p.fd, name, 0)
          throw error
        }
      }
      let st: stat
      do { st = try Sys.fstat(fd) } catch {
        Sys.close(fd)
        throw error
      }
      let pathFd: Int32
      do { pathFd = try Sys.openat(p.fd, name, LinuxFlags.path | O_NOFOLLOW) } catch {
        Sys.close(fd)
        throw error
      }
      let node = table.lookup(fd: pathFd, st: st)
      let h: OpenFile
      do {
        h = try engine.open(
          fd: fd, inode: node.ino, nodeID: node.id, flags: flags, file: node.file, pid: pid,
          uid: uid)
      } catch {
        table.forget(node.id, 1)
        throw error
      }
      if created { syncDirectory(p) }
      publish(h, fi)
      req.create(entryParam(node, st), fi)
    } catch {
      req.reply(error)
    }
  }

  /// The handle's own descriptor of a backing file: read-only, or read-write without
  /// touching atime (capturing a writer's base version is not an access by the program).
  private func reopenForHandle(_ pathFd: Int32, writable: Bool) throws(Errno) -> Int32 {
    if !writable { return try Sys.reopen(pathFd, O_RDONLY) }
    do {
      return try Sys.reopen(pathFd, O_RDWR | statefs_O_NOATIME)
    } catch  where error.rawValue == EPERM {
      // O_NOATIME needs ownership (or CAP_FOWNER): a daemon not run as root does without.
      return try Sys.reopen(pathFd, O_RDWR)
    }
  }

  /// Creates `name` exclusively, or opens the existing file when the caller allowed it.
  private func openOrCreate(
    _ dirFd: Int32, _ name: UnsafePointer<CChar>, mode: mode_t, exclusive: Bool
  )
    throws(Errno) -> (Int32, Bool)
  {
    do {
      return (try Sys.openat(dirFd, name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, mode), true)
    } catch {
      if error.rawValue != EEXIST || exclusive { throw error }
    }
    do {
      return (try Sys.openat(dirFd, name, O_RDWR | O_NOFOLLOW | statefs_O_NOATIME), false)
    } catch  where error.rawValue == EPERM {
      // O_NOATIME needs ownership (or CAP_FOWNER): a daemon not run as root does without.
      return (try Sys.openat(dirFd, name, O_RDWR | O_NOFOLLOW), false)
    }
  }

  func read(
    _ req: consuming Request, _ size: Int, _ off: Int64, _ fi: UnsafeMutablePointer<fuse_file_info>
  ) {
    guard let h = openFile(fi.pointee.fh) else { return req.reply(.badFile) }
    if off < 0 { return req.reply(.invalid) }
    if let snap = h.readSnapshot {
      // A read-only handle's snapshot never changes: serve it without any lock.
      if off >= snap.size { return req.buffer(UnsafeRawBufferPointer(start: nil, count: 0)) }
      let n = Int(min(Int64(size), snap.size - off))
      if snap.isSpilled { return req.data(fd: snap.fd, offset: off, count: n) }
      return req.buffer(UnsafeRawBufferPointer(start: snap.memoryPointer! + Int(off), count: n))
    }
    let buf = ReadBuffers.shared.take(size)
    defer { ReadBuffers.shared.give(buf, size) }
    if !h.writable {
      // A large version read in place (or the copy it got when a commit came): the
      // reply is sent under the handle's lock, so a commit cannot change it mid-way.
      return req.answerDirectly { raw in
        h.state.withLock { s in
          guard let blob = s.snapshot else {
            fuse_reply_buf(raw, nil, 0)
            return
          }
          if blob.isSpilled {
            // Spliced from the file to the kernel: no copy through the daemon.
            let n = off < blob.size ? Int(min(Int64(size), blob.size - off)) : 0
            if statefs_reply_fd_data(raw, blob.fd, off_t(off), n) != 0 { fuse_reply_err(raw, EIO) }
            return
          }
          do throws(Errno) {
            let n = try blob.read(into: buf, count: size, offset: off)
            fuse_reply_buf(raw, buf.assumingMemoryBound(to: CChar.self), n)
          } catch {
            fuse_reply_err(raw, error.rawValue)
          }
        }
      }
    }
    do {
      let n = try engine.read(h, offset: off, count: size, into: buf)
      req.buffer(UnsafeRawBufferPointer(start: buf, count: n))
    } catch {
      req.reply(error)
    }
  }

  func write(
    _ req: consuming Request, _ buf: UnsafePointer<CChar>, _ size: Int, _ off: Int64,
    _ fi: UnsafeMutablePointer<fuse_file_info>
  ) {
    guard let h = openFile(fi.pointee.fh) else { return req.reply(.badFile) }
    if off < 0 { return req.reply(.invalid) }
    do {
      try engine.write(
        h, bytes: UnsafeRawPointer(buf), count: size, offset: off, owner: fi.pointee.lock_owner)
      req.written(size)
    } catch {
      req.reply(error)
    }
  }

  func flush(_ req: consuming Request, _ fi: UnsafeMutablePointer<fuse_file_info>) {
    guard let h = openFile(fi.pointee.fh) else { return req.reply(.badFile) }
    do {
      // Invalidate before answering: `stat` right after close() must see the commit.
      if try engine.flush(h, owner: fi.pointee.lock_owner) { invalidate(h.nodeID) }
      req.ok()
    } catch {
      req.reply(error)
    }
  }

  func release(_ req: consuming Request, _ fi: UnsafeMutablePointer<fuse_file_info>) {
    guard let p = UnsafeRawPointer(bitPattern: UInt(fi.pointee.fh)) else {
      return req.reply(.badFile)
    }
    let h = Unmanaged<OpenFile>.fromOpaque(p).takeRetainedValue()
    fi.pointee.fh = 0
    let committed = engine.release(h)
    req.ok()
    if committed { invalidate(h.nodeID) }
  }

  func fsync(_ req: consuming Request, _ fi: UnsafeMutablePointer<fuse_file_info>) {
    guard let h = openFile(fi.pointee.fh) else { return req.reply(.badFile) }
    do {
      let committed = try engine.fsync(h)
      req.ok()
      // The kernel holds the inode lock during FSYNC: invalidate only after answering.
      if committed { invalidate(h.nodeID) }
    } catch {
      req.reply(error)
    }
  }

  func fallocate(
    _ req: consuming Request, _ mode: Int32, _ off: Int64, _ len: Int64,
    _ fi: UnsafeMutablePointer<fuse_file_info>
  ) {
    guard let h = openFile(fi.pointee.fh) else { return req.reply(.badFile) }
    if options.readOnly { return req.reply(.readOnly) }
    req.reply(
      attempt { () throws(Errno) in try engine.fallocate(h, mode: mode, offset: off, length: len) })
  }

  func lseek(
    _ req: consuming Request, _ off: Int64, _ whence: Int32,
    _ fi: UnsafeMutablePointer<fuse_file_info>
  ) {
    guard let h = openFile(fi.pointee.fh) else { return req.reply(.badFile) }
    // A handle's view has no holes: all of it is data, and the end is the only hole.
    let size = engine.viewSize(h)
    switch whence {
    case statefs_SEEK_DATA:
      if off < 0 { return req.reply(.invalid) }
      if off >= size { return req.reply(Errno(ENXIO)) }
      req.offset(off)
    case statefs_SEEK_HOLE:
      if off < 0 { return req.reply(.invalid) }
      if off >= size { return req.reply(Errno(ENXIO)) }
      req.offset(size)
    case SEEK_SET: req.offset(off)
    case SEEK_END: req.offset(size + off)
    default: req.reply(.invalid)
    }
  }
}
