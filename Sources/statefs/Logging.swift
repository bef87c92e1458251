import Logging
import StateFS

#if canImport(Glibc)
  import Glibc
#endif

/// The swift-log level for an option value (default: notice).
func logLevelFrom(_ name: String?) -> Logger.Level {
  guard let name, let level = Logger.Level(rawValue: name) else { return .notice }
  return level
}

/// Log lines on a file descriptor (stderr in the foreground, or the -o log file).
struct FileLogHandler: LogHandler {
  let fd: Int32
  let label: String
  var logLevel: Logger.Level = .notice
  var metadata: Logger.Metadata = [:]

  subscript(metadataKey key: String) -> Logger.Metadata.Value? {
    get { metadata[key] }
    set { metadata[key] = newValue }
  }

  func log(event: LogEvent) {
    let level = event.level
    let message = event.message
    let extra = event.metadata
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    var tm = tm()
    var secs = ts.tv_sec
    gmtime_r(&secs, &tm)
    let stamp =
      "\(tm.tm_year + 1900)-\(pad(tm.tm_mon + 1))-\(pad(tm.tm_mday))T\(pad(tm.tm_hour)):\(pad(tm.tm_min)):\(pad(tm.tm_sec))Z"
    var all = metadata
    if let extra { all.merge(extra) { $1 } }
    let meta =
      all.isEmpty
      ? ""
      : " " + all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
    let text = "\(stamp) \(level) \(label)[\(getpid())]: \(message)\(meta)\n"
    _ = text.withCString { Glibc.write(fd, $0, strlen($0)) }
  }

  private func pad(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
}

/// Sends the daemon's logs to stderr (foreground) or the -o log file (background,
/// where the launcher already pointed stderr at it).
func bootstrapLogging(_ opts: MountOptions, foreground: Bool) {
  let level = logLevelFrom(opts.logLevel)
  var fd: Int32 = 2
  if foreground, let path = opts.logPath {
    let f = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o640)
    if f >= 0 { fd = f }
  }
  let target = fd
  LoggingSystem.bootstrap { label in
    var h = FileLogHandler(fd: target, label: label)
    h.logLevel = level
    return h
  }
}
