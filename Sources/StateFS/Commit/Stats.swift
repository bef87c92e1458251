import Synchronization

/// Live counters of one daemon, shown by `statefs status`.
public final class Stats: Sendable {
  public let commits = Atomic<Int64>(0)
  public let bytesCommitted = Atomic<Int64>(0)
  public let commitFailures = Atomic<Int64>(0)
  public let lockWaits = Atomic<Int64>(0)
  public let lockWaitNanos = Atomic<Int64>(0)
  public let lockWaitMaxNanos = Atomic<Int64>(0)
  public let recoveries = Atomic<Int64>(0)
  public let openHandles = Atomic<Int64>(0)
  public let memoryBytes = Atomic<Int64>(0)
  public let spilledBytes = Atomic<Int64>(0)
  public let snapshots = Atomic<Int64>(0)

  public init() {}

  /// Records one wait for a flock that was held elsewhere.
  func recordLockWait(nanos: Int64) {
    lockWaits.add(1, ordering: .relaxed)
    lockWaitNanos.add(nanos, ordering: .relaxed)
    var seen = lockWaitMaxNanos.load(ordering: .relaxed)
    while nanos > seen {
      let (exchanged, original) = lockWaitMaxNanos.compareExchange(
        expected: seen, desired: nanos, ordering: .relaxed)
      if exchanged { break }
      seen = original
    }
  }

  /// The counters as ordered key/value pairs.
  public func snapshot() -> [(String, Int64)] {
    [
      ("commits", commits.load(ordering: .relaxed)),
      ("bytes_committed", bytesCommitted.load(ordering: .relaxed)),
      ("commit_failures", commitFailures.load(ordering: .relaxed)),
      ("lock_waits", lockWaits.load(ordering: .relaxed)),
      ("lock_wait_total_us", lockWaitNanos.load(ordering: .relaxed) / 1000),
      ("lock_wait_max_us", lockWaitMaxNanos.load(ordering: .relaxed) / 1000),
      ("recoveries", recoveries.load(ordering: .relaxed)),
      ("open_handles", openHandles.load(ordering: .relaxed)),
      ("snapshots", snapshots.load(ordering: .relaxed)),
      ("memory_bytes", memoryBytes.load(ordering: .relaxed)),
      ("spilled_bytes", spilledBytes.load(ordering: .relaxed)),
    ]
  }
}
