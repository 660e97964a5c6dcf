/* failfs: an LD_PRELOAD shim that fails writes and fsyncs on command, for the storage fault
 * suite (tests/tests/storage_faults.rs). While the file named by WEIR_FAILFS_TRIGGER exists,
 * the calls named in WEIR_FAILFS_OPS ("fsync", "write" or "all") on files under
 * WEIR_FAILFS_UNDER fail with EIO; otherwise every call goes to libc. It exercises weir's real
 * write path (fjall's journal and tables) as a failing disk would. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int armed(int fd, const char *op) {
    const char *trigger = getenv("WEIR_FAILFS_TRIGGER");
    if (!trigger || access(trigger, F_OK) != 0) return 0;
    const char *ops = getenv("WEIR_FAILFS_OPS");
    if (ops && strcmp(ops, "all") != 0 && strcmp(ops, op) != 0) return 0;
    const char *under = getenv("WEIR_FAILFS_UNDER");
    if (!under) return 1;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    return strncmp(path, under, strlen(under)) == 0;
}

#define REAL(name) \
    static __typeof__(&name) real_##name; \
    if (!real_##name) real_##name = (__typeof__(&name))dlsym(RTLD_NEXT, #name)

int fsync(int fd) {
    REAL(fsync);
    if (armed(fd, "fsync")) { errno = EIO; return -1; }
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    if (armed(fd, "fsync")) { errno = EIO; return -1; }
    return real_fdatasync(fd);
}

ssize_t write(int fd, const void *buf, size_t n) {
    REAL(write);
    if (armed(fd, "write")) { errno = EIO; return -1; }
    return real_write(fd, buf, n);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    REAL(writev);
    if (armed(fd, "write")) { errno = EIO; return -1; }
    return real_writev(fd, iov, cnt);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t at) {
    REAL(pwrite);
    if (armed(fd, "write")) { errno = EIO; return -1; }
    return real_pwrite(fd, buf, n, at);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t at) {
    REAL(pwrite64);
    if (armed(fd, "write")) { errno = EIO; return -1; }
    return real_pwrite64(fd, buf, n, at);
}
