import Foundation
import Logging
import Testing

@testable import StateFS

/// A scratch source directory with a private directory and an engine over it.
final class Scratch {
  let dir: String
  let rootFd: Int32
  let privFd: Int32
  let stats = Stats()
  let engine: CommitEngine

  init(threshold: Int64 = 4 << 20, journal: Bool = true) throws {
    dir = NSTemporaryDirectory() + "statefs-unit-\(UUID().uuidString)"
    try FileManager.default.createDirectory(
      atPath: dir + "/.statefs", withIntermediateDirectories: true)
    rootFd = open(dir, O_RDONLY | O_DIRECTORY)
    privFd = open(dir + "/.statefs", O_RDONLY | O_DIRECTORY)
    var o = CommitOptions()
    o.spillThreshold = threshold
    o.journal = journal
    o.truncationWait = 0.05
    engine = CommitEngine(
      privateDirFd: privFd, options: o, stats: stats, logger: Logger(label: "test"))
  }

  deinit {
    close(rootFd)
    close(privFd)
    try? FileManager.default.removeItem(atPath: dir)
  }

  func put(_ name: String, _ text: String) throws {
    try text.write(toFile: dir + "/" + name, atomically: false, encoding: .utf8)
  }

  func get(_ name: String) throws -> String {
    try String(contentsOfFile: dir + "/" + name, encoding: .utf8)
  }

  func ino(_ name: String) -> UInt64 {
    var st = stat()
    stat(dir + "/" + name, &st)
    return UInt64(st.st_ino)
  }

  func handle(_ name: String, _ flags: Int32, file: FileState = FileState()) throws -> OpenFile {
    let acc = flags & O_ACCMODE
    let fd = open(dir + "/" + name, (acc == O_RDONLY ? O_RDONLY : O_RDWR) | O_CREAT, 0o644)
    #expect(fd >= 0)
    return try engine.open(fd: fd, inode: ino(name), nodeID: 2, flags: flags, file: file)
  }

  func write(_ h: OpenFile, _ text: String, at offset: Int64 = 0) throws {
    let bytes = Array(text.utf8)
    try bytes.withUnsafeBytes { p in
      try engine.write(h, bytes: p.baseAddress!, count: p.count, offset: offset)
    }
  }

  func read(_ h: OpenFile) throws -> String {
    var buf = [UInt8](repeating: 0, count: 1 << 16)
    let n = try buf.withUnsafeMutableBytes { p in
      try engine.read(h, offset: 0, count: p.count, into: p.baseAddress!)
    }
    return String(decoding: buf[0..<n], as: UTF8.self)
  }
}

@Suite("Commit engine (no FUSE)")
struct CommitEngineTests {
  @Test func writesStayPrivateUntilTheCommit() throws {
    let s = try Scratch()
    try s.put("job", "INITIALIZING")
    let w = try s.handle("job", O_WRONLY | O_TRUNC)
    try s.write(w, "RUNNING")
    #expect(try s.get("job") == "INITIALIZING")
    _ = try s.engine.flush(w)
    #expect(try s.get("job") == "RUNNING")
    #expect(s.engine.release(w) == false)
    #expect(s.stats.commits.load(ordering: .relaxed) == 1)
  }

  @Test func shorterVersionLeavesNoTail() throws {
    let s = try Scratch()
    try s.put("job", "INITIALIZING")
    let inode = s.ino("job")
    let w = try s.handle("job", O_WRONLY | O_TRUNC)
    try s.write(w, "RUNNING")
    _ = try s.engine.flush(w)
    _ = s.engine.release(w)
    #expect(try s.get("job") == "RUNNING")
    #expect(s.ino("job") == inode, "commits write in place: the inode stays the same")
  }

