import CFuse

#if canImport(Glibc)
  import Glibc
#endif

/// Namespace operations: lookup, attributes, and everything that makes or removes names.
extension FileSystem {
  func lookup(_ req: consuming Request, _ parent: UInt64, _ name: UnsafePointer<CChar>) {
    guard let p = table.node(parent) else { return req.reply(.noEntry) }
    if isHidden(parent, name) { return req.reply(.noEntry) }
    do {
      req.entry(try lookupEntry(p, name))
    } catch {
      if error.rawValue == ENOENT {
        // A negative entry the kernel may not cache: another writer may create it.
        var e = fuse_entry_param()
        e.ino = 0
        e.entry_timeout = 0
        return req.entry(e)
      }
      req.reply(error)
    }
  }

  func forget(_ ino: UInt64, _ count: UInt64) {
    table.forget(ino, count)
  }

  func getattr(_ req: consuming Request, _ ino: UInt64, _ fi: UnsafeMutablePointer<fuse_file_info>?)
  {
    guard let n = table.node(ino) else { return req.reply(.noEntry) }
    do {
      var st = try Sys.fstat(n.fd)
      // A process with the file open sees the size of its own handle's version (what it
      // reads, where SEEK_END goes); every other process sees the committed version.
      let mine =
        fi.flatMap { openFile($0.pointee.fh) }
        ?? (n.isRegular ? n.file.handle(openedBy: req.pid) : nil)
      if let h = mine {
        let size = engine.viewSize(h)
        if size != Int64(st.st_size) {
          st.st_size = off_t(size)
          n.file.attributesServed()
          return req.attr(st, timeout: 0)
        }
      }
      n.file.attributesServed()
      req.attr(st, timeout: options.cacheTimeout)
    } catch {
      req.reply(error)
    }
  }

