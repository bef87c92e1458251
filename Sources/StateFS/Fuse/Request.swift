import CFuse

#if canImport(Glibc)
  import Glibc
#endif

/// Runs an operation and gives its outcome as an errno (0 for success), for `reply`.
@inline(__always)
func attempt(_ body: () throws(Errno) -> Void) -> Errno {
  do {
    try body()
    return Errno(0)
  } catch {
    return error
  }
}

/// One kernel request that must be answered exactly once: every reply consumes it,
/// and one dropped without a reply answers EIO so the caller never hangs.
public struct Request: ~Copyable {
  let raw: fuse_req_t

  init(_ raw: fuse_req_t) { self.raw = raw }

  deinit { fuse_reply_err(raw, EIO) }

  /// The calling process's user id.
  var uid: uid_t { statefs_req_uid(raw) }
  /// The calling process's group id.
  var gid: gid_t { statefs_req_gid(raw) }
  /// The calling process id.
  var pid: pid_t { statefs_req_pid(raw) }

  /// Answers with an errno (0 means success for ops without data).
  consuming func reply(_ error: Errno) {
    fuse_reply_err(raw, error.rawValue)
    discard self
  }

  /// Answers with any error: an `Errno` as itself, anything else as EIO.
  consuming func reply(_ error: any Error) {
    fuse_reply_err(raw, (error as? Errno)?.rawValue ?? EIO)
    discard self
  }

  /// Answers success with no data.
  consuming func ok() {
    fuse_reply_err(raw, 0)
    discard self
  }

  /// Answers a lookup-like request with a new directory entry.
  consuming func entry(_ e: fuse_entry_param) {
    var e = e
    fuse_reply_entry(raw, &e)
    discard self
  }

  /// Answers a create with the entry and the open handle.
  consuming func create(_ e: fuse_entry_param, _ fi: UnsafeMutablePointer<fuse_file_info>) {
    var e = e
    fuse_reply_create(raw, &e, fi)
    discard self
  }

  /// Answers getattr/setattr.
  consuming func attr(_ st: stat, timeout: Double) {
    var st = st
    fuse_reply_attr(raw, &st, timeout)
    discard self
  }

  /// Answers open/opendir.
  consuming func open(_ fi: UnsafeMutablePointer<fuse_file_info>) {
    fuse_reply_open(raw, fi)
    discard self
  }

  /// Answers with bytes.
  consuming func buffer(_ bytes: UnsafeRawBufferPointer) {
    fuse_reply_buf(raw, bytes.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count)
    discard self
  }

  /// Answers a read with bytes that sit in a file.
  consuming func data(fd: Int32, offset: Int64, count: Int) {
    let r = statefs_reply_fd_data(raw, fd, off_t(offset), count)
    if r != 0 { fuse_reply_err(raw, -r > 0 ? -r : EIO) }
    discard self
  }

  /// Answers a write with the byte count.
  consuming func written(_ count: Int) {
    fuse_reply_write(raw, count)
    discard self
  }

  /// Answers readlink.
  consuming func readlink(_ target: UnsafePointer<CChar>) {
    fuse_reply_readlink(raw, target)
    discard self
  }

  /// Answers statfs.
  consuming func statfs(_ sv: statvfs) {
    var sv = sv
    fuse_reply_statfs(raw, &sv)
    discard self
  }

  /// Answers a size-probing getxattr/listxattr.
  consuming func xattrSize(_ size: Int) {
    fuse_reply_xattr(raw, size)
    discard self
  }

  /// Answers lseek.
  consuming func offset(_ off: Int64) {
    fuse_reply_lseek(raw, off_t(off))
    discard self
  }

  /// Hands the raw request to `body`, which must send exactly one reply (for replies
  /// that have to be sent while a lock is held).
  consuming func answerDirectly(_ body: (fuse_req_t) -> Void) {
    body(raw)
    discard self
  }

  /// For forget: no reply at all.
  consuming func none() {
    fuse_reply_none(raw)
    discard self
  }
}
