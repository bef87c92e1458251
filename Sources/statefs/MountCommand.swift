import ArgumentParser
import CFuse
import Logging
import StateFS

#if canImport(Glibc)
  import Glibc
#endif

/// A start-up failure: one line for the user and the exit status.
struct StartError: Error, CustomStringConvertible {
  let description: String
  var code: Int32 = 1
  init(_ message: String, code: Int32 = 1) {
    description = message
    self.code = code
  }
}

/// `statefs mount`: validates, then serves in the foreground or in a re-executed daemon.
struct Mount: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Mount a statefs over a directory (in place unless --source is given).",
    discussion: """
      Returns once the mount answers (exit 0), or prints one line naming the \
      problem (exit 1; exit 2 for bad options). Detach with \
      `fusermount -u MOUNTPOINT`, `statefs unmount MOUNTPOINT`, or SIGTERM or \
      SIGINT to the daemon.

      Options (-o, comma-separated, FUSE conventions):
        allow_other        let other users in; the kernel checks permissions
        default_permissions  kernel permission checks (always on)
        ro                 read-only: every write fails with EROFS
        fsname=NAME        source name shown by mount and df (default: SOURCE)
        auto_unmount       unmount when the daemon dies
        durable            commits reach stable storage before close() returns
        spill_threshold=N  buffers and snapshots above N spill to disk (4M)
        memory_limit=N     RAM for all buffers and snapshots together (64M)
        log=PATH           log file of the background daemon
        log_level=LEVEL    trace, debug, info, notice, warning, error, critical
        threads=N          FUSE worker threads (64)
        cache_timeout=S    seconds the kernel caches names and attributes (1)
      mount(8) options (nofail, _netdev, auto, noauto, user, users, defaults) \
      are accepted and ignored.
      """
  )

  @Argument(help: "The directory to mount on (and to protect in place without --source).")
  var mountpoint: String

  @Option(help: "Serve this directory instead of the mountpoint's own contents.")
  var source: String?

  @Flag(name: [.short, .long], help: "Stay attached and log to stderr.")
  var foreground = false

  @Option(name: .customShort("o"), help: "Mount options, comma-separated (see above).")
  var options: [String] = []

  @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
  var logLevel: String?

  @Option(help: .hidden)
  var readyFd: Int32?

  func run() throws {
    var opts = try MountOptions.parse(options)
    if let l = logLevel {
      opts = try MountOptions.parse(options + ["log_level=\(l)"])
    }
    let plan = try validate(opts)
    if foreground {
      serve(plan, opts)
    } else {
      try spawnDaemon(plan, opts)
    }
  }

  /// Checked, absolute paths of a mount about to happen.
  struct Plan {
    let mountpoint: String
    let source: String
  }

  /// Every check that can fail before anything is mounted, each with its own message.
  func validate(_ opts: MountOptions) throws -> Plan {
    var mp = absolutePath(mountpoint)
    var st = stat()
    if stat(mp, &st) != 0 {
      let e = errno
      if e == ENOTCONN {
        // A killed daemon's mount: clear it, then mount afresh.
        guard clearDeadMount(mp) else {
          throw StartError(
            "mountpoint \(mountpoint) is a dead FUSE mount that could not be cleared (try fusermount -uz)"
          )
        }
        if stat(mp, &st) != 0 {
          throw StartError("mountpoint \(mountpoint): \(describeErrno(errno))")
        }
      } else if e == ENOENT {
        throw StartError("mountpoint \(mountpoint) does not exist")
      } else {
        throw StartError("mountpoint \(mountpoint): \(describeErrno(e))")
      }
    }
    guard (st.st_mode & S_IFMT) == S_IFDIR else {
      throw StartError("mountpoint \(mountpoint) is not a directory")
    }
    mp = resolvePath(mp) ?? mp
    if let live = readMountTable().last(where: { $0.mountpoint == mp }),
      live.fstype == "fuse.statefs"
    {
      // statfs always reaches the daemon (stat may be answered from the kernel's cache).
      if statefs_fs_type(mp) < 0 && errno == ENOTCONN {
        guard clearDeadMount(mp) else {
          throw StartError(
            "mountpoint \(mountpoint) is a dead FUSE mount that could not be cleared (try fusermount -uz)"
          )
        }
      } else {
        throw StartError("\(mp) is already a statefs mount (of \(live.source)); unmount it first")
      }
    }
    var src = mp
    if let s = source {
      var sst = stat()
      if stat(s, &sst) != 0 {
        let e = errno
        throw StartError(
          e == ENOENT ? "source \(s) does not exist" : "source \(s): \(describeErrno(e))")
      }
      guard (sst.st_mode & S_IFMT) == S_IFDIR else {
        throw StartError("source \(s) is not a directory")
      }
      src = resolvePath(s) ?? absolutePath(s)
    }
    let probe = open(src, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    if probe < 0 { throw StartError("source \(src) cannot be read: \(describeErrno(errno))") }
    close(probe)
    if access("/dev/fuse", R_OK | W_OK) != 0 {
      let e = errno
      let hint =
        e == EACCES
        ? "FUSE is not open to this user: an administrator can chmod 0666 /dev/fuse"
        : "install fuse3 and load the fuse module"
      throw StartError("cannot use /dev/fuse: \(describeErrno(e)) (\(hint))")
    }
    var dev = stat()
    // The FUSE device is character device 10:229.
    if stat("/dev/fuse", &dev) != 0 || (dev.st_mode & S_IFMT) != S_IFCHR
      || dev.st_rdev != (10 << 8 | 229)
    {
      throw StartError("/dev/fuse is not the FUSE device (expected character device 10:229)")
    }
    if !opts.readOnly && access(src, W_OK) != 0 {
      throw StartError(
        "source \(src) is not writable: \(describeErrno(errno)) (mount with -o ro to serve it read-only)"
      )
    }
    return Plan(mountpoint: mp, source: src)
  }

  /// Starts the daemon as a new session without fork(): re-executes this binary in the
  /// foreground and waits for it to report the mount live.
  func spawnDaemon(_ plan: Plan, _ opts: MountOptions) throws {
    var fds: [Int32] = [0, 0]
    guard statefs_pipe_cloexec(&fds) == 0 else { throw StartError("pipe: \(describeErrno(errno))") }
    var args = [
      "statefs", "mount", plan.mountpoint, "--source", plan.source, "--foreground", "--ready-fd",
      "3",
    ]
    for o in options { args += ["-o", o] }
    if let l = logLevel { args += ["--log-level", l] }

    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
    if let log = opts.logPath {
      posix_spawn_file_actions_addopen(
        &actions, 2, absolutePath(log), O_WRONLY | O_APPEND | O_CREAT, 0o640)
    } else {
      posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
    }
    posix_spawn_file_actions_adddup2(&actions, fds[1], 3)
    var attr = posix_spawnattr_t()
    posix_spawnattr_init(&attr)
    defer { posix_spawnattr_destroy(&attr) }
    var defaults = sigset_t()
    sigemptyset(&defaults)
    for s in [SIGINT, SIGTERM, SIGHUP, SIGPIPE] { sigaddset(&defaults, s) }
    posix_spawnattr_setsigdefault(&attr, &defaults)
    var noMask = sigset_t()
    sigemptyset(&noMask)
    posix_spawnattr_setsigmask(&attr, &noMask)
    posix_spawnattr_setflags(
      &attr,
      Int16(statefs_POSIX_SPAWN_SETSID) | Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
    let cargs = args.map { strdup($0) } + [nil]
    defer { for p in cargs { free(p) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, "/proc/self/exe", &actions, &attr, cargs, environ)
    close(fds[1])
    guard rc == 0 else {
      close(fds[0])
      throw StartError("cannot start the daemon: \(describeErrno(rc))")
    }
    let message = readReport(fds[0], timeoutMs: 300_000)
    close(fds[0])
    if message == "ok" {
      if statefs_fs_type(plan.mountpoint) == 0x6573_5546 { return }
      throw StartError("the daemon reported ready but \(plan.mountpoint) does not answer")
    }
    if let m = message, m.hasPrefix("error: ") {
      var status: Int32 = 0
      waitpid(pid, &status, 0)
      throw StartError(String(m.dropFirst(7)), code: (status >> 8) & 0xff == 2 ? 2 : 1)
    }
    kill(pid, SIGKILL)
    var status: Int32 = 0
    waitpid(pid, &status, 0)
    throw StartError(
      message == nil
        ? "the daemon did not report within 300 s and was stopped"
        : "the daemon exited during start-up (status \(status))")
  }

  /// Reads the child's one-line report; nil on timeout, "" on EOF without a report.
  func readReport(_ fd: Int32, timeoutMs: Int32) -> String? {
    var bytes: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 512)
    var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    while true {
      let r = poll(&pfd, 1, timeoutMs)
      if r < 0 && errno == EINTR { continue }
      if r == 0 { return nil }
      let n = read(fd, &buf, buf.count)
      if n < 0 && errno == EINTR { continue }
      if n <= 0 { break }
      bytes += buf[0..<n]
      if bytes.contains(10) { break }
    }
    let line = String(decoding: bytes, as: UTF8.self)
    return line.split(separator: "\n").first.map(String.init) ?? ""
  }

  /// The daemon itself: opens the source, recovers its journal, mounts, serves.
  func serve(_ plan: Plan, _ opts: MountOptions) -> Never {
    let ready = readyFd
    func report(_ line: String) {
      guard let fd = ready else { return }
      let text = line + "\n"
      _ = text.withCString { write(fd, $0, strlen($0)) }
    }
    var madePrivateDir = false
    var sourceFd: Int32 = -1
    func die(_ message: String, code: Int32 = 1) -> Never {
      // A failed start leaves the source as it found it.
      if madePrivateDir && sourceFd >= 0 { removePrivateDirectory(sourceFd) }
      report("error: " + message)
      fail(message, code: code)
    }
    bootstrapLogging(opts, foreground: ready == nil)
    var logger = Logger(label: "statefs")
    logger.logLevel = logLevelFrom(opts.logLevel)
    umask(0)
    // Few malloc arenas, and big buffers straight from mmap: freed 1 MiB request
    // buffers then go back to the system instead of piling up per worker thread.
    _ = mallopt(M_ARENA_MAX, 2)
    _ = mallopt(M_MMAP_THRESHOLD, 128 << 10)

    // The source is opened before mounting: every later access goes through this fd,
    // never through the mountpoint that is about to hide it.
    let rootFd = open(plan.source, LinuxFlags.path | O_DIRECTORY | O_CLOEXEC)
    if rootFd < 0 { die("source \(plan.source) cannot be opened: \(describeErrno(errno))") }
    sourceFd = rootFd

    let stats = Stats()
    var spillDirFd: Int32
    if opts.readOnly {
      let tmp = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
      spillDirFd = open(tmp, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
      if spillDirFd < 0 { die("cannot open \(tmp) for spill files: \(describeErrno(errno))") }
      // A read-only mount still must not serve a file a crash left mid-commit.
      let priv = openat(
        rootFd, privateDirectoryName, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
      if priv >= 0 {
        do {
          _ = try Recovery.run(
            sourceFd: rootFd, privateDirFd: priv, durable: opts.durable, logger: logger,
            stats: stats)
        } catch {
          logger.warning(
            "journal recovery skipped on a read-only mount", metadata: ["error": "\(error)"])
        }
        close(priv)
      }
    } else {
      if mkdirat(rootFd, privateDirectoryName, 0o700) == 0 {
        madePrivateDir = true
      } else if errno != EEXIST {
        die("cannot create \(plan.source)/\(privateDirectoryName): \(describeErrno(errno))")
      }
      spillDirFd = openat(
        rootFd, privateDirectoryName, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
      if spillDirFd < 0 {
        die("cannot open \(plan.source)/\(privateDirectoryName): \(describeErrno(errno))")
      }
      do {
        let r = try Recovery.run(
          sourceFd: rootFd, privateDirFd: spillDirFd, durable: opts.durable, logger: logger,
          stats: stats)
        if r.rolledForward + r.dropped + r.orphaned > 0 {
          logger.notice(
            "journal recovery done",
            metadata: [
              "rolled_forward": "\(r.rolledForward)", "dropped": "\(r.dropped)",
              "orphaned": "\(r.orphaned)",
            ])
        }
      } catch {
        die("\(error)")
      }
    }

    var commit = CommitOptions()
    commit.durable = opts.durable
    commit.spillThreshold = opts.spillThreshold
    commit.memoryLimit = opts.memoryLimit
    commit.journal = opts.journal && !opts.readOnly
    let engine = CommitEngine(
      privateDirFd: spillDirFd, options: commit, stats: stats, logger: logger)
    var fsOptions = FileSystemOptions()
    fsOptions.readOnly = opts.readOnly
    fsOptions.cacheTimeout = opts.cacheTimeout
    fsOptions.sourcePath = plan.source
    fsOptions.mountpoint = plan.mountpoint
    fsOptions.optionString = opts.describe()
    let fs: FileSystem
    do {
      fs = try FileSystem(
        rootFd: rootFd, engine: engine, stats: stats, options: fsOptions, logger: logger)
    } catch {
      die("source \(plan.source): \(error)")
    }
    FuseLog.capture()
    let session: FuseSession
    do {
      session = try FuseSession(fs: fs, mountOptions: opts.fuseOptionString(source: plan.source))
    } catch {
      let reason = FuseLog.lastMessage
      die(
        "invalid FUSE options '\(opts.fuseOptionString(source: plan.source))'"
          + (reason.isEmpty ? "" : ": " + reason), code: 2)
    }
    do {
      try session.mount(at: plan.mountpoint)
    } catch {
      let reason = FuseLog.lastMessage
      die("cannot mount on \(plan.mountpoint)" + (reason.isEmpty ? "" : ": " + reason))
    }
    logger.info(
      "mounted",
      metadata: [
        "source": "\(plan.source)", "mountpoint": "\(plan.mountpoint)", "pid": "\(getpid())",
      ])
    report("ok")
    if let fd = ready { close(fd) }
    let r = session.run(maxThreads: opts.threads)
    engine.shutdown()
    // Leave the directory as it was: the private directory goes if nothing is left in it
    // (another daemon's journal, or a record a failed commit kept, stays).
    if !opts.readOnly { unlinkat(rootFd, privateDirectoryName, AT_REMOVEDIR) }
    logger.info("unmounted", metadata: ["mountpoint": "\(plan.mountpoint)"])
    // The loop returns the signal number when SIGTERM/SIGINT/SIGHUP ended it: a clean stop.
    Glibc.exit(r == 0 || r == SIGTERM || r == SIGINT || r == SIGHUP ? 0 : 1)
  }
}

/// Removes the private directory this start made, with the idle journal slots in it.
func removePrivateDirectory(_ sourceFd: Int32) {
  let fd = openat(sourceFd, privateDirectoryName, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
  guard fd >= 0, let dir = fdopendir(fd) else { return }
  let mine = "journal-\(getpid())-"
  var names: [String] = []
  while let de = readdir(dir) {
    names.append(
      withUnsafeBytes(of: de.pointee.d_name) {
        String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self)
      })
  }
  for name in names where name.hasPrefix(mine) { unlinkat(dirfd(dir), name, 0) }
  closedir(dir)
  unlinkat(sourceFd, privateDirectoryName, AT_REMOVEDIR)
}
