/*
 * faultshim: an LD_PRELOAD library that injects I/O faults into one file (a test
 * fixture for tests/test_faults.py; see docs/reliability.md).
 *
 * CRYPTFUSE_FAULTS names a control file, re-read whenever it changes (tests replace it
 * with a rename).  Its lines:
 *
 *   target PATH                      the file to hurt (matched by device and inode, so
 *                                    every descriptor of it counts, O_DIRECT ones too)
 *   log PATH                         append "op errno offset length" per injected fault
 *   read|write|any ERR START END [N] calls whose range meets [START, END) of the file
 *                                    fail with ERR (EIO, ENOSPC, ... or a number), or,
 *                                    with ERR "short", transfer only part of it; at
 *                                    most N times (default: forever)
 *   fsync ERR [N]                    fsync/fdatasync of the file fail with ERR
 *
 * Intercepted: pread/pwrite, preadv/pwritev (and their 64 and v2 forms), fsync,
 * fdatasync: the calls the daemon (Python's os module and cryptfuse/_fastpath.c) makes
 * on a container.  Under AddressSanitizer this library comes after the sanitizer
 * runtime in LD_PRELOAD (tests/sanitize/sitecustomize.py keeps that order); the
 * sanitizer's interceptors then call ours, which call libc's.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_RULES 32
enum { OP_READ = 1, OP_WRITE = 2, OP_FSYNC = 4 };

typedef struct {
    int ops;
    int err; /* errno, or 0 for a short transfer */
    uint64_t start, end;
    long remaining; /* -1: forever */
} rule_t;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct stat ctl_seen;
static int have_target;
static dev_t target_dev;
static ino_t target_ino;
static char log_path[4096];
static rule_t rules[MAX_RULES];
static int nrules;

static int parse_err(const char *s)
{
    static const struct {
        const char *name;
        int value;
    } names[] = {{"EIO", EIO},       {"ENOSPC", ENOSPC}, {"EROFS", EROFS}, {"ENXIO", ENXIO},
                 {"ENODEV", ENODEV}, {"EDQUOT", EDQUOT}, {"ESTALE", ESTALE}};
    if (strcmp(s, "short") == 0)
        return 0;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcmp(s, names[i].name) == 0)
            return names[i].value;
    int n = atoi(s);
    return n > 0 ? n : EIO;
}

/* Re-read the control file if it changed; call with mu held. */
static void reload(void)
{
    const char *ctl = getenv("CRYPTFUSE_FAULTS");
    struct stat st;
    if (ctl == NULL || stat(ctl, &st) != 0) {
        nrules = 0;
        return;
    }
    if (st.st_ino == ctl_seen.st_ino && st.st_dev == ctl_seen.st_dev
        && st.st_mtim.tv_sec == ctl_seen.st_mtim.tv_sec
        && st.st_mtim.tv_nsec == ctl_seen.st_mtim.tv_nsec && st.st_size == ctl_seen.st_size)
        return;
    ctl_seen = st;
    FILE *f = fopen(ctl, "re");
    if (f == NULL)
        return;
    nrules = 0;
    log_path[0] = 0;
    char line[4200];
    while (fgets(line, sizeof line, f) != NULL) {
        char word[16], arg[4096];
        unsigned long long a = 0, b = 0;
        long n = -1;
        line[strcspn(line, "\n")] = 0;
        if (sscanf(line, "%15s %4095s", word, arg) != 2)
            continue;
        if (strcmp(word, "target") == 0) {
            struct stat t;
            /* A target that is gone (lazily unmounted) keeps its last identity. */
            if (stat(arg, &t) == 0) {
                have_target = 1;
                target_dev = t.st_dev;
                target_ino = t.st_ino;
            }
        } else if (strcmp(word, "log") == 0) {
            snprintf(log_path, sizeof log_path, "%s", arg);
        } else if (nrules < MAX_RULES && strcmp(word, "fsync") == 0) {
            sscanf(line, "%*s %*s %ld", &n);
            rules[nrules++] = (rule_t){OP_FSYNC, parse_err(arg), 0, UINT64_MAX, n};
        } else if (nrules < MAX_RULES
                   && (strcmp(word, "read") == 0 || strcmp(word, "write") == 0
                       || strcmp(word, "any") == 0)
                   && sscanf(line, "%*s %*s %llu %llu %ld", &a, &b, &n) >= 2) {
            int ops = word[0] == 'r' ? OP_READ : word[0] == 'w' ? OP_WRITE : OP_READ | OP_WRITE;
            rules[nrules++] = (rule_t){ops, parse_err(arg), a, b, n};
        }
    }
    fclose(f);
}

static void log_hit(const char *op, int err, uint64_t off, uint64_t len)
{
    if (!log_path[0])
        return;
    int fd = (int)syscall(SYS_openat, AT_FDCWD, log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC,
                          0600);
    if (fd < 0)
        return;
    char line[128];
    int n = snprintf(line, sizeof line, "%s %d %llu %llu\n", op, err, (unsigned long long)off,
                     (unsigned long long)len);
    (void)syscall(SYS_write, fd, line, (size_t)n);
    (void)syscall(SYS_close, fd);
}

/*
 * The fault for a call of kind *op* on *fd* over [off, off + len): -1 none, 0 a short
 * transfer, else the errno to fail with.
 */
