import CFuse

#if canImport(Glibc)
  import Glibc
#endif

/// A mounted FUSE session serving one `FileSystem` with libfuse's multi-threaded loop.
public final class FuseSession {
  private let se: OpaquePointer
  private let fs: FileSystem
  private var args: fuse_args
  private var mounted = false

  /// Creates the session with FUSE mount options (`-o` syntax, without the `-o`).
  public init(fs: FileSystem, mountOptions: String) throws(Errno) {
    self.fs = fs
    let argv: [String] = ["statefs", "-o", mountOptions]
    let cargv = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(
      capacity: argv.count + 1)
    for (i, a) in argv.enumerated() { cargv[i] = strdup(a) }
    cargv[argv.count] = nil
    args = statefs_args_init(Int32(argv.count), cargv)
    var ops = makeOperations()
    let userdata = Unmanaged.passRetained(fs).toOpaque()
    guard let se = fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size, userdata)
    else {
      Unmanaged<FileSystem>.fromOpaque(userdata).release()
      throw Errno.invalid
    }
    self.se = se
    fs.attach(session: se)
  }

  deinit {
    if mounted { fuse_session_unmount(se) }
    fuse_session_destroy(se)
    fuse_opt_free_args(&args)
  }

  /// Mounts at an absolute path; SIGINT/SIGTERM/SIGHUP then end the loop and unmount.
  public func mount(at mountpoint: String) throws(Errno) {
    // Shells start background jobs with SIGINT ignored; libfuse only hooks defaults.
    signal(SIGINT, SIG_DFL)
    signal(SIGTERM, SIG_DFL)
    signal(SIGHUP, SIG_DFL)
    if fuse_set_signal_handlers(se) != 0 { throw Errno.ioError }
    if fuse_session_mount(se, mountpoint) != 0 {
      fuse_remove_signal_handlers(se)
      throw Errno.ioError
    }
    mounted = true
    // Shared mmap of direct_io files needs an INIT flag libfuse 3.14 cannot send.
    _ = statefs_use_custom_io(se)
  }

  /// Serves requests until unmounted or signalled; returns libfuse's loop result.
  public func run(maxThreads: Int) -> Int32 {
    let cfg = fuse_loop_cfg_create()
    fuse_loop_cfg_set_clone_fd(cfg, 0)
    fuse_loop_cfg_set_max_threads(cfg, UInt32(maxThreads))
    fuse_loop_cfg_set_idle_threads(cfg, UInt32(min(maxThreads, 8)))
    let r = fuse_session_loop_mt(se, cfg)
    fuse_loop_cfg_destroy(cfg)
    fuse_remove_signal_handlers(se)
    if mounted {
      fuse_session_unmount(se)
      mounted = false
    }
    return r
  }
}
