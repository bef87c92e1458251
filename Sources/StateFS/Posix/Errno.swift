#if canImport(Glibc)
  import Glibc
#endif

/// A POSIX error number, thrown by every syscall wrapper and sent to the kernel as a reply.
public struct Errno: Error, Equatable, Hashable, CustomStringConvertible, Sendable {
  /// The raw errno value.
  public let rawValue: Int32

  /// Wraps a raw errno value.
  public init(_ rawValue: Int32) { self.rawValue = rawValue }

  /// The calling thread's current errno.
  public static var current: Errno { Errno(errno) }

  public var description: String {
    String(cString: strerror(rawValue)) + " (errno \(rawValue))"
  }

  public static let noEntry = Errno(ENOENT)
  public static let ioError = Errno(EIO)
  public static let badFile = Errno(EBADF)
  public static let exists = Errno(EEXIST)
  public static let invalid = Errno(EINVAL)
  public static let permission = Errno(EPERM)
  public static let access = Errno(EACCES)
  public static let noSpace = Errno(ENOSPC)
  public static let notSupported = Errno(EOPNOTSUPP)
  public static let readOnly = Errno(EROFS)
  public static let noMemory = Errno(ENOMEM)
  public static let busy = Errno(EBUSY)
  public static let wouldBlock = Errno(EWOULDBLOCK)
  public static let notDirectory = Errno(ENOTDIR)
  public static let isDirectory = Errno(EISDIR)
  public static let interrupted = Errno(EINTR)
}

/// Runs a syscall that returns -1 on failure, retrying on EINTR.
@inline(__always)
func retrying<T: BinaryInteger>(_ body: () -> T) throws(Errno) -> T {
  while true {
    let r = body()
    if r >= 0 { return r }
    let e = errno
    if e != EINTR { throw Errno(e) }
  }
}