static int fault_for(int fd, int op, uint64_t off, uint64_t len)
{
    int saved = errno, result = -1;
    struct stat st;
    pthread_mutex_lock(&mu);
    reload();
    if (nrules > 0 && have_target && fstat(fd, &st) == 0 && st.st_dev == target_dev
        && st.st_ino == target_ino) {
        for (int i = 0; i < nrules; i++) {
            rule_t *r = &rules[i];
            if (!(r->ops & op) || r->remaining == 0)
                continue;
            if (op != OP_FSYNC && !(off < r->end && r->start < off + (len ? len : 1)))
                continue;
            if (r->err == 0 && len < 2)
                continue; /* nothing to shorten */
            if (r->remaining > 0)
                r->remaining--;
            result = r->err;
            log_hit(op == OP_READ ? "read" : op == OP_WRITE ? "write" : "fsync", result, off, len);
            break;
        }
    }
    pthread_mutex_unlock(&mu);
    errno = saved;
    return result;
}

#define REAL(name) real_##name
#define DECLARE_REAL(ret, name, ...)                                                         \
    static ret (*real_##name)(__VA_ARGS__);                                                  \
    static ret (*get_##name(void))(__VA_ARGS__)                                              \
    {                                                                                        \
        if (real_##name == NULL)                                                             \
            real_##name = (ret(*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name);                      \
        return real_##name;                                                                  \
    }

static size_t iov_total(const struct iovec *iov, int cnt)
{
    size_t total = 0;
    for (int i = 0; i < cnt; i++)
        total += iov[i].iov_len;
    return total;
}

/* A short count for a transfer of *len* (at least 2) bytes: about half, in whole pages
   when that leaves any, so that what an O_DIRECT caller does next stays aligned. */
static size_t short_len(size_t len)
{
    size_t half = len / 2;
    return half >= 4096 ? half / 4096 * 4096 : half;
}

/* A short part of the transfer, as an iovec list in *out*: the count of it. */
static int iov_half(const struct iovec *iov, int cnt, struct iovec *out)
{
    size_t want = short_len(iov_total(iov, cnt));
    int n = 0;
    for (int i = 0; i < cnt && want > 0 && n < 64; i++) {
        out[n] = iov[i];
        if (out[n].iov_len > want)
            out[n].iov_len = want;
        want -= out[n].iov_len;
        n++;
    }
    return n;
}

#define PRW(name, op, bufconst)                                                              \
    DECLARE_REAL(ssize_t, name, int, bufconst void *, size_t, off_t)                         \
    ssize_t name(int fd, bufconst void *buf, size_t len, off_t off)                          \
    {                                                                                        \
        int f = fault_for(fd, op, (uint64_t)off, len);                                       \
        if (f > 0) {                                                                         \
            errno = f;                                                                       \
            return -1;                                                                       \
        }                                                                                    \
        return get_##name()(fd, buf, f == 0 ? short_len(len) : len, off);                    \
    }

PRW(pread, OP_READ, )
PRW(pread64, OP_READ, )
PRW(pwrite, OP_WRITE, const)
PRW(pwrite64, OP_WRITE, const)

#define PRWV(name, op)                                                                       \
    DECLARE_REAL(ssize_t, name, int, const struct iovec *, int, off_t)                       \
    ssize_t name(int fd, const struct iovec *iov, int cnt, off_t off)                        \
    {                                                                                        \
        int f = fault_for(fd, op, (uint64_t)off, iov_total(iov, cnt));                       \
        if (f > 0) {                                                                         \
            errno = f;                                                                       \
            return -1;                                                                       \
        }                                                                                    \
        if (f == 0) {                                                                        \
            struct iovec half[64];                                                           \
            return get_##name()(fd, half, iov_half(iov, cnt, half), off);                    \
        }                                                                                    \
        return get_##name()(fd, iov, cnt, off);                                              \
    }

PRWV(preadv, OP_READ)
PRWV(preadv64, OP_READ)
PRWV(pwritev, OP_WRITE)
PRWV(pwritev64, OP_WRITE)

#define PRWV2(name, op)                                                                      \
    DECLARE_REAL(ssize_t, name, int, const struct iovec *, int, off_t, int)                  \
    ssize_t name(int fd, const struct iovec *iov, int cnt, off_t off, int flags)             \
    {                                                                                        \
        /* offset -1: the file position; faults are by explicit offset only */               \
        int f = off < 0 ? -1 : fault_for(fd, op, (uint64_t)off, iov_total(iov, cnt));        \
        if (f > 0) {                                                                         \
            errno = f;                                                                       \
            return -1;                                                                       \
        }                                                                                    \
        if (f == 0) {                                                                        \
            struct iovec half[64];                                                           \
            return get_##name()(fd, half, iov_half(iov, cnt, half), off, flags);             \
        }                                                                                    \
        return get_##name()(fd, iov, cnt, off, flags);                                       \
    }

PRWV2(preadv2, OP_READ)
PRWV2(preadv64v2, OP_READ)
PRWV2(pwritev2, OP_WRITE)
PRWV2(pwritev64v2, OP_WRITE)

#define SYNC(name)                                                                           \
    DECLARE_REAL(int, name, int)                                                             \
    int name(int fd)                                                                         \
    {                                                                                        \
        int f = fault_for(fd, OP_FSYNC, 0, 0);                                               \
        if (f > 0) {                                                                         \
            errno = f;                                                                       \
            return -1;                                                                       \
        }                                                                                    \
        return get_##name()(fd);                                                             \
    }

SYNC(fsync)
SYNC(fdatasync)
