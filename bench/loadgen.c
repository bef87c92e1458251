/*
 * loadgen: the load generator of scripts/bench.
 *
 * One process runs one workload on one directory for a fixed time (or a fixed
 * number of bytes) and prints one JSON line with its counts and latencies.
 * Every operation is timed with clock_gettime(CLOCK_MONOTONIC); the cost of the
 * measurement itself is two vDSO calls and one store (well under 1 us).
 *
 *   loadgen WORKLOAD --dir DIR [--mode plain|flock] [--secs S] [--bytes N]
 *                    [--chunk N] [--readers N] [--files N]
 *
 * Workloads (DIR is the root of one copy of the data set made by scripts/bench):
 *   w4k     open(O_WRONLY|O_TRUNC) + write 4 KiB + close, round robin over w/f00..f63
 *   r4k     open(O_RDONLY) + read until EOF + close of r/f00..f63 (4 KiB each)
 *   stat    stat() of r/f00..f63
 *   meta    create+write 4 KiB+close m/tmp, rename it over the existing m/sNN,
 *           then create + unlink m/scratch
 *   append  open(O_WRONLY|O_APPEND) + write 100 bytes + close, over a/f00..f63
 *   mixed   1 writer rewriting x/state with self-checking content of alternating
 *           lengths, READERS reader processes reading it whole; torn reads counted
 *   seqw    write --bytes in --chunk pieces to q/big (open O_TRUNC ... close)
 *   seqr    read q/big in --chunk pieces until EOF
 *
 * --mode flock is the Toil protocol on a plain directory: writers open without
 * O_TRUNC, flock(LOCK_EX), write, ftruncate, close; readers open, flock(LOCK_SH),
 * read, close; appenders take LOCK_EX around the write.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NFILES_MAX 1024
#define MAX_SAMPLES (4u << 20)
#define MIXED_LONG 4000
#define MIXED_SHORT 100
#define HDR_LEN 28 /* "S%016llx L%08x\n" */

static const char *dir = ".";
static int flockMode = 0;
static double secs = 1.0;
static long long totalBytes = 32ll << 20;
static size_t chunk = 128 << 10;
static int readers = 4;
static int nfiles = 64;

/* Set in the mixed workload: readers stop when the writer dies. */
static volatile int *gStop = NULL;

static inline uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what, const char *path) {
  fprintf(stderr, "loadgen: %s %s: %s\n", what, path ? path : "", strerror(errno));
  if (gStop) *gStop = 1;
  exit(2);
}

/* ---- latency samples ---- */

typedef struct {
  uint32_t *v;  /* nanoseconds, clamped to 4.29 s */
  size_t n, cap;
} Samples;

static void samples_init(Samples *s, size_t cap) {
  s->v = malloc(cap * sizeof(uint32_t));
  if (!s->v) die("malloc", "samples");
  s->n = 0;
  s->cap = cap;
}

static inline int samples_add(Samples *s, uint64_t ns) {
  if (s->n >= s->cap) return 0;
  s->v[s->n++] = ns > 0xffffffffull ? 0xffffffffu : (uint32_t)ns;
  return 1;
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

/* Sorts in place; quantiles by the nearest-rank method, in microseconds. */
static void samples_quantiles(Samples *s, double *p50, double *p99, double *mx) {
  if (s->n == 0) {
    *p50 = *p99 = *mx = -1;
    return;
  }
  qsort(s->v, s->n, sizeof(uint32_t), cmp_u32);
  size_t i50 = (size_t)(0.50 * (double)(s->n - 1) + 0.5);
  size_t i99 = (size_t)(0.99 * (double)(s->n - 1) + 0.5);
  *p50 = s->v[i50] / 1000.0;
  *p99 = s->v[i99] / 1000.0;
  *mx = s->v[s->n - 1] / 1000.0;
}

/* ---- small helpers ---- */

static void path_of(char *out, size_t cap, const char *sub, const char *name, int i) {
  if (i >= 0)
    snprintf(out, cap, "%s/%s/%s%02d", dir, sub, name, i);
  else
    snprintf(out, cap, "%s/%s/%s", dir, sub, name);
}

static void xwrite_all(int fd, const char *buf, size_t n, const char *path) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = write(fd, buf + done, n - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      die("write", path);
    }
    done += (size_t)w;
  }
}

