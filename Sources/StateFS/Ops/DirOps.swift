import CFuse
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// One entry read from a directory stream, kept when it did not fit a reply.
struct DirEntry {
  var name: [CChar]
  var ino: UInt64
  var type: UInt8
  var next: Int64
}

/// Position of an open directory stream.
struct DirCursor: ~Copyable {
  var offset: Int64 = 0
  var pending: DirEntry?
}

/// An opendir() handle: a directory stream and where the kernel is in it.
final class DirHandle: Sendable {
  nonisolated(unsafe) let stream: OpaquePointer
  let node: Node
  let cursor = Mutex(DirCursor())

  init(stream: OpaquePointer, node: Node) {
    self.stream = stream
    self.node = node
  }

  deinit { closedir(stream) }
}

/// Directory listing operations.
extension FileSystem {
  func dirHandle(_ fh: UInt64) -> DirHandle? {
    guard let p = UnsafeRawPointer(bitPattern: UInt(fh)) else { return nil }
    return Unmanaged<DirHandle>.fromOpaque(p).takeUnretainedValue()
  }

  func opendir(_ req: consuming Request, _ ino: UInt64, _ fi: UnsafeMutablePointer<fuse_file_info>)
  {
    guard let n = table.node(ino) else { return req.reply(.noEntry) }
    do {
      let fd = try Sys.openat(n.fd, ".", O_RDONLY | O_DIRECTORY)
      guard let dir = fdopendir(fd) else {
        let e = Errno.current
        Sys.close(fd)
        throw e
      }
      let h = DirHandle(stream: dir, node: n)
      fi.pointee.fh = UInt64(UInt(bitPattern: Unmanaged.passRetained(h).toOpaque()))
      req.open(fi)
    } catch {
      req.reply(error)
    }
  }

  func readdir(
    _ req: consuming Request, _ size: Int, _ off: Int64, _ fi: UnsafeMutablePointer<fuse_file_info>,
    plus: Bool
  ) {
    guard let d = dirHandle(fi.pointee.fh) else { return req.reply(.badFile) }
    let buf = UnsafeMutableRawPointer.allocate(byteCount: max(size, 1), alignment: 16)
    defer { buf.deallocate() }
    let raw = req.raw
    let atRoot = d.node.id == UInt64(FUSE_ROOT_ID)
    let result: Result<Int, Errno> = d.cursor.withLock { c in
      if off != c.offset {
        seekdir(d.stream, Int(off))
        c.offset = off
        c.pending = nil
      }
      var used = 0
      while true {
        var entry: DirEntry
        if let p = c.pending {
          entry = p
          c.pending = nil
        } else {
          errno = 0
          guard let de = Glibc.readdir(d.stream) else {
            if errno != 0 && used == 0 { return .failure(.current) }
            break
          }
          let name = withUnsafeBytes(of: de.pointee.d_name) { raw in
            Array(raw.bindMemory(to: CChar.self).prefix { $0 != 0 }) + [0]
          }
          entry = DirEntry(
            name: name, ino: UInt64(de.pointee.d_ino), type: de.pointee.d_type,
            next: Int64(de.pointee.d_off))
        }
        let hidden =
          atRoot
          && entry.name.withUnsafeBufferPointer {
            strcmp($0.baseAddress!, privateDirectoryName) == 0
          }
        if hidden {
          c.offset = entry.next
          continue
        }
        let isDot = entry.name.withUnsafeBufferPointer {
          strcmp($0.baseAddress!, ".") == 0 || strcmp($0.baseAddress!, "..") == 0
        }
        let added: Int = entry.name.withUnsafeBufferPointer { np in
          let name = np.baseAddress!
          if plus {
            var e = fuse_entry_param()
            var looked = false
            if isDot {
              e.attr.st_ino = ino_t(entry.ino)
              e.attr.st_mode = mode_t(entry.type) << 12
            } else {
              guard let found = try? lookupEntry(d.node, name) else { return -1 }
              e = found
              looked = true
            }
            let need = fuse_add_direntry_plus(
              raw, (buf + used).assumingMemoryBound(to: CChar.self), size - used, name, &e,
              off_t(entry.next))
            if need > size - used {
              if looked { table.forget(UInt64(e.ino), 1) }
              return 0
            }
            return need
          } else {
            var st = stat()
            st.st_ino = ino_t(entry.ino)
            st.st_mode = mode_t(entry.type) << 12
            let need = fuse_add_direntry(
              raw, (buf + used).assumingMemoryBound(to: CChar.self), size - used, name, &st,
              off_t(entry.next))
            return need > size - used ? 0 : need
          }
        }
        if added < 0 {
          // Vanished between readdir and lookup: skip it, as a listing racing an unlink would.
          c.offset = entry.next
          continue
        }
        if added == 0 {
          c.pending = entry
          break
        }
        used += added
        c.offset = entry.next
      }
      return .success(used)
    }
    switch result {
    case .success(let n): req.buffer(UnsafeRawBufferPointer(start: buf, count: n))
    case .failure(let e): req.reply(e)
    }
  }

  func releasedir(_ req: consuming Request, _ fi: UnsafeMutablePointer<fuse_file_info>) {
    if let p = UnsafeRawPointer(bitPattern: UInt(fi.pointee.fh)) {
      Unmanaged<DirHandle>.fromOpaque(p).release()
    }
    req.ok()
  }

  func fsyncdir(_ req: consuming Request, _ fi: UnsafeMutablePointer<fuse_file_info>) {
    guard let d = dirHandle(fi.pointee.fh) else { return req.reply(.badFile) }
    req.reply(attempt { () throws(Errno) in try Sys.fsync(dirfd(d.stream)) })
  }
}
