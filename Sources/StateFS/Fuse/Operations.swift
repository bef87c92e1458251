import CFuse

#if canImport(Glibc)
  import Glibc
#endif

/// The filesystem behind a request (the session's userdata).
@inline(__always)
private func fs(_ req: fuse_req_t?) -> FileSystem {
  Unmanaged<FileSystem>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
}

/// Builds libfuse's operation table. A free function on purpose: closures made in
/// main-actor code trap when libfuse worker threads call them.
func makeOperations() -> fuse_lowlevel_ops {
  var ops = fuse_lowlevel_ops()
  ops.`init` = { userdata, conn in
    guard let conn else { return }
    let c = conn.pointee
    var want = c.want
    // O_TRUNC must reach open(): a separate truncating SETATTR would publish an empty file.
    if c.capable & UInt32(FUSE_CAP_ATOMIC_O_TRUNC) != 0 { want |= UInt32(FUSE_CAP_ATOMIC_O_TRUNC) }
    // Every write must come to the daemon's buffers, never sit in the kernel's cache.
    want &= ~UInt32(FUSE_CAP_WRITEBACK_CACHE)
    // Let the kernel clear setuid/setgid bits on write as for any local filesystem.
    want &= ~UInt32(FUSE_CAP_HANDLE_KILLPRIV)
    // ls -l in one round trip per directory block, and lookups in parallel.
    if c.capable & UInt32(FUSE_CAP_READDIRPLUS) != 0 { want |= UInt32(FUSE_CAP_READDIRPLUS) }
    if c.capable & UInt32(FUSE_CAP_PARALLEL_DIROPS) != 0 {
      want |= UInt32(FUSE_CAP_PARALLEL_DIROPS)
    }
    // Reading a file's version is done once at open; the kernel need not read ahead.
    want &= ~UInt32(FUSE_CAP_AUTO_INVAL_DATA)
    // Replies from spill files and in-place versions are spliced, not copied.
    if c.capable & UInt32(FUSE_CAP_SPLICE_WRITE) != 0 {
      want |= UInt32(FUSE_CAP_SPLICE_WRITE) | UInt32(FUSE_CAP_SPLICE_MOVE)
    }
    conn.pointee.want = want
    // Large writes and reads in few round trips (libfuse's buffer allows 1 MiB).
    conn.pointee.max_write = 1 << 20
    conn.pointee.max_read = 0
    _ = userdata
  }
  ops.lookup = { req, parent, name in fs(req).lookup(Request(req!), UInt64(parent), name!) }
  ops.forget = { req, ino, n in
    fs(req).forget(UInt64(ino), n)
    Request(req!).none()
  }
  ops.forget_multi = { req, count, forgets in
    let f = fs(req)
    for i in 0..<count { f.forget(UInt64(forgets![i].ino), forgets![i].nlookup) }
    Request(req!).none()
  }
  ops.getattr = { req, ino, fi in fs(req).getattr(Request(req!), UInt64(ino), fi) }
  ops.setattr = { req, ino, attr, toSet, fi in
    fs(req).setattr(Request(req!), UInt64(ino), attr!, toSet, fi)
  }
  ops.readlink = { req, ino in fs(req).readlink(Request(req!), UInt64(ino)) }
  ops.mknod = { req, parent, name, mode, rdev in
    fs(req).mknod(Request(req!), UInt64(parent), name!, mode, rdev)
  }
  ops.mkdir = { req, parent, name, mode in fs(req).mkdir(Request(req!), UInt64(parent), name!, mode)
  }
  ops.unlink = { req, parent, name in fs(req).unlink(Request(req!), UInt64(parent), name!) }
  ops.rmdir = { req, parent, name in fs(req).rmdir(Request(req!), UInt64(parent), name!) }
  ops.symlink = { req, link, parent, name in
    fs(req).symlink(Request(req!), link!, UInt64(parent), name!)
  }
  ops.rename = { req, parent, name, newParent, newName, flags in
    fs(req).rename(Request(req!), UInt64(parent), name!, UInt64(newParent), newName!, flags)
  }
  ops.link = { req, ino, newParent, newName in
    fs(req).link(Request(req!), UInt64(ino), UInt64(newParent), newName!)
  }
  ops.open = { req, ino, fi in fs(req).open(Request(req!), UInt64(ino), fi!) }
  ops.create = { req, parent, name, mode, fi in
    fs(req).create(Request(req!), UInt64(parent), name!, mode, fi!)
  }
  ops.read = { req, _, size, off, fi in fs(req).read(Request(req!), size, Int64(off), fi!) }
  ops.write = { req, _, buf, size, off, fi in
    fs(req).write(Request(req!), buf!, size, Int64(off), fi!)
  }
  ops.flush = { req, _, fi in fs(req).flush(Request(req!), fi!) }
  ops.release = { req, _, fi in fs(req).release(Request(req!), fi!) }
  ops.fsync = { req, _, _, fi in fs(req).fsync(Request(req!), fi!) }
  ops.fallocate = { req, _, mode, off, len, fi in
    fs(req).fallocate(Request(req!), mode, Int64(off), Int64(len), fi!)
  }
  ops.lseek = { req, _, off, whence, fi in fs(req).lseek(Request(req!), Int64(off), whence, fi!) }
  ops.opendir = { req, ino, fi in fs(req).opendir(Request(req!), UInt64(ino), fi!) }
  ops.readdir = { req, _, size, off, fi in
    fs(req).readdir(Request(req!), size, Int64(off), fi!, plus: false)
  }
  ops.readdirplus = { req, _, size, off, fi in
    fs(req).readdir(Request(req!), size, Int64(off), fi!, plus: true)
  }
  ops.releasedir = { req, _, fi in fs(req).releasedir(Request(req!), fi!) }
  ops.fsyncdir = { req, _, _, fi in fs(req).fsyncdir(Request(req!), fi!) }
  ops.statfs = { req, ino in fs(req).statfs(Request(req!), UInt64(ino)) }
  ops.access = { req, ino, mask in fs(req).access(Request(req!), UInt64(ino), mask) }
  ops.setxattr = { req, ino, name, value, size, flags in
    fs(req).setxattr(Request(req!), UInt64(ino), name!, value!, size, flags)
  }
  ops.getxattr = { req, ino, name, size in fs(req).getxattr(Request(req!), UInt64(ino), name!, size)
  }
  ops.listxattr = { req, ino, size in fs(req).listxattr(Request(req!), UInt64(ino), size) }
  ops.removexattr = { req, ino, name in fs(req).removexattr(Request(req!), UInt64(ino), name!) }
  return ops
}