static void xpwrite_all(int fd, const char *buf, size_t n, off_t off, const char *path) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = pwrite(fd, buf + done, n - done, off + (off_t)done);
    if (w < 0) {
      if (errno == EINTR) continue;
      die("pwrite", path);
    }
    done += (size_t)w;
  }
}

static void xflock(int fd, int op, const char *path) {
  while (flock(fd, op) != 0) {
    if (errno != EINTR) die("flock", path);
  }
}

/* Reads until EOF; returns the byte count. */
static ssize_t read_all(int fd, char *buf, size_t cap, const char *path) {
  size_t got = 0;
  for (;;) {
    ssize_t r = read(fd, buf + got, cap - got);
    if (r < 0) {
      if (errno == EINTR) continue;
      die("read", path);
    }
    if (r == 0) return (ssize_t)got;
    got += (size_t)r;
    if (got == cap) return (ssize_t)got; /* larger than the buffer: caller sees it */
  }
}

/* Writes a whole new version of `path` (plain: O_TRUNC; flock: Toil protocol). */
static void rewrite(const char *path, const char *buf, size_t n) {
  if (flockMode) {
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) die("open", path);
    xflock(fd, LOCK_EX, path);
    xpwrite_all(fd, buf, n, 0, path);
    if (ftruncate(fd, (off_t)n) != 0) die("ftruncate", path);
    if (close(fd) != 0) die("close", path);
  } else {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) die("open", path);
    xwrite_all(fd, buf, n, path);
    if (close(fd) != 0) die("close", path);
  }
}

/* Opens for reading, with LOCK_SH in flock mode. */
static int open_read(const char *path) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) die("open", path);
  if (flockMode) xflock(fd, LOCK_SH, path);
  return fd;
}

static void print_result(const char *wl, uint64_t ops, double elapsed, Samples *s, const char *extra) {
  double p50, p99, mx;
  samples_quantiles(s, &p50, &p99, &mx);
  printf("{\"workload\":\"%s\",\"mode\":\"%s\",\"ops\":%" PRIu64
         ",\"secs\":%.6f,\"ops_per_s\":%.2f,\"p50_us\":%.3f,\"p99_us\":%.3f,\"max_us\":%.3f,\"samples\":%zu%s%s}\n",
         wl, flockMode ? "flock" : "plain", ops, elapsed, elapsed > 0 ? (double)ops / elapsed : 0.0, p50, p99, mx,
         s->n, extra && *extra ? "," : "", extra ? extra : "");
  fflush(stdout);
}

/* ---- the small-file workloads: one op at a time for `secs` ---- */

typedef void (*OpFn)(uint64_t i, char *buf);

static char pathbuf[4096];

static void op_w4k(uint64_t i, char *buf) {
  path_of(pathbuf, sizeof pathbuf, "w", "f", (int)(i % (uint64_t)nfiles));
  buf[0] = (char)('a' + i % 26);
  rewrite(pathbuf, buf, 4096);
}

static uint64_t shortReads = 0;

static void op_r4k(uint64_t i, char *buf) {
  path_of(pathbuf, sizeof pathbuf, "r", "f", (int)(i % (uint64_t)nfiles));
  int fd = open_read(pathbuf);
  ssize_t n = read_all(fd, buf, 65536, pathbuf);
  if (n != 4096) shortReads++;
  if (close(fd) != 0) die("close", pathbuf);
}

static void op_stat(uint64_t i, char *buf) {
  (void)buf;
  struct stat st;
  path_of(pathbuf, sizeof pathbuf, "r", "f", (int)(i % (uint64_t)nfiles));
  if (stat(pathbuf, &st) != 0) die("stat", pathbuf);
}

