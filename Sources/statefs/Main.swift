import ArgumentParser
import StateFS

#if canImport(Glibc)
  import Glibc
#endif

/// The statefs command line: mount, unmount, status, recover.
@main
struct StateFSCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "statefs",
    abstract: "A FUSE filesystem that makes every file in a directory an atomic state file.",
    discussion: """
      Readers never see a half-written, empty or spliced file: writes are \
      buffered per open file and committed whole under flock(LOCK_EX) on the \
      backing file; reads take one whole version under flock(LOCK_SH). \
      `fusermount -u MOUNTPOINT` detaches.

      mount(8) form (used by mount.fuse3 and /etc/fstab):
        statefs SOURCE MOUNTPOINT [-o OPTIONS]
      """,
    version: statefsVersion,
    subcommands: [Mount.self, Unmount.self, Status.self, Recover.self]
  )

  static func main() {
    var args = Array(CommandLine.arguments.dropFirst())
    args = rewriteMountHelperForm(args)
    do {
      var command = try parseAsRoot(args)
      try command.run()
    } catch let e as UsageError {
      fail(e.description, code: 2)
    } catch let e as StartError {
      fail(e.description, code: e.code)
    } catch {
      // --help and --version are "errors" that exit 0 with their text.
      if exitCode(for: error) == .success { exit(withError: error) }
      let text =
        message(for: error).split(separator: "\n").first.map(String.init) ?? "invalid arguments"
      fail(text + " (see `statefs --help`)", code: 2)
    }
  }
}

/// The version `statefs --version` prints.
let statefsVersion = "0.1.0"

/// Turns mount.fuse3's `statefs SOURCE MOUNTPOINT -o OPTS` into `statefs mount`.
func rewriteMountHelperForm(_ args: [String]) -> [String] {
  let subcommands: Set<String> = ["mount", "unmount", "status", "recover", "help"]
  guard let first = args.first, !first.hasPrefix("-"), !subcommands.contains(first) else {
    return args
  }
  var positional: [String] = []
  var rest: [String] = []
  var i = 0
  while i < args.count {
    let a = args[i]
    if a == "-o" && i + 1 < args.count {
      rest += ["-o", args[i + 1]]
      i += 2
      continue
    }
    if a.hasPrefix("-o") && a.count > 2 {
      rest += ["-o", String(a.dropFirst(2))]
    } else if a.hasPrefix("-") {
      // mount(8) flags such as -n (no mtab), -s (sloppy), -v: nothing to do for us.
      if a == "-f" || a == "--foreground" { rest.append("--foreground") }
    } else {
      positional.append(a)
    }
    i += 1
  }
  guard positional.count == 2 else { return args }
  return ["mount", positional[1], "--source", positional[0]] + rest
}

/// Prints `statefs: error: MESSAGE` as one line on stderr and exits.
func fail(_ message: String, code: Int32) -> Never {
  let line = "statefs: error: \(message)\n"
  _ = line.withCString { write(2, $0, strlen($0)) }
  exit(code)
}
