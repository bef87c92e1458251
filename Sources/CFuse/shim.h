// C shim for statefs: libfuse3's low-level API at the 3.12+ ABI, plus the
// Linux names Swift's Glibc module does not import (they need _GNU_SOURCE).
#ifndef STATEFS_CFUSE_SHIM_H
#define STATEFS_CFUSE_SHIM_H

#define FUSE_USE_VERSION 312
#include <fuse3/fuse_lowlevel.h>
#include <fcntl.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <sys/syscall.h>
#include <sys/file.h>
#include <sys/statvfs.h>
#include <sys/vfs.h>
#include <unistd.h>
#include <sys/uio.h>
#include <malloc.h>
#include <linux/fuse.h>

static const int statefs_O_PATH = 010000000;
static const int statefs_O_TMPFILE = (020000000 | 0200000);
static const int statefs_O_NOATIME = 01000000;
static const int statefs_AT_EMPTY_PATH = 0x1000;
static const unsigned int statefs_RENAME_NOREPLACE = 1;
static const unsigned int statefs_RENAME_EXCHANGE = 2;
static const unsigned int statefs_RENAME_WHITEOUT = 4;
static const long statefs_UTIME_NOW = ((1l << 30) - 1l);
static const long statefs_UTIME_OMIT = ((1l << 30) - 2l);
static const short statefs_POSIX_SPAWN_SETSID = 0x80;
static const int statefs_SEEK_DATA = 3;
static const int statefs_SEEK_HOLE = 4;
static const int statefs_FALLOC_FL_KEEP_SIZE = 0x01;
static const int statefs_MAX_HANDLE_SZ = 128;

/// renameat2(2), which glibc only declares under _GNU_SOURCE.
static inline int statefs_renameat2(int olddirfd, const char *oldpath,
                                    int newdirfd, const char *newpath,
                                    unsigned int flags) {
  return (int)syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
}

/// fallocate(2).
static inline int statefs_fallocate(int fd, int mode, off_t offset, off_t len) {
  return (int)syscall(SYS_fallocate, fd, mode, offset, len);
}

/// copy_file_range(2).
static inline ssize_t statefs_copy_file_range(int fd_in, off_t *off_in, int fd_out,
                                              off_t *off_out, size_t len) {
  return syscall(SYS_copy_file_range, fd_in, off_in, fd_out, off_out, len, 0);
}

/// name_to_handle_at(2) for an fd (AT_EMPTY_PATH): writes the handle bytes and
/// type; returns the byte count or -1.
static inline int statefs_fd_to_handle(int fd, unsigned char *out, int cap, int *type) {
  struct {
    unsigned int handle_bytes;
    int handle_type;
    unsigned char f_handle[128];
  } h;
  int mount_id = 0;
  h.handle_bytes = 128;
  if (syscall(SYS_name_to_handle_at, fd, "", &h, &mount_id, 0x1000) != 0) return -1;
  if ((int)h.handle_bytes > cap) { errno = EOVERFLOW; return -1; }
  memcpy(out, h.f_handle, h.handle_bytes);
  *type = h.handle_type;
  return (int)h.handle_bytes;
}

/// open_by_handle_at(2) from bytes produced by statefs_fd_to_handle.
static inline int statefs_open_by_handle(int mountfd, const unsigned char *bytes, int len,
                                         int type, int flags) {
  struct {
    unsigned int handle_bytes;
    int handle_type;
    unsigned char f_handle[128];
  } h;
  if (len < 0 || len > 128) { errno = EINVAL; return -1; }
  h.handle_bytes = (unsigned int)len;
  h.handle_type = type;
  memcpy(h.f_handle, bytes, (size_t)len);
  return (int)syscall(SYS_open_by_handle_at, mountfd, &h, flags);
}

/// flock(2), whose name Swift confuses with `struct flock`.
static inline int statefs_flock(int fd, int op) { return flock(fd, op); }

/// statvfs(2), whose name Swift confuses with `struct statvfs`.
static inline int statefs_statvfs(const char *path, struct statvfs *out) { return statvfs(path, out); }

/// The filesystem type magic of a path (statfs f_type), or -1 with errno set.
static inline long statefs_fs_type(const char *path) {
  struct statfs sf;
  if (statfs(path, &sf) != 0) return -1;
  return (long)sf.f_type;
}

/// pipe2(O_CLOEXEC).
static inline int statefs_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

/// The unique id of the kernel's INIT request, seen by statefs_io_read.
static inline uint64_t *statefs_init_unique(void) {
  static uint64_t unique = UINT64_MAX;
  return &unique;
}

/// The flags the kernel offered in its INIT request.
static inline uint32_t *statefs_init_offered(void) {
  static uint32_t offered = 0;
  return &offered;
}