static void op_meta(uint64_t i, char *buf) {
  char tmp[4096], dst[4096], scratch[4096];
  path_of(tmp, sizeof tmp, "m", "tmp", -1);
  path_of(dst, sizeof dst, "m", "s", (int)(i % (uint64_t)nfiles));
  path_of(scratch, sizeof scratch, "m", "scratch", -1);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) die("create", tmp);
  buf[0] = (char)('a' + i % 26);
  xwrite_all(fd, buf, 4096, tmp);
  if (close(fd) != 0) die("close", tmp);
  if (rename(tmp, dst) != 0) die("rename", dst);
  fd = open(scratch, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) die("create", scratch);
  if (close(fd) != 0) die("close", scratch);
  if (unlink(scratch) != 0) die("unlink", scratch);
}

static void op_append(uint64_t i, char *buf) {
  path_of(pathbuf, sizeof pathbuf, "a", "f", (int)(i % (uint64_t)nfiles));
  int fd = open(pathbuf, O_WRONLY | O_APPEND | O_CLOEXEC);
  if (fd < 0) die("open", pathbuf);
  if (flockMode) xflock(fd, LOCK_EX, pathbuf);
  memset(buf, 'a' + (int)(i % 26), 99);
  buf[99] = '\n';
  xwrite_all(fd, buf, 100, pathbuf);
  if (close(fd) != 0) die("close", pathbuf);
}

static void run_ops(const char *wl, OpFn fn) {
  char *buf = aligned_alloc(4096, 65536);
  if (!buf) die("malloc", "buffer");
  memset(buf, 'x', 65536);
  Samples s;
  samples_init(&s, MAX_SAMPLES);
  /* Warm up: entries, attributes, the daemon's threads. */
  uint64_t i = 0;
  uint64_t wend = now_ns() + 50000000ull;
  for (int k = 0; k < 4 * nfiles && now_ns() < wend; k++) fn(i++, buf);
  uint64_t warmup = i;
  shortReads = 0;
  uint64_t ops = 0;
  uint64_t start = now_ns();
  uint64_t deadline = start + (uint64_t)(secs * 1e9);
  uint64_t t0 = start, t1 = start;
  for (;;) {
    t0 = now_ns();
    if (t0 >= deadline) break;
    fn(i++, buf);
    t1 = now_ns();
    ops++;
    if (!samples_add(&s, t1 - t0)) break;
  }
  double elapsed = (double)(t1 - start) / 1e9;
  char extra[128];
  snprintf(extra, sizeof extra, "\"warmup_ops\":%" PRIu64 ",\"short_reads\":%" PRIu64, warmup, shortReads);
  print_result(wl, ops, elapsed, &s, extra);
}

/* ---- mixed: 1 writer + N readers on one file, self-checking content ---- */

typedef struct {
  volatile int go;
  volatile int stop;
  struct {
    uint64_t reads, torn, empty, wrongLength, badBody;
    double p50, p99;
  } r[64];
} Shared;

static size_t make_version(char *buf, uint64_t seq) {
  size_t len = (seq & 1) ? MIXED_SHORT : MIXED_LONG;
  char hdr[HDR_LEN + 1];
  snprintf(hdr, sizeof hdr, "S%016llx L%08x\n", (unsigned long long)seq, (unsigned)len);
  memcpy(buf, hdr, HDR_LEN);
  for (size_t j = HDR_LEN; j < len; j++) buf[j] = (char)('a' + (seq + j) % 26);
  return len;
}

/* 0 when `buf[0..n)` is one whole version; otherwise the kind of tear. */
static int check_version(const char *buf, size_t n) {
  if (n == 0) return 1;
  if (n < HDR_LEN || buf[0] != 'S' || buf[17] != ' ' || buf[18] != 'L' || buf[27] != '\n') return 3;
  char tmp[20];
  memcpy(tmp, buf + 1, 16);
  tmp[16] = 0;
  unsigned long long seq = strtoull(tmp, NULL, 16);
  memcpy(tmp, buf + 19, 8);
  tmp[8] = 0;
  unsigned long len = strtoul(tmp, NULL, 16);
  if (len != n) return 2;
  for (size_t j = HDR_LEN; j < n; j++)
    if (buf[j] != (char)('a' + (seq + j) % 26)) return 3;
  return 0;
}