  func setattr(
    _ req: consuming Request, _ ino: UInt64, _ attr: UnsafeMutablePointer<stat>, _ toSet: Int32,
    _ fi: UnsafeMutablePointer<fuse_file_info>?
  ) {
    guard let n = table.node(ino) else { return req.reply(.noEntry) }
    if options.readOnly { return req.reply(.readOnly) }
    let a = attr.pointee
    let handle = fi.map { openFile($0.pointee.fh) } ?? nil
    do {
      if toSet & FUSE_SET_ATTR_MODE != 0 {
        if n.type == S_IFLNK { throw Errno.notSupported }
        _ = try retrying { fchmodat(AT_FDCWD, Sys.procPath(n.fd), a.st_mode & 0o7777, 0) }
      }
      if toSet & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID) != 0 {
        let uid = toSet & FUSE_SET_ATTR_UID != 0 ? a.st_uid : uid_t.max
        let gid = toSet & FUSE_SET_ATTR_GID != 0 ? a.st_gid : gid_t.max
        _ = try retrying {
          fchownat(n.fd, "", uid, gid, LinuxFlags.emptyPath | AT_SYMLINK_NOFOLLOW)
        }
      }
      var sizeOverride: Int64? = nil
      if toSet & FUSE_SET_ATTR_SIZE != 0 {
        guard n.isRegular else { throw n.isDirectory ? Errno.isDirectory : Errno.invalid }
        if let h = handle, h.writable {
          try engine.truncate(h, size: Int64(a.st_size))
          sizeOverride = Int64(a.st_size)
        } else {
          let fd = try Sys.reopen(n.fd, O_WRONLY)
          defer { Sys.close(fd) }
          try engine.truncateFile(
            fd: fd, size: Int64(a.st_size), dropPrivileges: req.uid != 0, file: n.file)
        }
      }
      if toSet
        & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW
          | FUSE_SET_ATTR_MTIME_NOW) != 0
      {
        var ts = [timespec](repeating: timespec(tv_sec: 0, tv_nsec: LinuxFlags.utimeOmit), count: 2)
        if toSet & FUSE_SET_ATTR_ATIME_NOW != 0 {
          ts[0].tv_nsec = LinuxFlags.utimeNow
        } else if toSet & FUSE_SET_ATTR_ATIME != 0 {
          ts[0] = a.st_atim
        }
        if toSet & FUSE_SET_ATTR_MTIME_NOW != 0 {
          ts[1].tv_nsec = LinuxFlags.utimeNow
        } else if toSet & FUSE_SET_ATTR_MTIME != 0 {
          ts[1] = a.st_mtim
        }
        try setTimes(n, ts)
      }
      var st = try Sys.fstat(n.fd)
      if let s = sizeOverride { st.st_size = off_t(s) }
      n.file.attributesServed()
      req.attr(st, timeout: sizeOverride == nil ? options.cacheTimeout : 0)
    } catch {
      req.reply(error)
    }
  }

  /// utimensat on the node itself (a symlink too, as `touch -h` wants); kernels without
  /// AT_EMPTY_PATH for utimensat get the /proc path, which follows symlinks.
  private func setTimes(_ n: Node, _ ts: [timespec]) throws(Errno) {
    if utimensat(n.fd, "", ts, LinuxFlags.emptyPath) == 0 { return }
    let e = errno
    if e != EINVAL || n.type == S_IFLNK { throw Errno(e) }
    _ = try retrying { utimensat(AT_FDCWD, Sys.procPath(n.fd), ts, 0) }
  }

  func readlink(_ req: consuming Request, _ ino: UInt64) {
    guard let n = table.node(ino) else { return req.reply(.noEntry) }
    let buf = UnsafeMutablePointer<CChar>.allocate(capacity: Int(PATH_MAX) + 1)
    defer { buf.deallocate() }
    let r = Glibc.readlinkat(n.fd, "", buf, Int(PATH_MAX))
    if r < 0 { return req.reply(.current) }
    buf[r] = 0
    req.readlink(buf)
  }

  /// Shared tail of mknod/mkdir/symlink: own it as the caller, then answer with its entry.
  private func finishCreate(
    _ req: consuming Request, _ p: Node, _ name: UnsafePointer<CChar>,
    _ made: () throws(Errno) -> Void
  ) {
    let uid = req.uid
    let gid = req.gid
    do {
      try made()
      do {
        try chownToCaller(p, name, uid: uid, gid: gid)
      } catch {
        // Never leave a root-owned inode behind a failed request.
        if unlinkat(p.fd, name, 0) != 0 { unlinkat(p.fd, name, AT_REMOVEDIR) }
        throw error
      }
      let e = try lookupEntry(p, name)
      syncDirectory(p)
      req.entry(e)
    } catch {
      req.reply(error)
    }
  }

  func mknod(
    _ req: consuming Request, _ parent: UInt64, _ name: UnsafePointer<CChar>, _ mode: mode_t,
    _ rdev: dev_t
  ) {
    guard let p = table.node(parent) else { return req.reply(.noEntry) }
    if isHidden(parent, name) { return req.reply(.permission) }
    if options.readOnly { return req.reply(.readOnly) }
    finishCreate(req, p, name) { () throws(Errno) in
      _ = try retrying { mknodat(p.fd, name, mode, rdev) }
    }
  }

  func mkdir(
    _ req: consuming Request, _ parent: UInt64, _ name: UnsafePointer<CChar>, _ mode: mode_t
  ) {
    guard let p = table.node(parent) else { return req.reply(.noEntry) }
    if isHidden(parent, name) { return req.reply(.permission) }
    if options.readOnly { return req.reply(.readOnly) }
    finishCreate(req, p, name) { () throws(Errno) in _ = try retrying { mkdirat(p.fd, name, mode) }
    }
  }

  func symlink(
    _ req: consuming Request, _ link: UnsafePointer<CChar>, _ parent: UInt64,
    _ name: UnsafePointer<CChar>
  ) {
    guard let p = table.node(parent) else { return req.reply(.noEntry) }
    if isHidden(parent, name) { return req.reply(.permission) }
    if options.readOnly { return req.reply(.readOnly) }
    finishCreate(req, p, name) { () throws(Errno) in
      _ = try retrying { symlinkat(link, p.fd, name) }
    }
  }

  func unlink(_ req: consuming Request, _ parent: UInt64, _ name: UnsafePointer<CChar>) {
    guard let p = table.node(parent) else { return req.reply(.noEntry) }
    if isHidden(parent, name) { return req.reply(.noEntry) }
    if options.readOnly { return req.reply(.readOnly) }
    req.reply(
      attempt { () throws(Errno) in
        _ = try retrying { unlinkat(p.fd, name, 0) }
        syncDirectory(p)
      })
  }

  func rmdir(_ req: consuming Request, _ parent: UInt64, _ name: UnsafePointer<CChar>) {
    guard let p = table.node(parent) else { return req.reply(.noEntry) }
    if isHidden(parent, name) { return req.reply(.noEntry) }
    if options.readOnly { return req.reply(.readOnly) }
    req.reply(
      attempt { () throws(Errno) in
        _ = try retrying { unlinkat(p.fd, name, AT_REMOVEDIR) }
        syncDirectory(p)
      })
  }

  func rename(
    _ req: consuming Request, _ parent: UInt64, _ name: UnsafePointer<CChar>, _ newParent: UInt64,
    _ newName: UnsafePointer<CChar>, _ flags: UInt32
  ) {
    guard let p = table.node(parent), let np = table.node(newParent) else {
      return req.reply(.noEntry)
    }
    if isHidden(parent, name) { return req.reply(.noEntry) }
    if isHidden(newParent, newName) { return req.reply(.permission) }
    if options.readOnly { return req.reply(.readOnly) }
    req.reply(
      attempt { () throws(Errno) in
        if flags == 0 {
          _ = try retrying { renameat(p.fd, name, np.fd, newName) }
        } else {
          _ = try retrying { statefs_renameat2(p.fd, name, np.fd, newName, flags) }
        }
        syncDirectory(np)
        if np !== p { syncDirectory(p) }
      })
  }

  func link(
    _ req: consuming Request, _ ino: UInt64, _ newParent: UInt64, _ newName: UnsafePointer<CChar>
  ) {
    guard let n = table.node(ino), let np = table.node(newParent) else {
      return req.reply(.noEntry)
    }
    if isHidden(newParent, newName) { return req.reply(.permission) }
    if options.readOnly { return req.reply(.readOnly) }
    do {
      _ = try retrying { linkat(n.fd, "", np.fd, newName, LinuxFlags.emptyPath) }
      let e = try lookupEntry(np, newName)
      syncDirectory(np)
      req.entry(e)
    } catch {
      req.reply(error)
    }
  }
}