/// Reads one request from /dev/fuse, noting the INIT request's id and offered flags.
static inline ssize_t statefs_io_read(int fd, void *buf, size_t len, void *userdata) {
  (void)userdata;
  ssize_t r = read(fd, buf, len);
  if (r >= (ssize_t)sizeof(struct fuse_in_header)) {
    const struct fuse_in_header *h = (const struct fuse_in_header *)buf;
    if (h->opcode == FUSE_INIT && r >= (ssize_t)sizeof(struct fuse_in_header) + 16) {
      uint32_t offered;
      memcpy(&offered, (const unsigned char *)buf + sizeof(struct fuse_in_header) + 12, 4);
      __atomic_store_n(statefs_init_offered(), offered, __ATOMIC_RELEASE);
      __atomic_store_n(statefs_init_unique(), h->unique, __ATOMIC_RELEASE);
    }
  }
  return r;
}

/// Writes one reply to /dev/fuse. The INIT reply additionally asks for two things
/// libfuse 3.14 cannot request: FUSE_DIRECT_IO_ALLOW_MMAP (flags2 bit 4, kernel 6.6+),
/// without which shared mmap of a direct_io file fails with ENODEV; and
/// FUSE_HANDLE_KILLPRIV_V2 (flags bit 28), with which the daemon clears setuid/setgid
/// bits and file capabilities itself, sparing every O_TRUNC open a GETXATTR round trip.
static inline ssize_t statefs_io_writev(int fd, struct iovec *iov, int count, void *userdata) {
  (void)userdata;
  if (count >= 2 && iov[0].iov_len >= sizeof(struct fuse_out_header)) {
    struct fuse_out_header *oh = (struct fuse_out_header *)iov[0].iov_base;
    if (oh->error == 0 && oh->unique == __atomic_load_n(statefs_init_unique(), __ATOMIC_ACQUIRE) &&
        iov[1].iov_len >= 36) {
      unsigned char *out = (unsigned char *)iov[1].iov_base;
      uint32_t flags, flags2;
      memcpy(&flags, out + 12, 4);
      memcpy(&flags2, out + 32, 4);
      if (flags & (1u << 30)) { /* FUSE_INIT_EXT: flags2 is read */
        flags2 |= (1u << 4);
        memcpy(out + 32, &flags2, 4);
      }
      if (__atomic_load_n(statefs_init_offered(), __ATOMIC_ACQUIRE) & (1u << 28)) {
        flags |= (1u << 28);
        memcpy(out + 12, &flags, 4);
      }
      __atomic_store_n(statefs_init_unique(), UINT64_MAX, __ATOMIC_RELEASE);
    }
  }
  return writev(fd, iov, count);
}

/// splice(2) for replies whose data sits in a file (no copy through the daemon).
static inline ssize_t statefs_io_splice_send(int fdin, off_t *offin, int fdout, off_t *offout,
                                             size_t len, unsigned int flags, void *userdata) {
  (void)userdata;
  return syscall(SYS_splice, fdin, offin, fdout, offout, len, flags);
}

/// Routes the session's /dev/fuse traffic through statefs_io_read/_writev.
static inline int statefs_use_custom_io(struct fuse_session *se) {
  static const struct fuse_custom_io io = {
    .writev = statefs_io_writev,
    .read = statefs_io_read,
    .splice_receive = NULL,
    .splice_send = statefs_io_splice_send,
  };
  return fuse_session_custom_io(se, &io, fuse_session_fd(se));
}

/// FUSE_ARGS_INIT, which Swift cannot import.
static inline struct fuse_args statefs_args_init(int argc, char **argv) {
  struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
  return args;
}

/// Per-request caller identity.
static inline uid_t statefs_req_uid(fuse_req_t req) { return fuse_req_ctx(req)->uid; }
static inline gid_t statefs_req_gid(fuse_req_t req) { return fuse_req_ctx(req)->gid; }
static inline pid_t statefs_req_pid(fuse_req_t req) { return fuse_req_ctx(req)->pid; }
static inline mode_t statefs_req_umask(fuse_req_t req) { return fuse_req_ctx(req)->umask; }

/// Replies to a read with bytes that live in a file, without copying them
/// through the daemon's memory.
static inline int statefs_reply_fd_data(fuse_req_t req, int fd, off_t off, size_t size) {
  struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
  buf.buf[0].flags = (enum fuse_buf_flags)(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
  buf.buf[0].fd = fd;
  buf.buf[0].pos = off;
  return fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

/// Copies a write request's data (which may sit in a pipe) into memory.
static inline ssize_t statefs_copy_in(struct fuse_bufvec *in, void *dst, size_t size) {
  struct fuse_bufvec out = FUSE_BUFVEC_INIT(size);
  out.buf[0].mem = dst;
  return fuse_buf_copy(&out, in, (enum fuse_buf_copy_flags)0);
}

/// Copies a write request's data into a file at an offset.
static inline ssize_t statefs_copy_in_fd(struct fuse_bufvec *in, int fd, off_t off, size_t size) {
  struct fuse_bufvec out = FUSE_BUFVEC_INIT(size);
  out.buf[0].flags = (enum fuse_buf_flags)(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
  out.buf[0].fd = fd;
  out.buf[0].pos = off;
  return fuse_buf_copy(&out, in, (enum fuse_buf_copy_flags)0);
}

#endif