static void run_mixed(void) {
  char path[4096];
  path_of(path, sizeof path, "x", "state", -1);
  Shared *sh = mmap(NULL, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (sh == MAP_FAILED) die("mmap", "shared");
  memset(sh, 0, sizeof *sh);
  gStop = &sh->stop;
  if (readers > 64) readers = 64;
  char *buf = malloc(65536);
  if (!buf) die("malloc", "buffer");
  /* A complete version to start from. */
  size_t n0 = make_version(buf, 0);
  rewrite(path, buf, n0);
  pid_t kids[64];
  for (int k = 0; k < readers; k++) {
    pid_t p = fork();
    if (p < 0) die("fork", "reader");
    if (p == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() == 1) _exit(1);
      Samples s;
      samples_init(&s, MAX_SAMPLES / 4);
      char *rb = malloc(65536);
      while (!sh->go) usleep(100);
      uint64_t reads = 0, torn = 0, empty = 0, wl = 0, bb = 0;
      while (!sh->stop) {
        uint64_t t0 = now_ns();
        int fd = open_read(path);
        ssize_t n = read_all(fd, rb, 65536, path);
        close(fd);
        uint64_t t1 = now_ns();
        samples_add(&s, t1 - t0);
        reads++;
        int c = check_version(rb, (size_t)n);
        if (c) {
          torn++;
          if (c == 1) empty++;
          if (c == 2) wl++;
          if (c == 3) bb++;
        }
      }
      double p50, p99, mx;
      samples_quantiles(&s, &p50, &p99, &mx);
      sh->r[k].reads = reads;
      sh->r[k].torn = torn;
      sh->r[k].empty = empty;
      sh->r[k].wrongLength = wl;
      sh->r[k].badBody = bb;
      sh->r[k].p50 = p50;
      sh->r[k].p99 = p99;
      _exit(0);
    }
    kids[k] = p;
  }
  Samples s;
  samples_init(&s, MAX_SAMPLES);
  sh->go = 1;
  usleep(2000);
  uint64_t seq = 1, ops = 0;
  uint64_t start = now_ns();
  uint64_t deadline = start + (uint64_t)(secs * 1e9);
  uint64_t t1 = start;
  for (;;) {
    uint64_t t0 = now_ns();
    if (t0 >= deadline) break;
    size_t n = make_version(buf, seq++);
    rewrite(path, buf, n);
    t1 = now_ns();
    ops++;
    if (!samples_add(&s, t1 - t0)) break;
  }
  sh->stop = 1;
  double elapsed = (double)(t1 - start) / 1e9;
  uint64_t reads = 0, torn = 0, empty = 0, wl = 0, bb = 0;
  double rp50 = 0;
  for (int k = 0; k < readers; k++) {
    int st;
    while (waitpid(kids[k], &st, 0) < 0 && errno == EINTR) {
    }
    reads += sh->r[k].reads;
    torn += sh->r[k].torn;
    empty += sh->r[k].empty;
    wl += sh->r[k].wrongLength;
    bb += sh->r[k].badBody;
    rp50 += sh->r[k].p50 / readers;
  }
  char extra[512];
  snprintf(extra, sizeof extra,
           "\"reads\":%" PRIu64 ",\"reads_per_s\":%.2f,\"torn\":%" PRIu64 ",\"torn_empty\":%" PRIu64
           ",\"torn_length\":%" PRIu64 ",\"torn_body\":%" PRIu64 ",\"reader_p50_us\":%.3f,\"readers\":%d",
           reads, elapsed > 0 ? reads / elapsed : 0.0, torn, empty, wl, bb, rp50, readers);
  print_result("mixed", ops, elapsed, &s, extra);
}

/* ---- sequential: bytes in chunks, one open ---- */

