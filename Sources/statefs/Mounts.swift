#if canImport(Glibc)
  import Glibc
#endif

/// One line of /proc/self/mountinfo.
struct MountEntry {
  let mountpoint: String
  let fstype: String
  let source: String
  let options: String
}

/// The kernel's mount table as this process sees it.
func readMountTable() -> [MountEntry] {
  guard let f = fopen("/proc/self/mountinfo", "r") else { return [] }
  defer { fclose(f) }
  var out: [MountEntry] = []
  var line: UnsafeMutablePointer<CChar>? = nil
  var cap = 0
  defer { free(line) }
  while getline(&line, &cap, f) > 0 {
    let text = String(cString: line!)
    let halves = text.split(separator: " - ", maxSplits: 1)
    guard halves.count == 2 else { continue }
    let left = halves[0].split(separator: " ")
    let right = halves[1].split(separator: " ")
    guard left.count >= 6, right.count >= 2 else { continue }
    out.append(
      MountEntry(
        mountpoint: unescapeMountField(String(left[4])), fstype: String(right[0]),
        source: unescapeMountField(String(right[1])), options: String(left[5])))
  }
  return out
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
func unescapeMountField(_ s: String) -> String {
  var bytes: [UInt8] = []
  let u = Array(s.utf8)
  var i = 0
  while i < u.count {
    if u[i] == 92, i + 3 < u.count,
      let v = UInt8(String(decoding: u[(i + 1)...(i + 3)], as: UTF8.self), radix: 8)
    {
      bytes.append(v)
      i += 4
    } else {
      bytes.append(u[i])
      i += 1
    }
  }
  return String(decoding: bytes, as: UTF8.self)
}

/// realpath(3); nil with errno set when it fails.
func resolvePath(_ path: String) -> String? {
  guard let p = realpath(path, nil) else { return nil }
  defer { free(p) }
  return String(cString: p)
}

/// Absolute form of a path without resolving symlinks (for paths that cannot be stat'ed).
func absolutePath(_ path: String) -> String {
  if path.hasPrefix("/") { return path }
  var buf = [CChar](repeating: 0, count: Int(PATH_MAX))
  guard getcwd(&buf, buf.count) != nil else { return path }
  let cwd = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
  return cwd == "/" ? "/" + path : cwd + "/" + path
}

/// strerror as a Swift string.
func describeErrno(_ e: Int32) -> String { String(cString: strerror(e)) }

/// Detaches a dead FUSE mount ("Transport endpoint is not connected").
func clearDeadMount(_ path: String) -> Bool {
  if umount2(path, Int32(MNT_DETACH)) == 0 { return true }
  return runQuiet(["/bin/fusermount3", "-uz", path]) == 0
    || runQuiet(["/usr/bin/fusermount3", "-uz", path]) == 0
}

/// Runs a program with stdio closed; returns its exit status (-1 if it could not start).
func runQuiet(_ argv: [String]) -> Int32 {
  var pid: pid_t = 0
  var actions = posix_spawn_file_actions_t()
  posix_spawn_file_actions_init(&actions)
  defer { posix_spawn_file_actions_destroy(&actions) }
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
  posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
  let cargs = argv.map { strdup($0) } + [nil]
  defer { for p in cargs { free(p) } }
  guard posix_spawn(&pid, argv[0], &actions, nil, cargs, environ) == 0 else { return -1 }
  var status: Int32 = 0
  while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
  return (status & 0x7f) == 0 ? (status >> 8) & 0xff : -1
}