  @Test func readerKeepsItsVersionWhileOthersCommit() throws {
    let s = try Scratch()
    try s.put("f", "version one")
    let r = try s.handle("f", O_RDONLY)
    let w = try s.handle("f", O_WRONLY | O_TRUNC)
    try s.write(w, "v2")
    _ = try s.engine.flush(w)
    #expect(try s.read(r) == "version one")
    let r2 = try s.handle("f", O_RDONLY)
    #expect(try s.read(r2) == "v2")
  }

  @Test func truncationAloneIsPublishedAtReleaseNotAtFirstFlush() throws {
    let s = try Scratch()
    try s.put("f", "old content")
    let file = FileState()
    let w = try s.handle("f", O_WRONLY | O_TRUNC, file: file)
    #expect(
      try s.engine.flush(w) == false,
      "the dup2 close of `echo x > f` must not publish an empty file")
    #expect(try s.get("f") == "old content")
    #expect(file.pendingTruncations.load(ordering: .relaxed) == 1)
    #expect(s.engine.release(w))
    #expect(try s.get("f") == "")
    #expect(file.pendingTruncations.load(ordering: .relaxed) == 0)
  }

  @Test func writeAfterTheDupCloseCommitsWhole() throws {
    let s = try Scratch()
    try s.put("f", "INITIALIZING")
    let file = FileState()
    let w = try s.handle("f", O_WRONLY | O_TRUNC, file: file)
    _ = try s.engine.flush(w)
    try s.write(w, "RUNNING\n")
    #expect(file.pendingTruncations.load(ordering: .relaxed) == 0)
    _ = try s.engine.flush(w)
    #expect(try s.get("f") == "RUNNING\n")
  }

  @Test func closeByAProcessThatDidNotWriteCommitsNothing() throws {
    let s = try Scratch()
    try s.put("f", "INITIALIZING")
    let w = try s.handle("f", O_RDWR)
    let bytes = Array("RUNNING".utf8)
    try bytes.withUnsafeBytes { p in
      try s.engine.write(w, bytes: p.baseAddress!, count: p.count, offset: 0, owner: 7)
    }
    #expect(
      try s.engine.flush(w, owner: 9) == false,
      "a child closing its inherited copy is not the writer")
    #expect(try s.get("f") == "INITIALIZING")
    try s.engine.truncate(w, size: 7)
    _ = try s.engine.flush(w, owner: 7)
    #expect(try s.get("f") == "RUNNING")
  }

  @Test func kernelCachesAreDroppedOnlyWhenTheyMayBeStale() throws {
    let s = try Scratch()
    try s.put("f", "old")
    let file = FileState()
    let w = try s.handle("f", O_WRONLY | O_TRUNC, file: file)
    try s.write(w, "new content")
    #expect(try s.engine.flush(w) == false, "the kernel saw every write: nothing to drop")
    try s.write(w, "newer")
    file.attributesServed()
    #expect(try s.engine.flush(w), "attributes handed out after the write are now stale")
    let now = try s.get("f")
    #expect(now == "newerontent", "the buffer keeps the committed bytes past the rewrite")
  }

  @Test func appendsLandAtTheCurrentEndAsOneUnit() throws {
    let s = try Scratch()
    try s.put("log", "a\n")
    let a1 = try s.handle("log", O_WRONLY | O_APPEND)
    let a2 = try s.handle("log", O_WRONLY | O_APPEND)
    try s.write(a1, "one-")
    try s.write(a2, "two\n")
    try s.write(a1, "more\n")
    _ = try s.engine.flush(a2)
    _ = try s.engine.flush(a1)
    #expect(try s.get("log") == "a\ntwo\none-more\n")
  }

  @Test func readWriteStartsFromTheCommittedVersion() throws {
    let s = try Scratch()
    try s.put("f", "hello world")
    let w = try s.handle("f", O_RDWR)
    try s.write(w, "J", at: 0)
    #expect(try s.read(w) == "Jello world")
    try s.engine.truncate(w, size: 5)
    #expect(try s.read(w) == "Jello")
    _ = try s.engine.flush(w)
    #expect(try s.get("f") == "Jello")
  }

  @Test func largeBuffersSpillToDisk() throws {
    let s = try Scratch(threshold: 64 << 10)
    try s.put("big", "")
    let w = try s.handle("big", O_WRONLY | O_TRUNC)
    let chunk = [UInt8](repeating: 0x41, count: 32 << 10)
    for i in 0..<32 {
      try chunk.withUnsafeBytes { p in
        try s.engine.write(w, bytes: p.baseAddress!, count: p.count, offset: Int64(i * chunk.count))
      }
    }
    #expect(s.stats.memoryBytes.load(ordering: .relaxed) <= 128 << 10)
    #expect(s.stats.spilledBytes.load(ordering: .relaxed) == 1 << 20)
    _ = try s.engine.flush(w)
    var st = stat()
    stat(s.dir + "/big", &st)
    #expect(st.st_size == 1 << 20)
    let r = try s.handle("big", O_RDONLY)
    #expect(r.state.withLock { $0.snapshot?.isInPlace } == true, "a large version is read in place")
  }

  @Test func largeReaderKeepsItsVersionAndDoesNotBlockThisDaemonsCommit() throws {
    let s = try Scratch(threshold: 64 << 10)
    let old = String(repeating: "o", count: 200 << 10)
    try s.put("big", old)
    let file = FileState()
    let r = try s.handle("big", O_RDONLY, file: file)
    #expect(file.inPlaceReaders.withLock { $0.count } == 1)
    let w = try s.handle("big", O_WRONLY | O_TRUNC, file: file)
    try s.write(w, "short")
    let done = DispatchSemaphore(value: 0)
    let engine = s.engine
    DispatchQueue.global().async {
      _ = try? engine.flush(w)
      done.signal()
    }
    #expect(
      done.wait(timeout: .now() + 10) == .success, "the reader got its own copy; the commit went on"
    )
    #expect(try s.get("big") == "short")
    var buf = [UInt8](repeating: 0, count: 300 << 10)
    let n = try buf.withUnsafeMutableBytes { p in
      try s.engine.read(r, offset: 0, count: p.count, into: p.baseAddress!)
    }
    #expect(n == old.utf8.count && buf[0..<n].allSatisfy { $0 == UInt8(ascii: "o") })
    #expect(file.inPlaceReaders.withLock { $0.count } == 0)
  }

  @Test func commitWaitsForAReaderHoldingTheSharedLock() throws {
    let s = try Scratch()
    try s.put("f", "old")
    let holder = open(s.dir + "/f", O_RDONLY)
    defer { close(holder) }
    #expect(flock(holder, LOCK_SH) == 0)
    let w = try s.handle("f", O_WRONLY | O_TRUNC)
    try s.write(w, "new")
    let started = DispatchSemaphore(value: 0)
    let done = DispatchSemaphore(value: 0)
    let engine = s.engine
    DispatchQueue.global().async {
      started.signal()
      _ = try? engine.flush(w)
      done.signal()
    }
    // Only once the committer runs does "not done yet" mean "waiting for the lock".
    #expect(started.wait(timeout: .now() + 10) == .success)
    #expect(done.wait(timeout: .now() + 0.5) == .timedOut, "the commit must wait for LOCK_SH to go")
    #expect(try s.get("f") == "old")
    flock(holder, LOCK_UN)
    #expect(done.wait(timeout: .now() + 10) == .success)
    #expect(try s.get("f") == "new")
    #expect(s.stats.lockWaits.load(ordering: .relaxed) == 1)
  }

  @Test func journalRecordRollsForwardAfterACrash() throws {
    let s = try Scratch()
    try s.put("f", "previous")
    let fd = open(s.dir + "/f", O_RDWR)
    defer { close(fd) }
    let content = Blob(store: s.engine.spill)
    let text = Array("the new version".utf8)
    try text.withUnsafeBytes { p in try content.write(p.baseAddress!, count: p.count, offset: 0) }
    // A record begun but never retired, as a daemon killed mid-commit leaves it.
    let journal = Journal(dirFd: s.privFd, durable: false)
    let slot = try journal.begin(
      target: fd, inode: s.ino("f"), kind: .replace, offset: 0, content: content)
    try "torn-tail-of-old".write(toFile: s.dir + "/f", atomically: false, encoding: .utf8)
    // The daemon dies: its slot descriptor (and lock) goes.
    close(slot!.fd)
    let names = try FileManager.default.contentsOfDirectory(atPath: s.dir + "/.statefs")
    #expect(names.contains { $0.hasPrefix("journal-") })
    let report = try recover(s)
    #expect(report == 1)
    #expect(try s.get("f") == "the new version")
  }

  @Test func largeCommitIsJournaledByLinkingItsSpillFile() throws {
    let s = try Scratch(threshold: 64 << 10)
    try s.put("f", "previous")
    let fd = open(s.dir + "/f", O_RDWR)
    defer { close(fd) }
    let content = Blob(store: s.engine.spill)
    let big = [UInt8](repeating: 0x5A, count: 300 << 10)
    try big.withUnsafeBytes { p in try content.write(p.baseAddress!, count: p.count, offset: 0) }
    #expect(content.isSpilled)
    let journal = Journal(dirFd: s.privFd, durable: false)
    let slot = try journal.begin(
      target: fd, inode: s.ino("f"), kind: .replace, offset: 0, content: content)
    #expect(slot?.dataFile != nil, "a spilled version is linked, not copied")
    #expect((slot?.recordBytes ?? 0) < 4096, "the record holds a name, not 300 KiB")
    try "torn".write(toFile: s.dir + "/f", atomically: false, encoding: .utf8)
    close(slot!.fd)
    #expect(try recover(s) == 1)
    let data = try Data(contentsOf: URL(fileURLWithPath: s.dir + "/f"))
    #expect(data.count == big.count && data.allSatisfy { $0 == 0x5A })
    let left = try FileManager.default.contentsOfDirectory(atPath: s.dir + "/.statefs")
    #expect(!left.contains { $0.hasPrefix("data-") }, "the data file goes with its record")
  }

  @Test func incompleteRecordIsDroppedAndTheFileKeepsItsVersion() throws {
    let s = try Scratch()
    try s.put("f", "previous")
    let fd = open(s.dir + "/f", O_RDWR)
    defer { close(fd) }
    let content = Blob(store: s.engine.spill)
    let text = Array(String(repeating: "x", count: 10000).utf8)
    try text.withUnsafeBytes { p in try content.write(p.baseAddress!, count: p.count, offset: 0) }
    let journal = Journal(dirFd: s.privFd, durable: false)
    let slot = try journal.begin(
      target: fd, inode: s.ino("f"), kind: .replace, offset: 0, content: content)
    close(slot!.fd)
    // Cut the record's content short, as a kill during the journal write would.
    let name = "journal-\(journal.instance)-\(slot!.index)"
    #expect(truncate(s.dir + "/.statefs/" + name, 256 + 5000) == 0)
    #expect(try recover(s) == 0)
    #expect(try s.get("f") == "previous")
  }

  @Test func checksumDependsOnEveryByte() {
    var a = Checksum()
    var b = Checksum()
    let x: [UInt8] = Array("0123456789abcdef0123".utf8)
    var y = x
    y[17] ^= 1
    x.withUnsafeBytes { a.update($0) }
    y.withUnsafeBytes { b.update($0) }
    #expect(a.value != b.value)
  }
}

/// Runs recovery as a new daemon would after this one died.
func recover(_ s: Scratch) throws -> Int {
  let r = try Recovery.run(
    sourceFd: s.rootFd, privateDirFd: s.privFd, durable: false, logger: Logger(label: "test"))
  return r.rolledForward
}
