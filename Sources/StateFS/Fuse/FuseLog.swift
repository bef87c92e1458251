import CFuse
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// libfuse's own messages: kept (so a failed mount can say why) and written to stderr.
public enum FuseLog {
  private static let last = Mutex<String>("")

  /// Routes libfuse's log through statefs.
  public static func capture() {
    fuse_set_log_func { level, fmt, ap in
      guard let fmt, let ap else { return }
      var buf = [CChar](repeating: 0, count: 512)
      _ = vsnprintf(&buf, buf.count, fmt, ap)
      let text = String(
        decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
      let line = text.split(separator: "\n").last.map(String.init) ?? ""
      FuseLog.last.withLock { $0 = line }
      if level.rawValue <= FUSE_LOG_NOTICE.rawValue {
        _ = text.withCString { write(2, $0, strlen($0)) }
      }
    }
  }

  /// The last message libfuse logged, as one line ("" if none).
  public static var lastMessage: String { last.withLock { $0 } }
}
