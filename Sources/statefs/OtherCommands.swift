import ArgumentParser
import CFuse
import Foundation
import Logging
import StateFS

/// `statefs unmount`: detach a mount (like `fusermount -u`), explaining a busy one.
struct Unmount: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Unmount a statefs mount; pending commits complete first.")

  @Argument(help: "The mountpoint.")
  var mountpoint: String

  @Flag(help: "Detach now even if files are open; the daemon ends when they are closed.")
  var lazy = false

  func run() throws {
    let mp = resolvePath(mountpoint) ?? absolutePath(mountpoint)
    guard let entry = readMountTable().last(where: { $0.mountpoint == mp }) else {
      throw StartError("\(mountpoint) is not mounted")
    }
    guard entry.fstype == "fuse.statefs" else {
      throw StartError("\(mountpoint) is not a statefs mount (it is \(entry.fstype))")
    }
    if umount2(mp, lazy ? Int32(MNT_DETACH) : 0) == 0 { return }
    let e = errno
    if e == EBUSY {
      throw StartError(
        "\(mountpoint) is busy: files or directories under it are still open (close them, or use --lazy)"
      )
    }
    if e == EPERM {
      // Not root: the setuid helper unmounts mounts the caller owns.
      let rc = runQuiet(["/bin/fusermount3", "-u" + (lazy ? "z" : ""), mp])
      if rc == 0 { return }
      throw StartError("cannot unmount \(mountpoint): permission denied (fusermount3 exit \(rc))")
    }
    throw StartError("cannot unmount \(mountpoint): \(describeErrno(e))")
  }
}

/// `statefs status`: the live mounts and their counters.
struct Status: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Show live statefs mounts and their counters.")

  @Argument(help: "Only this mountpoint.")
  var mountpoint: String?

  @Flag(help: "Print JSON (one array of objects) for scripts.")
  var json = false

  func run() throws {
    var entries = readMountTable().filter { $0.fstype == "fuse.statefs" }
    if let m = mountpoint {
      let mp = resolvePath(m) ?? absolutePath(m)
      entries = entries.filter { $0.mountpoint == mp }
      if entries.isEmpty { throw StartError("\(m) is not a statefs mount") }
    }
    var objects: [[String: Any]] = []
    for e in entries {
      var obj: [String: Any] = ["mountpoint": e.mountpoint, "source": e.source]
      let size = getxattr(e.mountpoint, statusXattrName, nil, 0)
      if size > 0 {
        var buf = [UInt8](repeating: 0, count: size)
        let n = getxattr(e.mountpoint, statusXattrName, &buf, size)
        if n > 0,
          let parsed = try? JSONSerialization.jsonObject(with: Data(buf[0..<n])) as? [String: Any]
        {
          obj.merge(parsed) { _, new in new }
          obj["state"] = "live"
        }
      } else {
        obj["state"] =
          errno == ENOTCONN ? "dead (daemon gone; mount again to recover)" : "unreachable"
      }
      objects.append(obj)
    }
    if json {
      let data = try JSONSerialization.data(withJSONObject: objects, options: [.sortedKeys])
      print(String(decoding: data, as: UTF8.self))
      return
    }
    if objects.isEmpty {
      print("no statefs mounts")
      return
    }
    for o in objects {
      print("\(o["mountpoint"] ?? "?")  (source \(o["source"] ?? "?"))")
      let keys = [
        "state", "pid", "options", "uptime_s", "commits", "bytes_committed", "commit_failures",
        "lock_waits",
        "lock_wait_total_us", "lock_wait_max_us", "recoveries", "open_handles", "snapshots",
        "memory_bytes",
        "spilled_bytes",
      ]
      for k in keys {
        if let v = o[k] { print("  \(k.padding(toLength: 20, withPad: " ", startingAt: 0)) \(v)") }
      }
    }
  }
}

/// `statefs recover`: roll a source directory's journal forward without mounting.
struct Recover: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Roll forward interrupted commits in a source directory without mounting.")

  @Argument(help: "The source directory (what was mounted).")
  var directory: String

  @Flag(help: "fsync each repaired file.")
  var durable = false

  @Flag(help: "Set unreadable or corrupt journal files aside (as *.corrupt) instead of stopping.")
  var discardCorrupt = false

  func run() throws {
    let root = open(directory, LinuxFlags.path | O_DIRECTORY | O_CLOEXEC)
    if root < 0 { throw StartError("\(directory): \(describeErrno(errno))") }
    defer { close(root) }
    let priv = openat(root, privateDirectoryName, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
    if priv < 0 {
      if errno == ENOENT {
        print("nothing to recover: \(directory) has no \(privateDirectoryName) directory")
        return
      }
      throw StartError("\(directory)/\(privateDirectoryName): \(describeErrno(errno))")
    }
    defer { close(priv) }
    var logger = Logger(label: "statefs")
    logger.logLevel = .warning
    do {
      let r = try Recovery.run(
        sourceFd: root, privateDirFd: priv, durable: durable, discardCorrupt: discardCorrupt,
        logger: logger)
      print(
        "rolled forward \(r.rolledForward), dropped incomplete \(r.dropped), orphaned \(r.orphaned), "
          + "live journals skipped \(r.skippedLive), stale files removed \(r.removedStale)")
    } catch {
      throw StartError("\(error)")
    }
  }
}
