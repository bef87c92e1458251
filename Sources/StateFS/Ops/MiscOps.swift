import CFuse

#if canImport(Glibc)
  import Glibc
#endif

/// The virtual xattr on the mount's root that `statefs status` reads.
public let statusXattrName = "user.statefs.status"

/// statfs, access and extended attributes.
extension FileSystem {
  /// Whether an attribute name is statefs's own (`user.statefs.*`): hidden and untouchable.
  func isReserved(_ name: UnsafePointer<CChar>) -> Bool {
    strncmp(name, InFlightMarker.reservedPrefix, InFlightMarker.reservedPrefix.utf8.count) == 0
  }

  func statfs(_ req: consuming Request, _ ino: UInt64) {
    var sv = statvfs()
    if statefs_statvfs(Sys.procPath(table.root.fd), &sv) != 0 { return req.reply(.current) }
    req.statfs(sv)
  }

  func access(_ req: consuming Request, _ ino: UInt64, _ mask: Int32) {
    guard let n = table.node(ino) else { return req.reply(.noEntry) }
    if options.readOnly && mask & W_OK != 0 { return req.reply(.readOnly) }
    if n.type == S_IFLNK { return req.ok() }
    if faccessat(AT_FDCWD, Sys.procPath(n.fd), mask, 0) != 0 { return req.reply(.current) }
    req.ok()
  }

  func setxattr(
    _ req: consuming Request, _ ino: UInt64, _ name: UnsafePointer<CChar>,
    _ value: UnsafePointer<CChar>,
    _ size: Int, _ flags: Int32
  ) {
    guard let n = table.node(ino) else { return req.reply(.noEntry) }
    if options.readOnly { return req.reply(.readOnly) }
    if isReserved(name) { return req.reply(.permission) }
    req.reply(
      attempt { () throws(Errno) in
        _ = try retrying { CFuse.setxattr(Sys.procPath(n.fd), name, value, size, flags) }
      })
  }

  func getxattr(_ req: consuming Request, _ ino: UInt64, _ name: UnsafePointer<CChar>, _ size: Int)
  {
    guard let n = table.node(ino) else { return req.reply(.noEntry) }
    if ino == UInt64(FUSE_ROOT_ID) && strcmp(name, statusXattrName) == 0 {
      let json = Array(statusJSON().utf8)
      if size == 0 { return req.xattrSize(json.count) }
      if size < json.count { return req.reply(Errno(ERANGE)) }
      let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: json.count, alignment: 1)
      defer { copy.deallocate() }
      copy.copyBytes(from: json)
      return req.buffer(UnsafeRawBufferPointer(copy))
    }
    if isReserved(name) { return req.reply(Errno(ENODATA)) }
    if size == 0 {
      let r = CFuse.getxattr(Sys.procPath(n.fd), name, nil, 0)
      return r < 0 ? req.reply(.current) : req.xattrSize(r)
    }
    let buf = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
    defer { buf.deallocate() }
    let r = CFuse.getxattr(Sys.procPath(n.fd), name, buf, size)
    if r < 0 { return req.reply(.current) }
    req.buffer(UnsafeRawBufferPointer(start: buf, count: r))
  }

  func listxattr(_ req: consuming Request, _ ino: UInt64, _ size: Int) {
    guard let n = table.node(ino) else { return req.reply(.noEntry) }
    // The whole list, less statefs's own attributes (sizes must agree with what is served).
    var cap = max(size, 4096)
    var names: [CChar] = []
    while true {
      var buf = [CChar](repeating: 0, count: cap)
      let r = CFuse.listxattr(Sys.procPath(n.fd), &buf, cap)
      if r >= 0 {
        names = Array(buf[0..<r])
        break
      }
      if errno != ERANGE || cap > 1 << 24 { return req.reply(.current) }
      cap *= 4
    }
    var kept: [CChar] = []
    var start = 0
    for i in 0..<names.count where names[i] == 0 {
      let one = Array(names[start...i])
      start = i + 1
      let reserved = one.withUnsafeBufferPointer { isReserved($0.baseAddress!) }
      if !reserved { kept += one }
    }
    if size == 0 { return req.xattrSize(kept.count) }
    if kept.count > size { return req.reply(Errno(ERANGE)) }
    let out = UnsafeMutableRawBufferPointer.allocate(byteCount: max(kept.count, 1), alignment: 1)
    defer { out.deallocate() }
    kept.withUnsafeBytes { out.copyMemory(from: $0) }
    req.buffer(UnsafeRawBufferPointer(rebasing: out[0..<kept.count]))
  }

  func removexattr(_ req: consuming Request, _ ino: UInt64, _ name: UnsafePointer<CChar>) {
    guard let n = table.node(ino) else { return req.reply(.noEntry) }
    if options.readOnly { return req.reply(.readOnly) }
    if isReserved(name) { return req.reply(.permission) }
    req.reply(
      attempt { () throws(Errno) in _ = try retrying { CFuse.removexattr(Sys.procPath(n.fd), name) }
      })
  }
}