static void run_seq(int writing) {
  char path[4096];
  path_of(path, sizeof path, "q", "big", -1);
  char *buf = aligned_alloc(4096, chunk);
  if (!buf) die("malloc", "chunk");
  for (size_t j = 0; j < chunk; j++) buf[j] = (char)('A' + j % 61);
  Samples s;
  samples_init(&s, MAX_SAMPLES);
  uint64_t ops = 0, bytes = 0;
  uint64_t start = now_ns();
  int fd;
  if (writing) {
    fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | (flockMode ? 0 : O_TRUNC), 0644);
    if (fd < 0) die("open", path);
    if (flockMode) xflock(fd, LOCK_EX, path);
  } else {
    fd = open_read(path);
  }
  uint64_t opened = now_ns();
  for (;;) {
    uint64_t t0 = now_ns();
    ssize_t r;
    if (writing) {
      if ((long long)bytes >= totalBytes) break;
      size_t want = chunk;
      if ((long long)(bytes + want) > totalBytes) want = (size_t)(totalBytes - (long long)bytes);
      r = pwrite(fd, buf, want, (off_t)bytes);
      if (r < 0) die("pwrite", path);
    } else {
      r = read(fd, buf, chunk);
      if (r < 0) die("read", path);
      if (r == 0) break;
    }
    uint64_t t1 = now_ns();
    bytes += (uint64_t)r;
    ops++;
    samples_add(&s, t1 - t0);
  }
  if (writing && flockMode && ftruncate(fd, (off_t)bytes) != 0) die("ftruncate", path);
  uint64_t beforeClose = now_ns();
  if (close(fd) != 0) die("close", path);
  uint64_t end = now_ns();
  double elapsed = (double)(end - start) / 1e9;
  char extra[256];
  snprintf(extra, sizeof extra,
           "\"bytes\":%" PRIu64 ",\"mib_per_s\":%.2f,\"open_ms\":%.3f,\"close_ms\":%.3f", bytes,
           elapsed > 0 ? (double)bytes / (1 << 20) / elapsed : 0.0, (double)(opened - start) / 1e6,
           (double)(end - beforeClose) / 1e6);
  print_result(writing ? "seqw" : "seqr", ops, elapsed, &s, extra);
}

static void usage(void) {
  fprintf(stderr,
          "usage: loadgen w4k|r4k|stat|meta|append|mixed|seqw|seqr --dir DIR [--mode plain|flock]\n"
          "               [--secs S] [--bytes N] [--chunk N] [--readers N] [--files N]\n");
  exit(2);
}

int main(int argc, char **argv) {
  if (argc < 2) usage();
  const char *wl = argv[1];
  for (int a = 2; a < argc; a++) {
    const char *k = argv[a];
    if (a + 1 >= argc) usage();
    const char *v = argv[++a];
    if (!strcmp(k, "--dir"))
      dir = v;
    else if (!strcmp(k, "--mode"))
      flockMode = !strcmp(v, "flock");
    else if (!strcmp(k, "--secs"))
      secs = atof(v);
    else if (!strcmp(k, "--bytes"))
      totalBytes = atoll(v);
    else if (!strcmp(k, "--chunk"))
      chunk = (size_t)atoll(v);
    else if (!strcmp(k, "--readers"))
      readers = atoi(v);
    else if (!strcmp(k, "--files"))
      nfiles = atoi(v);
    else
      usage();
  }
  if (nfiles < 1 || nfiles > NFILES_MAX || chunk < 1) usage();
  signal(SIGPIPE, SIG_IGN);
  if (!strcmp(wl, "w4k"))
    run_ops(wl, op_w4k);
  else if (!strcmp(wl, "r4k"))
    run_ops(wl, op_r4k);
  else if (!strcmp(wl, "stat"))
    run_ops(wl, op_stat);
  else if (!strcmp(wl, "meta"))
    run_ops(wl, op_meta);
  else if (!strcmp(wl, "append"))
    run_ops(wl, op_append);
  else if (!strcmp(wl, "mixed"))
    run_mixed();
  else if (!strcmp(wl, "seqw"))
    run_seq(1);
  else if (!strcmp(wl, "seqr"))
    run_seq(0);
  else
    usage();
  return 0;
}
