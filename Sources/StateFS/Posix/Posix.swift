import CFuse

#if canImport(Glibc)
  import Glibc
#endif

/// The Linux open/at flags and constants that Glibc does not import.
public enum LinuxFlags {
  public static let path = statefs_O_PATH
  public static let tmpfile = statefs_O_TMPFILE
  public static let emptyPath = statefs_AT_EMPTY_PATH
  public static let renameNoReplace = statefs_RENAME_NOREPLACE
  public static let renameExchange = statefs_RENAME_EXCHANGE
  public static let utimeNow = statefs_UTIME_NOW
  public static let utimeOmit = statefs_UTIME_OMIT
}

/// Thin throwing wrappers over the syscalls statefs uses; EINTR is retried here.
public enum Sys {
  /// openat(2).
  public static func openat(
    _ dirfd: Int32, _ path: UnsafePointer<CChar>, _ flags: Int32, _ mode: mode_t = 0
  )
    throws(Errno) -> Int32
  {
    try retrying { Glibc.openat(dirfd, path, flags | O_CLOEXEC, mode) }
  }

  /// openat(2) with a Swift string path.
  public static func openat(_ dirfd: Int32, _ path: String, _ flags: Int32, _ mode: mode_t = 0)
    throws(Errno)
    -> Int32
  {
    try retrying { Glibc.openat(dirfd, path, flags | O_CLOEXEC, mode) }
  }

  /// Reopens an `O_PATH` descriptor with real access flags through /proc/self/fd.
  public static func reopen(_ fd: Int32, _ flags: Int32) throws(Errno) -> Int32 {
    try openat(AT_FDCWD, procPath(fd), flags & ~(O_CREAT | O_EXCL | O_NOFOLLOW))
  }

  /// The /proc/self/fd path naming a descriptor.
  public static func procPath(_ fd: Int32) -> String { "/proc/self/fd/\(fd)" }

  /// close(2); errors are ignored because the descriptor is gone either way.
  public static func close(_ fd: Int32) {
    if fd >= 0 { _ = Glibc.close(fd) }
  }

  /// fstatat(2).
  public static func fstatat(_ dirfd: Int32, _ path: UnsafePointer<CChar>, _ flags: Int32)
    throws(Errno) -> stat
  {
    var st = stat()
    _ = try retrying { Glibc.fstatat(dirfd, path, &st, flags) }
    return st
  }

  /// fstat(2) of any descriptor, `O_PATH` ones included.
  public static func fstat(_ fd: Int32) throws(Errno) -> stat {
    var st = stat()
    _ = try retrying { Glibc.fstatat(fd, "", &st, statefs_AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) }
    return st
  }

  /// pread(2) until `count` bytes or end of file; returns the bytes read.
  public static func preadFully(
    _ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int, _ offset: Int64
  )
    throws(Errno) -> Int
  {
    var done = 0
    while done < count {
      let n = try retrying {
        Glibc.pread(fd, buf + done, count - done, off_t(offset) + off_t(done))
      }
      if n == 0 { break }
      done += n
    }
    return done
  }

  /// pwrite(2) of every byte.
  public static func pwriteFully(
    _ fd: Int32, _ buf: UnsafeRawPointer, _ count: Int, _ offset: Int64
  ) throws(Errno) {
    var done = 0
    while done < count {
      let n = try retrying {
        Glibc.pwrite(fd, buf + done, count - done, off_t(offset) + off_t(done))
      }
      if n == 0 { throw Errno.ioError }
      done += n
    }
  }

  /// pwrite(2) of a whole byte array.
  public static func pwriteFully(_ fd: Int32, _ bytes: [UInt8], _ offset: Int64) throws(Errno) {
    let failure: Errno? = bytes.withUnsafeBytes { p in
      do throws(Errno) { try pwriteFully(fd, p.baseAddress!, p.count, offset) } catch {
        return error
      }
      return nil
    }
    if let failure { throw failure }
  }

  /// ftruncate(2).
  public static func ftruncate(_ fd: Int32, _ size: Int64) throws(Errno) {
    _ = try retrying { Glibc.ftruncate(fd, off_t(size)) }
  }

  /// fsync(2).
  public static func fsync(_ fd: Int32) throws(Errno) {
    _ = try retrying { Glibc.fsync(fd) }
  }

  /// fdatasync(2).
  public static func fdatasync(_ fd: Int32) throws(Errno) {
    _ = try retrying { Glibc.fdatasync(fd) }
  }

  /// flock(2), blocking; EINTR is retried.
  public static func flock(_ fd: Int32, _ op: Int32) throws(Errno) {
    _ = try retrying { statefs_flock(fd, op) }
  }

  /// Drops a flock (LOCK_UN); it cannot fail on a valid descriptor.
  public static func unlock(_ fd: Int32) {
    _ = try? retrying { statefs_flock(fd, LOCK_UN) }
  }

  /// flock(2) with LOCK_NB; returns false when the lock is held elsewhere.
  public static func tryFlock(_ fd: Int32, _ op: Int32) throws(Errno) -> Bool {
    do {
      _ = try retrying { statefs_flock(fd, op | LOCK_NB) }
      return true
    } catch {
      if error.rawValue == EWOULDBLOCK { return false }
      throw error
    }
  }

  /// fallocate(2).
  public static func fallocate(_ fd: Int32, _ mode: Int32, _ offset: Int64, _ len: Int64)
    throws(Errno)
  {
    _ = try retrying { statefs_fallocate(fd, mode, off_t(offset), off_t(len)) }
  }

  /// Copies `count` bytes between descriptors at explicit offsets with
  /// copy_file_range(2), falling back to pread/pwrite where the kernel refuses.
  public static func copyRange(
    from src: Int32, at srcOffset: Int64, to dst: Int32, at dstOffset: Int64, count: Int64
  )
    throws(Errno) -> Int64
  {
    var inOff = off_t(srcOffset)
    var outOff = off_t(dstOffset)
    var left = count
    var useCopyRange = true
    while left > 0 {
      if useCopyRange {
        let n = statefs_copy_file_range(src, &inOff, dst, &outOff, Int(min(left, 1 << 30)))
        if n > 0 {
          left -= Int64(n)
          continue
        }
        if n == 0 { break }
        let e = errno
        if e == EINTR { continue }
        if e == EXDEV || e == EINVAL || e == ENOSYS || e == EOPNOTSUPP || e == EBADF {
          useCopyRange = false
          continue
        }
        throw Errno(e)
      }
      let chunk = Int(min(left, 1 << 20))
      let buf = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 16)
      defer { buf.deallocate() }
      let n = try preadFully(src, buf, chunk, Int64(inOff))
      if n == 0 { break }
      try pwriteFully(dst, buf, n, Int64(outOff))
      inOff += off_t(n)
      outOff += off_t(n)
      left -= Int64(n)
    }
    return count - left
  }
}

extension stat {
  /// Whether this is a regular file.
  var isRegular: Bool { (st_mode & S_IFMT) == S_IFREG }
  /// Whether this is a directory.
  var isDirectory: Bool { (st_mode & S_IFMT) == S_IFDIR }
}
