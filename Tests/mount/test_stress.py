"""The stress test (scripts/stress): passes on statefs, and can fail: on a plain
directory the same workload is caught tearing."""
import json
import os
import signal
import subprocess

from conftest import is_mounted, run

STRESS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "stress"))


def run_stress(args, timeout):
    """Runs scripts/stress --json; stops it by PID (SIGTERM, then SIGKILL) on timeout."""
    p = subprocess.Popen([STRESS, "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)  # the script unmounts on SIGTERM
        try:
            p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate(timeout=30)
        raise AssertionError(f"scripts/stress {args} did not finish in {timeout}s")
    assert out.strip(), f"no result (exit {p.returncode}): {err[-2000:]}"
    res = json.loads(out)
    mp = res.get("mountpoint")
    if mp and is_mounted(mp):
        run(["fusermount3", "-uz", mp], timeout=30)
        raise AssertionError(f"scripts/stress left its mount {mp} behind")
    return p.returncode, res, err


def test_stress_on_statefs_has_no_torn_read_and_no_broken_append():
    # spill_threshold=1m: the 3 MiB versions spill to disk, the 300 KiB ones stay in RAM
    rc, res, err = run_stress(["--duration", "20", "-o", "spill_threshold=1m"], timeout=240)
    summary = {k: res[k] for k in ("reads", "writes", "appends", "errors", "samples", "daemon")}
    assert res["failures"] == 0, summary
    assert rc == 0, (err[-2000:], summary)
    assert res["reads_checked"] >= 500, summary
    for kind in ("cat", "python", "slow"):
        assert res["reads"][kind]["checked"] >= 20, summary
        assert res["reads"][kind]["ok"] == res["reads"][kind]["checked"]
    for kind in ("sh", "cp", "dd", "python-wb", "python-rewrite"):
        assert res["writes"].get(kind, 0) >= 3, summary
    assert res["appends"]["records_checked"] >= 500, summary
    assert res["daemon"]["commits"] > 0 and res["daemon"]["commit_failures"] == 0


def test_stress_catches_torn_and_empty_reads_on_a_plain_directory(workdir):
    plain = os.path.join(workdir, "plain")
    rc, res, err = run_stress(["--duration", "20", "--plain", plain, "--expect-failures"], timeout=120)
    summary = {k: res[k] for k in ("reads", "writes", "appends", "torn_why", "elapsed_s")}
    assert rc == 0, (err[-2000:], summary)
    assert res["read_failures"] > 0, summary
    assert sum(r["torn"] + r["empty"] for r in res["reads"].values()) > 0, summary
    assert res["elapsed_s"] <= 25, summary
    assert os.listdir(plain) == []  # it cleans up after itself
