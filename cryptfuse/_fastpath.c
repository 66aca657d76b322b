/*
 * cryptfuse._fastpath: FUSE READ and WRITE of AES-XTS/CBC volumes served without the GIL.
 *
 * The Python request loop (cryptfuse.channel) costs tens of microseconds of
 * interpreter time per request and serialises every thread on the GIL; for
 * 4 KiB random I/O that, not the cipher, was the daemon's limit.  This module
 * serves the common requests in C from start to end:
 *
 *   Worker.serve(fuse_fd, buffer) reads requests from the FUSE descriptor with
 *   the GIL released.  A READ, or a WRITE of whole sectors inside the volume,
 *   is decrypted/encrypted with OpenSSL's AES-XTS or AES-CBC, one sector per IV,
 *   exactly as dm-crypt's aes-{xts,cbc}-{plain64,plain,plain64be,null,essiv:H}
 *   (keycount 1) do, and answered here.  Any
 *   other request, and any request whose container I/O fails, is handed back:
 *   serve() returns its length with the request still in *buffer*, and the
 *   Python channel handles it with the full rules, errno mapping and logging
 *   (a failed fast request is retried there; reads and whole-sector writes are
 *   idempotent).
 *
 * RangeLock is the range lock of cryptfuse.volume.Volume: the Python
 * read-modify-write of partial sectors and the fast whole-sector writes here
 * exclude each other on the sectors they share.
 *
 * Layout of the kernel's structures: include/uapi/linux/fuse.h (7.31, native
 * byte order), the same ones channel.py encodes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_gcrypt.h"

#define FUSE_READ 15
#define FUSE_WRITE 16
#define IN_HEADER 40
#define RW_IN 40
#define OUT_HEADER 16
/* the largest READ/WRITE payload the channel negotiates (max_pages 256) */
#define MAX_IO (1 << 20)
#define MAX_SECTOR 4096
/* a worker's buffer: MAX_IO plus two sectors, a read's covering sectors */
#define BUF_LEN (MAX_IO + 2 * MAX_SECTOR)
/* requests from this size on are en/decrypted half here, half by the helper thread */
#define SPLIT_MIN (256 * 1024)
/* Container transfers of whole pages from these sizes on go through the O_DIRECT fd:
   every read of a page or more (a cold random read then skips the page cache's
   allocation and readahead: steadier QD1 latency); writes from 128 KiB (smaller ones
   gain from the page cache, which merges them and writes them back later). */
#define DIRECT_ALIGN 4096
#define DIRECT_READ_MIN DIRECT_ALIGN
#define DIRECT_WRITE_MIN (128 * 1024)
/* reads from this size on continue a stream the read-ahead threads follow */
#define PREFETCH_MIN (64 * 1024)
/* writes from this size on are written behind (see writeback_t) */
#define BEHIND_MIN (128 * 1024)
/* While O_DIRECT is in use, a write through the page cache locks the whole stretches of
   this size (aligned in the container) around its sectors: the page cache may hold what
   it dirties in a large folio (up to 2 MiB), which must not be shared with a concurrent
   direct transfer (docs/daemon.md, "Coherence with the page cache"). */
#define WRITE_GRANULE (2 << 20)

enum { IV_PLAIN64 = 0, IV_PLAIN = 1, IV_PLAIN64BE = 2, IV_NULL = 3, IV_ESSIV = 4 };
enum { MODE_XTS = 0, MODE_CBC = 1 };

/* One thread's OpenSSL contexts: the sector cipher both ways, and ESSIV's IV cipher. */
typedef struct {
    EVP_CIPHER_CTX *enc, *dec, *essiv;
} contexts_t;

/* -- key material: one locked page per volume -------------------------------------------- */

/* A volume's keys live in an anonymous page of their own: mlock'ed (never written to swap),
   left out of core dumps (MADV_DONTDUMP), wiped by close() and unmapped by dealloc.
   Memory locks are not inherited by fork(), and the daemon is forked after the command
   opened the volume: a pthread_atfork child handler locks every live page again.  The
   OpenSSL contexts made from the keys (expanded key schedules) are OpenSSL's heap
   memory: not locked, cleansed by EVP_CIPHER_CTX_free (docs/reliability.md). */
typedef struct secret_s {
    struct secret_s *prev, *next; /* the live pages, for the fork handler */
    int locked;                   /* mlock succeeded (RLIMIT_MEMLOCK may refuse) */
    unsigned char key[64];
    unsigned char essiv_key[32];
} secret_t;

static pthread_mutex_t secrets_mu = PTHREAD_MUTEX_INITIALIZER;
static secret_t *secrets; /* list head */

static size_t secret_size(void)
{
    long page = sysconf(_SC_PAGESIZE);
    return page > 0 && (size_t)page >= sizeof(secret_t) ? (size_t)page : 4096;
}

static secret_t *secret_new(void)
{
    void *p = mmap(NULL, secret_size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    secret_t *s = p; /* zero-filled by the kernel */
#ifdef MADV_DONTDUMP
    (void)madvise(p, secret_size(), MADV_DONTDUMP);
#endif
    s->locked = mlock(p, secret_size()) == 0;
    pthread_mutex_lock(&secrets_mu);
    s->next = secrets;
    if (secrets != NULL)
        secrets->prev = s;
    secrets = s;
    pthread_mutex_unlock(&secrets_mu);
    return s;
}

static void secret_wipe(secret_t *s)
{
    OPENSSL_cleanse(s->key, sizeof(s->key));
    OPENSSL_cleanse(s->essiv_key, sizeof(s->essiv_key));
}

static void secret_free(secret_t *s)
{
    if (s == NULL)
        return;
    secret_wipe(s);
    pthread_mutex_lock(&secrets_mu);
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        secrets = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    pthread_mutex_unlock(&secrets_mu);
    munmap(s, secret_size()); /* also unlocks it */
}

static void secrets_prepare(void) { pthread_mutex_lock(&secrets_mu); }
static void secrets_parent(void) { pthread_mutex_unlock(&secrets_mu); }

/* In the child of fork(): only this thread exists; mlock is a plain system call. */
static void secrets_child(void)
{
    for (secret_t *s = secrets; s != NULL; s = s->next)
        s->locked = mlock(s, secret_size()) == 0;
    pthread_mutex_unlock(&secrets_mu);
}

/* -- the range lock ------------------------------------------------------------------------ */

typedef struct {
    uint64_t start, end;
} range_t;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t cv;
    range_t *held;
    size_t count, cap;
} RangeLockObject;

static int overlaps(const RangeLockObject *lock, uint64_t start, uint64_t end)
{
    for (size_t i = 0; i < lock->count; i++)
        if (lock->held[i].start < end && start < lock->held[i].end)
            return 1;
    return 0;
}

/* Called without the GIL.  Returns 0, or -1 when out of memory. */
static int range_acquire(RangeLockObject *lock, uint64_t start, uint64_t end)
{
    int rc = 0;
    pthread_mutex_lock(&lock->mu);
    while (overlaps(lock, start, end))
        pthread_cond_wait(&lock->cv, &lock->mu);
    if (lock->count == lock->cap) {
        size_t cap = lock->cap ? lock->cap * 2 : 16;
        range_t *grown = realloc(lock->held, cap * sizeof(range_t));
        if (grown == NULL) {
            rc = -1;
            goto out;
        }
        lock->held = grown;
        lock->cap = cap;
    }
    lock->held[lock->count].start = start;
    lock->held[lock->count].end = end;
    lock->count++;
out:
    pthread_mutex_unlock(&lock->mu);
    return rc;
}

/* Called without the GIL.  Returns 0, or -1 when the range was not held. */
static int range_release(RangeLockObject *lock, uint64_t start, uint64_t end)
{
    int rc = -1;
    pthread_mutex_lock(&lock->mu);
    for (size_t i = 0; i < lock->count; i++) {
        if (lock->held[i].start == start && lock->held[i].end == end) {
            lock->held[i] = lock->held[lock->count - 1];
            lock->count--;
            rc = 0;
            break;
        }
    }
    pthread_cond_broadcast(&lock->cv);
    pthread_mutex_unlock(&lock->mu);
    return rc;
}

static int RangeLock_init(RangeLockObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {NULL};
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ":RangeLock", kwlist))
        return -1;
    return 0;
}

static PyObject *RangeLock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    RangeLockObject *self = (RangeLockObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    pthread_mutex_init(&self->mu, NULL);
    pthread_cond_init(&self->cv, NULL);
    self->held = NULL;
    self->count = self->cap = 0;
    return (PyObject *)self;
}

static void RangeLock_dealloc(RangeLockObject *self)
{
    pthread_mutex_destroy(&self->mu);
    pthread_cond_destroy(&self->cv);
    free(self->held);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* "O&" converter: a Python int in [0, 2**64), else OverflowError/TypeError ("K" wraps). */
static int to_u64(PyObject *obj, void *out)
{
    unsigned long long value = PyLong_AsUnsignedLongLong(obj);
    if (value == (unsigned long long)-1 && PyErr_Occurred())
        return 0;
    *(uint64_t *)out = value;
    return 1;
}

static int parse_range(PyObject *args, uint64_t *start, uint64_t *end)
{
    uint64_t s, e;
    if (!PyArg_ParseTuple(args, "O&O&", to_u64, &s, to_u64, &e))
        return -1;
    if (s >= e) {
        PyErr_SetString(PyExc_ValueError, "empty or inverted range");
        return -1;
    }
    *start = s;
    *end = e;
    return 0;
}

static PyObject *RangeLock_acquire(RangeLockObject *self, PyObject *args)
{
    uint64_t start, end;
    int rc;
    if (parse_range(args, &start, &end) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = range_acquire(self, start, end);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *RangeLock_release(RangeLockObject *self, PyObject *args)
{
    uint64_t start, end;
    int rc;
    if (parse_range(args, &start, &end) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = range_release(self, start, end);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_SetString(PyExc_RuntimeError, "release of a range that is not held");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *RangeLock_held(RangeLockObject *self, void *closure)
{
    size_t count;
    (void)closure;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->mu);
    count = self->count;
    pthread_mutex_unlock(&self->mu);
    Py_END_ALLOW_THREADS
    return PyLong_FromSize_t(count);
}

static PyMethodDef RangeLock_methods[] = {
    {"acquire", (PyCFunction)RangeLock_acquire, METH_VARARGS,
     "acquire(start, end): wait until no held range overlaps [start, end), then hold it."},
    {"release", (PyCFunction)RangeLock_release, METH_VARARGS,
     "release(start, end): give back a range taken with acquire()."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef RangeLock_getset[] = {
    {"held", (getter)RangeLock_held, NULL, "number of ranges held now", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RangeLockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cryptfuse._fastpath.RangeLock",
    .tp_basicsize = sizeof(RangeLockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Excludes overlapping sector ranges; disjoint ranges proceed in parallel.",
    .tp_new = RangeLock_new,
    .tp_init = (initproc)RangeLock_init,
    .tp_dealloc = (destructor)RangeLock_dealloc,
    .tp_methods = RangeLock_methods,
    .tp_getset = RangeLock_getset,
};

/* -- the helper thread ----------------------------------------------------------------------- */

/*
 * One large sequential request at a time leaves the second core idle while the
 * worker runs the cipher, so a request of SPLIT_MIN or more hands its second half
 * to this thread.  At most one job is outstanding; a worker that finds the helper
 * busy does all the work itself.  Started on first use (so never before the
 * daemon forks) and only used by the process that started it.
 */
/* Part of one request: read the ciphertext (IO_READ), run the cipher, write it (IO_WRITE). */
enum { IO_NONE, IO_READ, IO_WRITE };
typedef struct {
    const unsigned char *src;
    unsigned char *dst;
    uint64_t first;
    size_t count;
    int encrypt;
    int io;       /* IO_NONE, IO_READ (into dst, decrypted in place) or IO_WRITE (of dst) */
    uint64_t pos; /* container offset of sector *first* */
} job_t;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t wake, finished_cv;
    pthread_t thread;
    pid_t pid; /* 0: not started */
    int failed_start;
    int busy;     /* a submitter owns the helper until it has collected the result */
    int pending;  /* a job waits for the helper */
    int finished; /* the job is done; rc holds its result */
    int stop;
    int rc;
    contexts_t ctx;
    job_t job;
} helper_t;

/* -- the read-ahead threads ------------------------------------------------------------------ */

/*
 * Large reads bypass the page cache (the O_DIRECT fd), and with it the kernel's
 * readahead, so a sequential stream would wait for the disk on every request.  When a
 * large read continues a stream, these threads read the next RA_SLOTS stretches of the
 * container (through the page cache, see prefetch_main) and decrypt them into their
 * buffers while the workers answer the requests before; the requests for them then take the plaintext from there instead of waiting
 * for the disk and the cipher.  A write overlapping a stretch (in C or in Python, under
 * the range lock, before its reply) marks it stale, so it is never served.
 */
enum { RA_EMPTY, RA_PENDING, RA_LOADING, RA_READY };
#define RA_SLOTS 4            /* stretches ahead of the stream */
#define RA_STRETCH (1 << 20) /* bytes in one (at most MAX_IO) */
#define RA_THREADS 2 /* one decrypts a stretch while the other reads the next */
typedef struct {
    int state;
    int valid;          /* cleared by an overlapping write or a failed read */
    unsigned char *buf; /* plaintext of [first, first + count) once RA_READY */
    uint64_t first, count;
} ra_slot_t;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t wake, ready_cv;
    pthread_t thread[RA_THREADS];
    int threads; /* started */
    pid_t pid;   /* 0: not started */
    int failed_start;
    int stop;
    ra_slot_t slot[RA_SLOTS];
    uint64_t next; /* the sector after the last large read: where a stream goes on */
} prefetch_t;

/* -- the write-behind threads ---------------------------------------------------------------- */

/*
 * A large write is encrypted into one of these slots and answered; a thread then
 * writes the slot to the container, holding the request's range lock until the data
 * is there, so every later request touching those sectors (read or write, C or
 * Python) sees it.  The next request's copy and encryption thus overlap this one's
 * disk write, as they would with the page cache, minus its copy.  A failed write
 * is kept and reported by every later drain(), which Volume.sync() calls before the
 * fsync: write errors surface at fsync, and keep surfacing (unlike the page cache's).
 */
#define WB_SLOTS 4
#define WB_THREADS 2
#define LOST_MAX 32
typedef struct {
    uint64_t first, last;
} lost_range_t;
typedef struct {
    int state; /* WB_FREE, WB_FILLING (a worker encrypts into it), WB_QUEUED, WB_WRITING */
    uint64_t seq;
    unsigned char *buf;
    uint64_t first, count;
    uint64_t lock_lo, lock_hi; /* the range lock taken for it (write_lock_range) */
} wb_slot_t;
enum { WB_FREE, WB_FILLING, WB_QUEUED, WB_WRITING };

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t wake, done_cv;
    pthread_t thread[WB_THREADS];
    int threads;
    pid_t pid; /* 0: not started */
    int failed_start;
    int stop;
    wb_slot_t slot[WB_SLOTS];
    uint64_t seq;  /* of the last slot queued */
    int error;     /* errno of the first failed write ever, or 0 (sticky) */
    uint64_t failed; /* writes that failed, ever */
    /* Sector ranges [first, last) whose answered (written-behind) write failed and that
       no write has replaced since: reads of them fail (see lost_add). */
    lost_range_t lost[LOST_MAX];
    _Atomic int nlost;
} writeback_t;

/* -- the volume ------------------------------------------------------------------------------ */

typedef struct FastVolumeObject_ {
    PyObject_HEAD
    int fd;
    int direct_owned;      /* the container opened O_DIRECT (ours to close), or -1 */
    _Atomic int direct_fd; /* direct_owned while the file system takes O_DIRECT, else -1 */
    /* Requests hold it shared around their container I/O; close() takes it exclusive,
       so no pread/pwrite can reach the fd once Volume.close() has begun. */
    pthread_rwlock_t io_lock;
    _Atomic int closed; /* set under io_lock held exclusive; read under it shared */
    uint64_t data_offset;
    _Atomic uint64_t size; /* changed by set_size() (cryptfuse resize) while serving */
    _Atomic int discards;  /* set_discards(): holes of the container read as zeros */
    uint32_t sector_size;
    uint32_t spb; /* 512-byte units per sector */
    uint32_t iv_shift;
    int ivmode;
    int readonly;
    uint64_t iv_offset;
    int mode;
    const EVP_CIPHER *cipher;
    /* the keys (secret->key, ->essiv_key): read by contexts_init under key_mu, wiped by
       close() under it */
    secret_t *secret;
    pthread_mutex_t key_mu;
    int key_len;
    const EVP_CIPHER *essiv_cipher; /* ECB with hash(key), for IV_ESSIV */
    RangeLockObject *lock;
    /* a cryptfuse._gcrypt.Engine doing the cipher work instead of OpenSSL (or NULL):
       Serpent, Twofish, ... (docs/ciphers.md); then cipher/key/essiv_* are unused */
    PyObject *engine;
    const cryptfuse_engine_api *engine_api;
    _Atomic uint64_t writes;        /* whole-sector writes completed here */
    _Atomic int64_t last_write_ns;  /* CLOCK_REALTIME of the last one */
    _Atomic uint64_t reads;         /* reads answered here */
    _Atomic uint64_t declined;      /* READ/WRITE requests handed back to Python */
    _Atomic uint64_t reply_errors;  /* replies the kernel refused (other than ENOENT/ENODEV) */
    _Atomic uint64_t split;         /* requests whose cipher work the helper shared */
    _Atomic uint64_t prefetched;    /* reads answered from the read-ahead buffer */
    _Atomic uint64_t direct;        /* container transfers through the O_DIRECT fd */
    _Atomic uint64_t behind;        /* writes answered before their pwrite (write-behind) */
    _Atomic uint64_t partnered;     /* requests the partner answered (also in reads/writes) */
    helper_t helper;
    prefetch_t ra;
    writeback_t wb;
    /* Sectors [win_lo, win_hi) are served here, the rest declined (to the partner, else
       to Python): an online reencryption serves the converted part of the volume with
       the new key's FastVolume (the partner) and the rest with this one.  Changed only
       while the range lock of what moves is held; requests check it again once they
       hold their range. */
    _Atomic uint64_t win_lo, win_hi;
    /* The FastVolume (same fd, geometry and range lock, another key) for requests
       outside the window; set once, kept until dealloc. */
    _Atomic(struct FastVolumeObject_ *) partner;
} FastVolumeObject;

static PyTypeObject FastVolumeType;

/* -- lost writes ----------------------------------------------------------------------------- */

/*
 * When a written-behind write fails, its data was answered but is not on the
 * container, and the sectors there hold what was written before: serving that to a
 * reader would be wrong bytes without an error.  So the range is remembered (until a
 * write of those sectors succeeds) and every read of it fails (EIO, from Python, which
 * asks lost_overlaps() too); a read-modify-write of a sector in it fails as well.  At
 * most LOST_MAX ranges: beyond, the last one grows to cover the new one (more reads
 * fail, never fewer).  The error of fsync is separate and never cleared
 * (docs/reliability.md).  All under wb.mu; nlost lets the common case skip the lock.
 */
static void lost_add(FastVolumeObject *v, uint64_t first, uint64_t last) /* wb.mu held */
{
    writeback_t *wb = &v->wb;
    int n = atomic_load(&wb->nlost);
    if (n < LOST_MAX) {
        wb->lost[n].first = first;
        wb->lost[n].last = last;
        atomic_store(&wb->nlost, n + 1);
        return;
    }
    lost_range_t *r = &wb->lost[LOST_MAX - 1];
    if (first < r->first)
        r->first = first;
    if (last > r->last)
        r->last = last;
}

/* A write of [first, last) succeeded: those sectors hold what was last answered. */
static void lost_clear(FastVolumeObject *v, uint64_t first, uint64_t last)
{
    writeback_t *wb = &v->wb;
    if (atomic_load(&wb->nlost) == 0)
        return;
    pthread_mutex_lock(&wb->mu);
    int n = atomic_load(&wb->nlost);
    for (int i = 0; i < n;) {
        lost_range_t *r = &wb->lost[i];
        if (last <= r->first || r->last <= first) {
            i++;
        } else if (first <= r->first && r->last <= last) {
            *r = wb->lost[--n]; /* wholly rewritten: gone (look at the moved one next) */
        } else if (first <= r->first) {
            r->first = last;
            i++;
        } else if (r->last <= last) {
            r->last = first;
            i++;
        } else {
            /* the write lies inside: two ranges remain, if there is room for both */
            if (n < LOST_MAX) {
                wb->lost[n].first = last;
                wb->lost[n].last = r->last;
                n++;
                r->last = first;
            }
            i++;
        }
    }
    atomic_store(&wb->nlost, n);
    pthread_mutex_unlock(&wb->mu);
}

static int lost_overlaps(FastVolumeObject *v, uint64_t first, uint64_t last)
{
    writeback_t *wb = &v->wb;
    int hit = 0;
    if (atomic_load(&wb->nlost) == 0)
        return 0;
    pthread_mutex_lock(&wb->mu);
    int n = atomic_load(&wb->nlost);
    for (int i = 0; i < n && !hit; i++)
        hit = first < wb->lost[i].last && wb->lost[i].first < last;
    pthread_mutex_unlock(&wb->mu);
    return hit;
}

static PyObject *FastVolume_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd",      "data_offset", "size",  "sector_size", "readonly",
                             "mode",    "key",         "iv_offset", "iv_shift", "ivmode",
                             "lock",    "essiv_key",   "direct_fd", "engine", NULL};
    int direct_fd = -1;
    PyObject *engine = NULL;
    int fd, readonly, mode, ivmode, sector_size, iv_shift;
    uint64_t data_offset, size, iv_offset;
    Py_buffer key, essiv_key = {0};
    PyObject *lock;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iO&O&ipiy*O&iiO!|y*iO:FastVolume", kwlist, &fd,
                                     to_u64, &data_offset, to_u64, &size, &sector_size,
                                     &readonly, &mode, &key, to_u64, &iv_offset, &iv_shift,
                                     &ivmode, &RangeLockType, &lock, &essiv_key, &direct_fd,
                                     &engine))
        return NULL;
    FastVolumeObject *self = NULL;
    const EVP_CIPHER *cipher = NULL, *essiv_cipher = NULL;
    const cryptfuse_engine_api *engine_api = NULL;
    if (engine == Py_None)
        engine = NULL;
    if (engine != NULL) {
        PyObject *capsule = PyObject_GetAttrString(engine, "c_api");
        if (capsule != NULL)
            engine_api = PyCapsule_GetPointer(capsule, CRYPTFUSE_ENGINE_API_NAME);
        Py_XDECREF(capsule);
        if (engine_api == NULL || engine_api->version != CRYPTFUSE_ENGINE_API_VERSION) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "FastVolume: engine is not a cryptfuse._gcrypt.Engine");
            goto out;
        }
        mode = MODE_XTS; /* unused with an engine; keeps the checks below simple */
        ivmode = IV_NULL;
    } else if (mode == MODE_XTS && key.len == 32)
        cipher = EVP_aes_128_xts();
    else if (mode == MODE_XTS && key.len == 64)
        cipher = EVP_aes_256_xts();
    else if (mode == MODE_CBC && key.len == 16)
        cipher = EVP_aes_128_cbc();
    else if (mode == MODE_CBC && key.len == 24)
        cipher = EVP_aes_192_cbc();
    else if (mode == MODE_CBC && key.len == 32)
        cipher = EVP_aes_256_cbc();
    if (cipher == NULL && engine_api == NULL) {
        PyErr_SetString(PyExc_ValueError, "FastVolume: no AES-XTS/AES-CBC for this key size");
        goto out;
    }
    if (ivmode == IV_ESSIV) {
        if (essiv_key.len == 16)
            essiv_cipher = EVP_aes_128_ecb();
        else if (essiv_key.len == 24)
            essiv_cipher = EVP_aes_192_ecb();
        else if (essiv_key.len == 32)
            essiv_cipher = EVP_aes_256_ecb();
        if (essiv_cipher == NULL) {
            PyErr_SetString(PyExc_ValueError, "FastVolume: ESSIV needs a 128-256-bit AES key");
            goto out;
        }
    }
    if ((sector_size != 512 && sector_size != 1024 && sector_size != 2048 && sector_size != 4096)
        || ivmode < IV_PLAIN64 || ivmode > IV_ESSIV || iv_shift < 0 || iv_shift > 3 || fd < -1
        || direct_fd < -1 || (direct_fd >= 0 && fd < 0)
        || size % sector_size || data_offset > INT64_MAX || size > INT64_MAX - data_offset) {
        PyErr_SetString(PyExc_ValueError, "FastVolume: invalid geometry or IV mode");
        goto out;
    }
    if (mode == MODE_XTS && engine_api == NULL
        && CRYPTO_memcmp(key.buf, (const char *)key.buf + key.len / 2, key.len / 2) == 0) {
        /* OpenSSL refuses XTS keys with two equal halves; the Python engine serves them. */
        PyErr_SetString(PyExc_ValueError, "FastVolume: XTS key halves are equal");
        goto out;
    }
    secret_t *secret = secret_new();
    if (secret == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto out;
    }
    self = (FastVolumeObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        secret_free(secret);
        goto out;
    }
    self->fd = fd;
    self->direct_owned = direct_fd < 0 ? -1 : direct_fd;
    atomic_init(&self->direct_fd, self->direct_owned);
    pthread_rwlock_init(&self->io_lock, NULL);
    atomic_init(&self->closed, 0);
    self->data_offset = data_offset;
    atomic_init(&self->size, size);
    atomic_init(&self->discards, 0);
    self->sector_size = sector_size;
    self->spb = sector_size / 512;
    self->iv_shift = iv_shift;
    self->ivmode = ivmode;
    self->readonly = readonly;
    self->iv_offset = iv_offset;
    self->mode = mode;
    self->cipher = cipher;
    self->secret = secret;
    pthread_mutex_init(&self->key_mu, NULL);
    memcpy(secret->key, key.buf, key.len);
    self->key_len = (int)key.len;
    self->essiv_cipher = essiv_cipher;
    if (essiv_cipher != NULL)
        memcpy(secret->essiv_key, essiv_key.buf, essiv_key.len);
    self->lock = (RangeLockObject *)Py_NewRef(lock);
    self->engine = Py_XNewRef(engine);
    self->engine_api = engine_api;
    atomic_init(&self->writes, 0);
    atomic_init(&self->last_write_ns, 0);
    atomic_init(&self->reads, 0);
    atomic_init(&self->declined, 0);
    atomic_init(&self->reply_errors, 0);
    atomic_init(&self->split, 0);
    memset(&self->helper, 0, sizeof(self->helper));
    pthread_mutex_init(&self->helper.mu, NULL);
    pthread_cond_init(&self->helper.wake, NULL);
    pthread_cond_init(&self->helper.finished_cv, NULL);
    atomic_init(&self->prefetched, 0);
    atomic_init(&self->direct, 0);
    memset(&self->ra, 0, sizeof(self->ra));
    self->ra.next = UINT64_MAX;
    pthread_mutex_init(&self->ra.mu, NULL);
    pthread_cond_init(&self->ra.wake, NULL);
    pthread_cond_init(&self->ra.ready_cv, NULL);
    atomic_init(&self->behind, 0);
    atomic_init(&self->partnered, 0);
    atomic_init(&self->win_lo, 0);
    atomic_init(&self->win_hi, UINT64_MAX);
    atomic_init(&self->partner, NULL);
    memset(&self->wb, 0, sizeof(self->wb));
    pthread_mutex_init(&self->wb.mu, NULL);
    pthread_cond_init(&self->wb.wake, NULL);
    pthread_cond_init(&self->wb.done_cv, NULL);
out:
    PyBuffer_Release(&key);
    if (essiv_key.obj != NULL)
        PyBuffer_Release(&essiv_key);
    return (PyObject *)self;
}

static void contexts_free(contexts_t *c)
{
    EVP_CIPHER_CTX_free(c->enc);
    EVP_CIPHER_CTX_free(c->dec);
    EVP_CIPHER_CTX_free(c->essiv);
    c->enc = c->dec = c->essiv = NULL;
}

/* Keyed contexts for one thread: 0, or -1 (then *c holds nothing).  After close() the keys
   are wiped: 0 with no contexts (crypt_with fails, so every request goes to Python). */
static int contexts_init(FastVolumeObject *v, contexts_t *c)
{
    c->enc = c->dec = c->essiv = NULL;
    if (v->engine_api != NULL) /* the engine keeps its own per-thread handles and keys */
        return 0;
    pthread_mutex_lock(&v->key_mu);
    if (atomic_load(&v->closed)) {
        pthread_mutex_unlock(&v->key_mu);
        return 0;
    }
    const unsigned char *key = v->secret->key, *essiv_key = v->secret->essiv_key;
    c->enc = EVP_CIPHER_CTX_new();
    c->dec = EVP_CIPHER_CTX_new();
    c->essiv = v->essiv_cipher != NULL ? EVP_CIPHER_CTX_new() : NULL;
    if (c->enc == NULL || c->dec == NULL || (v->essiv_cipher != NULL && c->essiv == NULL)
        || EVP_EncryptInit_ex(c->enc, v->cipher, NULL, key, NULL) != 1
        || EVP_DecryptInit_ex(c->dec, v->cipher, NULL, key, NULL) != 1
        /* whole sectors only: without this, CBC decryption would hold back a block */
        || EVP_CIPHER_CTX_set_padding(c->enc, 0) != 1
        || EVP_CIPHER_CTX_set_padding(c->dec, 0) != 1
        || (c->essiv != NULL
            && (EVP_EncryptInit_ex(c->essiv, v->essiv_cipher, NULL, essiv_key, NULL) != 1
                || EVP_CIPHER_CTX_set_padding(c->essiv, 0) != 1))) {
        pthread_mutex_unlock(&v->key_mu);
        contexts_free(c);
        return -1;
    }
    pthread_mutex_unlock(&v->key_mu);
    return 0;
}

/* Start a pool's *n* threads running fn(arg) unless its buffers failed (*ok* 0): *pid*
   becomes this process once at least one runs, else *failed_start* is set. */
static void threads_start(pthread_t *threads, int n, int *started, pid_t *pid,
                          int *failed_start, void *(*fn)(void *), void *arg, int ok)
{
    while (ok && *started < n && pthread_create(&threads[*started], NULL, fn, arg) == 0)
        (*started)++;
    if (*started > 0)
        *pid = getpid();
    else
        *failed_start = 1;
}

/* Tell a pool's threads to stop (*stop* under *mu*, *wake* broadcast) and join the
   *n* of them, if this process started them (a forked child has none). */
static void threads_stop(pthread_mutex_t *mu, pthread_cond_t *wake, int *stop, pid_t pid,
                         pthread_t *threads, int n)
{
    pthread_mutex_lock(mu);
    int joinable = pid == getpid();
    *stop = 1;
    pthread_cond_broadcast(wake);
    pthread_mutex_unlock(mu);
    for (int i = 0; joinable && i < n; i++)
        pthread_join(threads[i], NULL);
}

static void helper_stop(FastVolumeObject *self)
{
    helper_t *h = &self->helper;
    threads_stop(&h->mu, &h->wake, &h->stop, h->pid, &h->thread, 1);
    contexts_free(&h->ctx);
    pthread_mutex_destroy(&h->mu);
    pthread_cond_destroy(&h->wake);
    pthread_cond_destroy(&h->finished_cv);
}

static void prefetch_stop(FastVolumeObject *self)
{
    prefetch_t *ra = &self->ra;
    threads_stop(&ra->mu, &ra->wake, &ra->stop, ra->pid, ra->thread, ra->threads);
    for (int i = 0; i < RA_SLOTS; i++)
        if (ra->slot[i].buf != NULL) {
            OPENSSL_cleanse(ra->slot[i].buf, BUF_LEN); /* plaintext */
            free(ra->slot[i].buf);
        }
    pthread_mutex_destroy(&ra->mu);
    pthread_cond_destroy(&ra->wake);
    pthread_cond_destroy(&ra->ready_cv);
}

/* Wait until every slot queued so far is written (and, with *all*, every slot). */
static void writeback_wait(FastVolumeObject *self, int all)
{
    writeback_t *wb = &self->wb;
    pthread_mutex_lock(&wb->mu);
    uint64_t target = wb->seq;
    /* a forked child has copies of the slots but not the threads: nothing of its own */
    for (; wb->pid == 0 || wb->pid == getpid();) {
        int pending = 0;
        for (int i = 0; i < WB_SLOTS; i++) {
            wb_slot_t *sl = &wb->slot[i];
            if (all ? sl->state != WB_FREE
                    : (sl->state == WB_QUEUED || sl->state == WB_WRITING) && sl->seq <= target)
                pending = 1;
        }
        if (!pending)
            break;
        pthread_cond_wait(&wb->done_cv, &wb->mu);
    }
    pthread_mutex_unlock(&wb->mu);
}

static void writeback_stop(FastVolumeObject *self)
{
    writeback_t *wb = &self->wb;
    writeback_wait(self, 1);
    threads_stop(&wb->mu, &wb->wake, &wb->stop, wb->pid, wb->thread, wb->threads);
    for (int i = 0; i < WB_SLOTS; i++)
        if (wb->slot[i].buf != NULL)
            free(wb->slot[i].buf); /* ciphertext only */
    pthread_mutex_destroy(&wb->mu);
    pthread_cond_destroy(&wb->wake);
    pthread_cond_destroy(&wb->done_cv);
}

static void FastVolume_dealloc(FastVolumeObject *self)
{
    Py_BEGIN_ALLOW_THREADS
    writeback_stop(self); /* first: its writes are answered already */
    helper_stop(self);
    prefetch_stop(self);
    Py_END_ALLOW_THREADS
    if (self->direct_owned >= 0)
        close(self->direct_owned);
    pthread_rwlock_destroy(&self->io_lock);
    secret_free(self->secret);
    pthread_mutex_destroy(&self->key_mu);
    Py_XDECREF(self->lock);
    Py_XDECREF((PyObject *)atomic_load(&self->partner));
    Py_XDECREF(self->engine);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define COUNTER_GETTER(name)                                                  \
    static PyObject *FastVolume_get_##name(FastVolumeObject *self, void *c)  \
    {                                                                         \
        (void)c;                                                              \
        return PyLong_FromUnsignedLongLong(atomic_load(&self->name));         \
    }
COUNTER_GETTER(writes)
COUNTER_GETTER(reads)
COUNTER_GETTER(declined)
COUNTER_GETTER(reply_errors)
COUNTER_GETTER(prefetched)
COUNTER_GETTER(direct)
COUNTER_GETTER(behind)
COUNTER_GETTER(split)
COUNTER_GETTER(partnered)

static PyObject *FastVolume_get_direct_active(FastVolumeObject *self, void *c)
{
    (void)c;
    return PyBool_FromLong(atomic_load(&self->direct_fd) >= 0);
}

static PyObject *FastVolume_get_key_locked(FastVolumeObject *self, void *c)
{
    (void)c;
    return PyBool_FromLong(self->secret->locked);
}

static PyObject *FastVolume_get_last_write_ns(FastVolumeObject *self, void *c)
{
    (void)c;
    return PyLong_FromLongLong(atomic_load(&self->last_write_ns));
}

static PyGetSetDef FastVolume_getset[] = {
    {"writes", (getter)FastVolume_get_writes, NULL, "whole-sector writes completed here", NULL},
    {"reads", (getter)FastVolume_get_reads, NULL, "reads answered here", NULL},
    {"declined", (getter)FastVolume_get_declined, NULL,
     "READ/WRITE requests handed back to Python", NULL},
    {"reply_errors", (getter)FastVolume_get_reply_errors, NULL,
     "replies the kernel refused", NULL},
    {"prefetched", (getter)FastVolume_get_prefetched, NULL,
     "reads answered from the read-ahead buffer", NULL},
    {"direct", (getter)FastVolume_get_direct, NULL,
     "container transfers (preads/pwrites) through the O_DIRECT descriptor", NULL},
    {"partnered", (getter)FastVolume_get_partnered, NULL,
     "READ/WRITE requests answered by the partner (counted in reads/writes too)", NULL},
    {"behind", (getter)FastVolume_get_behind, NULL,
     "writes answered before their container write (write-behind)", NULL},
    {"split", (getter)FastVolume_get_split, NULL,
     "large requests whose cipher work the helper thread shared", NULL},
    {"key_locked", (getter)FastVolume_get_key_locked, NULL,
     "whether the page holding the keys is locked in memory (mlock)", NULL},
    {"direct_active", (getter)FastVolume_get_direct_active, NULL,
     "whether transfers may use the O_DIRECT descriptor now", NULL},
    {"last_write_ns", (getter)FastVolume_get_last_write_ns, NULL,
     "wall-clock time (ns) of the last write completed here, 0 before any", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

/* -- a worker: one thread's cipher contexts and buffer ---------------------------------------- */

typedef struct {
    PyObject_HEAD
    FastVolumeObject *volume;
    contexts_t ctx;
    unsigned char *buf; /* MAX_IO plus two sectors: a read's covering sectors */
    size_t buf_len;
    _Atomic int busy; /* one thread at a time: the buffer and contexts are not shared */
    /* contexts for the volume's partner (pvol: the one they are for), made on first use */
    contexts_t pctx;
    FastVolumeObject *pvol;
} WorkerObject;

/* Sectors [first, last) lie in the volume's window. */
static int in_window(FastVolumeObject *v, uint64_t first, uint64_t last)
{
    return first >= atomic_load(&v->win_lo) && last <= atomic_load(&v->win_hi);
}

static int worker_enter(WorkerObject *w)
{
    if (atomic_exchange(&w->busy, 1)) {
        PyErr_SetString(PyExc_RuntimeError, "this Worker is in use by another thread");
        return -1;
    }
    return 0;
}

static void Worker_dealloc(WorkerObject *self)
{
    contexts_free(&self->ctx);
    if (self->pvol != NULL)
        contexts_free(&self->pctx);
    if (self->buf != NULL) {
        OPENSSL_cleanse(self->buf, self->buf_len);
        free(self->buf);
    }
    Py_XDECREF(self->volume);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject WorkerType;

static PyObject *FastVolume_close(FastVolumeObject *self, PyObject *unused)
{
    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&self->io_lock); /* waits for the requests doing I/O now */
    self->closed = 1;
    pthread_rwlock_unlock(&self->io_lock);
    writeback_wait(self, 1); /* the writes answered already reach the container */
    pthread_mutex_lock(&self->key_mu); /* no thread makes contexts from the keys now */
    secret_wipe(self->secret);
    pthread_mutex_unlock(&self->key_mu);
    atomic_store(&self->direct_fd, -1);
    if (self->direct_owned >= 0)
        close(self->direct_owned);
    self->direct_owned = -1;
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *FastVolume_worker(FastVolumeObject *self, PyObject *unused)
{
    (void)unused;
    WorkerObject *w = (WorkerObject *)WorkerType.tp_alloc(&WorkerType, 0);
    if (w == NULL)
        return NULL;
    w->volume = (FastVolumeObject *)Py_NewRef(self);
    w->buf_len = BUF_LEN;
    if (posix_memalign((void **)&w->buf, 4096, w->buf_len) != 0) {
        w->buf = NULL;
        Py_DECREF(w);
        return PyErr_NoMemory();
    }
    if (contexts_init(self, &w->ctx) < 0) {
        Py_DECREF(w);
        PyErr_SetString(PyExc_ValueError, "FastVolume: OpenSSL refused the key");
        return NULL;
    }
    return (PyObject *)w;
}

/* The IV of *sector*: 0, or -1 when the ESSIV encryption fails. */
static int make_iv(const FastVolumeObject *v, EVP_CIPHER_CTX *essiv, uint64_t sector,
                   unsigned char iv[16])
{
    uint64_t cc = sector * v->spb + v->iv_offset; /* wraps modulo 2^64 like the kernel's u64 */
    uint64_t n = cc >> v->iv_shift;
    memset(iv, 0, 16);
    switch (v->ivmode) {
    case IV_PLAIN64:
    case IV_ESSIV:
        for (int i = 0; i < 8; i++)
            iv[i] = (unsigned char)(n >> (8 * i));
        break;
    case IV_PLAIN:
        for (int i = 0; i < 4; i++)
            iv[i] = (unsigned char)(n >> (8 * i));
        break;
    case IV_PLAIN64BE:
        for (int i = 0; i < 8; i++)
            iv[15 - i] = (unsigned char)(n >> (8 * i));
        break;
    default: /* IV_NULL */
        break;
    }
    if (v->ivmode == IV_ESSIV) {
        /* ESSIV: the plain64 block encrypted with hash(key) */
        int outl;
        if (EVP_EncryptUpdate(essiv, iv, &outl, iv, 16) != 1 || outl != 16)
            return -1;
    }
    return 0;
}

/* En/decrypt *count* sectors from *src* to *dst* (may be equal) with the contexts *c*; 0, or
   -1 when OpenSSL fails. */
static int crypt_with(const FastVolumeObject *v, contexts_t *c, const unsigned char *src,
                      unsigned char *dst, uint64_t first, size_t count, int encrypt)
{
    int ss = (int)v->sector_size;
    /* Discards on: a sector whose ciphertext is all zeros (a hole of the container, or
       the zeros a file system fills a partly written block with) reads as zeros, not as
       the noise decrypting it gives.  A real ciphertext sector is all zeros with
       probability 2^-4096; nearly every sector is told apart by its first byte. */
    int zeros_read_as_zeros = !encrypt && atomic_load(&((FastVolumeObject *)v)->discards);
    if (v->engine_api != NULL) {
        if (!zeros_read_as_zeros)
            return v->engine_api->crypt(v->engine, src, dst, first, count, encrypt) < 0 ? -1 : 0;
        /* runs of non-zero sectors to the engine, zeros for the rest (each sector is
           looked at before anything at or after it is written: in place works) */
        size_t i = 0;
        while (i < count) {
            const unsigned char *in = src + i * ss;
            if (in[0] == 0 && memcmp(in, in + 1, (size_t)ss - 1) == 0) {
                if (dst + i * ss != in)
                    memset(dst + i * ss, 0, (size_t)ss);
                i++;
                continue;
            }
            size_t j = i + 1;
            while (j < count) {
                const unsigned char *next = src + j * ss;
                if (next[0] == 0 && memcmp(next, next + 1, (size_t)ss - 1) == 0)
                    break;
                j++;
            }
            if (v->engine_api->crypt(v->engine, in, dst + i * ss, first + i, j - i, 0) < 0)
                return -1;
            i = j;
        }
        return 0;
    }
    EVP_CIPHER_CTX *ctx = encrypt ? c->enc : c->dec;
    unsigned char iv[16];
    if (ctx == NULL) /* made after close(): no keys */
        return -1;
    for (size_t i = 0; i < count; i++) {
        int outl;
        const unsigned char *in = src + i * ss;
        if (zeros_read_as_zeros && in[0] == 0 && memcmp(in, in + 1, (size_t)ss - 1) == 0) {
            if (dst + i * ss != in)
                memset(dst + i * ss, 0, (size_t)ss);
            continue;
        }
        if (make_iv(v, c->essiv, first + i, iv) < 0
            || EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1) != 1
            || EVP_CipherUpdate(ctx, dst + i * ss, &outl, src + i * ss, ss) != 1
            || outl != ss) {
            ERR_clear_error(); /* the request goes back to Python, which logs */
            return -1;
        }
    }
    return 0;
}

/* pread/pwrite all of *len* bytes at *pos*: 0, or -1 on an error or end of file. */
static int io_full(int fd, unsigned char *buf, size_t len, uint64_t pos, int write)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = write ? pwrite(fd, buf + done, len - done, (off_t)(pos + done))
                          : pread(fd, buf + done, len - done, (off_t)(pos + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0)
            errno = EIO; /* end of file: not the EINVAL that turns O_DIRECT off */
        if (n <= 0)
            return -1;
        done += (size_t)n;
    }
    return 0;
}

/*
 * Container I/O of one job.  Large page-aligned transfers use the O_DIRECT fd, when
 * there is one: no page cache between the cipher and the disk (a sequential stream
 * would only fill it with ciphertext nobody reads again).  Page alignment, not just
 * sector alignment, keeps a direct transfer from sharing a cached page with another
 * request's sectors.  A file system that refuses O_DIRECT (EINVAL) turns it off.
 */
static int direct_eligible(uint64_t len, uint64_t pos, int write)
{
    return len >= (write ? DIRECT_WRITE_MIN : DIRECT_READ_MIN) && pos % DIRECT_ALIGN == 0
           && len % DIRECT_ALIGN == 0;
}

static int container_rw(FastVolumeObject *v, unsigned char *buf, size_t len, uint64_t pos,
                        int write)
{
    int dfd = atomic_load(&v->direct_fd);
    if (dfd >= 0 && direct_eligible(len, pos, write) && (uintptr_t)buf % DIRECT_ALIGN == 0) {
        if (io_full(dfd, buf, len, pos, write) == 0) {
            atomic_fetch_add(&v->direct, 1);
            return 0;
        }
        if (errno != EINVAL)
            return -1;
        atomic_store(&v->direct_fd, -1);
    }
    return io_full(v->fd, buf, len, pos, write);
}

/* The sectors a write of [first, last) locks: its own when it goes to the O_DIRECT fd
   (*may_direct* and eligible) or there is none, else the WRITE_GRANULE stretches around
   them. */
static void write_lock_range(FastVolumeObject *v, uint64_t first, uint64_t last, int may_direct,
                             uint64_t *lo, uint64_t *hi)
{
    uint64_t ss = v->sector_size, total = v->size / ss;
    uint64_t pos = v->data_offset + first * ss, end = v->data_offset + last * ss;
    *lo = first;
    *hi = last;
    if (atomic_load(&v->direct_fd) < 0 || (may_direct && direct_eligible(end - pos, pos, 1)))
        return;
    uint64_t g_start = pos / WRITE_GRANULE * WRITE_GRANULE;
    uint64_t g_end = end / WRITE_GRANULE * WRITE_GRANULE + (end % WRITE_GRANULE ? WRITE_GRANULE : 0);
    *lo = g_start <= v->data_offset ? 0 : (g_start - v->data_offset) / ss;
    uint64_t h = (g_end - v->data_offset + ss - 1) / ss;
    *hi = h < total ? h : total;
}

static int run_job(FastVolumeObject *v, contexts_t *c, const job_t *j)
{
    size_t len = j->count * v->sector_size;
    if (j->io == IO_READ && container_rw(v, j->dst, len, j->pos, 0) < 0)
        return -1;
    if (crypt_with(v, c, j->src, j->dst, j->first, j->count, j->encrypt) < 0)
        return -1;
    if (j->io == IO_WRITE && container_rw(v, j->dst, len, j->pos, 1) < 0)
        return -1;
    return 0;
}

static void *helper_main(void *arg)
{
    FastVolumeObject *v = arg;
    helper_t *h = &v->helper;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        while (!h->pending && !h->stop)
            pthread_cond_wait(&h->wake, &h->mu);
        if (h->stop)
            break;
        h->pending = 0;
        pthread_mutex_unlock(&h->mu);
        int rc = run_job(v, &h->ctx, &h->job);
        pthread_mutex_lock(&h->mu);
        h->rc = rc;
        h->finished = 1;
        pthread_cond_signal(&h->finished_cv);
    }
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

/* h->mu held: start the helper thread unless it runs (or could not be started). */
static void helper_start(FastVolumeObject *v)
{
    helper_t *h = &v->helper;
    if (h->pid == 0 && !h->failed_start && !h->stop) {
        if (contexts_init(v, &h->ctx) == 0 && pthread_create(&h->thread, NULL, helper_main, v) == 0)
            h->pid = getpid();
        else
            h->failed_start = 1;
    }
}

/* Hand a job to the helper: 1 when it took it (collect with helper_collect), else 0. */
static int helper_submit(FastVolumeObject *v, const job_t *job)
{
    helper_t *h = &v->helper;
    int taken = 0;
    pthread_mutex_lock(&h->mu);
    helper_start(v);
    if (h->pid == getpid() && !h->busy && !h->stop) {
        h->busy = h->pending = 1;
        h->finished = 0;
        h->job = *job;
        pthread_cond_signal(&h->wake);
        taken = 1;
    }
    pthread_mutex_unlock(&h->mu);
    return taken;
}

static int helper_collect(FastVolumeObject *v)
{
    helper_t *h = &v->helper;
    pthread_mutex_lock(&h->mu);
    while (!h->finished)
        pthread_cond_wait(&h->finished_cv, &h->mu);
    int rc = h->rc;
    h->busy = 0;
    pthread_mutex_unlock(&h->mu);
    return rc;
}

/*
 * The sectors of one request, with their container I/O: large ones are split, the
 * second half (a whole number of pages) going to the helper thread, so one sequential
 * stream keeps both cores and two disk requests busy.
 */
static int transfer(WorkerObject *w, const unsigned char *src, unsigned char *dst,
                    uint64_t first, size_t count, int encrypt, int io, uint64_t pos)
{
    FastVolumeObject *v = w->volume;
    size_t ss = v->sector_size;
    size_t per_page = ss < DIRECT_ALIGN ? DIRECT_ALIGN / ss : 1;
    size_t half = count / 2 / per_page * per_page;
    job_t mine = {src, dst, first, count, encrypt, io, pos};
    if (count * ss < SPLIT_MIN || half == 0)
        return run_job(v, &w->ctx, &mine);
    job_t theirs = {src + half * ss, dst + half * ss, first + half, count - half,
                    encrypt,         io,              pos + half * ss};
    if (!helper_submit(v, &theirs))
        return run_job(v, &w->ctx, &mine);
    mine.count = half;
    int rc = run_job(v, &w->ctx, &mine);
    int helper_rc = helper_collect(v);
    atomic_fetch_add(&v->split, 1);
    return rc < 0 || helper_rc < 0 ? -1 : 0;
}


/* -- read-ahead -------------------------------------------------------------------------------- */

/*
 * A stretch is read through the page cache, not the O_DIRECT fd: the kernel's own
 * readahead of the container file then keeps large requests queued ahead of the
 * stream (read_ahead_kb, 8 MiB on this VM's disk), which the disk served about twice
 * as fast as 1 MiB O_DIRECT reads two at a time (docs/benchmarks.md, "Where the two
 * hard rows stand").  Clean cached pages cannot go stale under a direct write (the
 * kernel drops them, waiting for any still being read), so this changes nothing for
 * coherence (docs/daemon.md, "Container I/O").
 *
 * Once read, the ciphertext is of no more use (the plaintext is what gets cached, above
 * us), so its pages are dropped rather than left to push other files out of memory.
 * POSIX_FADV_DONTNEED only drops folios lying wholly inside its range, and the page
 * cache may hold a file in folios of up to WRITE_GRANULE (2 MiB, from readahead on ext4
 * since Linux 6.16 or XFS), so the range is the whole granules that end with this
 * stretch (a granule goes when the stream has read its end) and the granule before
 * them once more (for pages that the other read-ahead thread brought in only after
 * the first drop: stretches load two at a time).  No range lock is needed:
 * the kernel skips dirty, locked and mapped pages (dirty ones are queued for writeback,
 * as a sync would), and a clean page dropped under a concurrent reader is read again.
 */
static void stretch_drop(FastVolumeObject *v, uint64_t pos, uint64_t len)
{
    uint64_t from = pos / WRITE_GRANULE * WRITE_GRANULE;
    uint64_t to = (pos + len) / WRITE_GRANULE * WRITE_GRANULE;
    from = from >= WRITE_GRANULE ? from - WRITE_GRANULE : 0;
    if (to > from)
        (void)posix_fadvise(v->fd, (off_t)from, (off_t)(to - from), POSIX_FADV_DONTNEED);
}

static void *prefetch_main(void *arg)
{
    FastVolumeObject *v = arg;
    prefetch_t *ra = &v->ra;
    uint64_t ss = v->sector_size;
    contexts_t ctx;
    int have_ctx = contexts_init(v, &ctx) == 0; /* without, every stretch fails */
    pthread_mutex_lock(&ra->mu);
    for (;;) {
        ra_slot_t *job = NULL;
        for (;;) {
            for (int i = 0; i < RA_SLOTS; i++) /* the pending stretch nearest the stream */
                if (ra->slot[i].state == RA_PENDING
                    && (job == NULL || ra->slot[i].first < job->first))
                    job = &ra->slot[i];
            if (job != NULL || ra->stop)
                break;
            pthread_cond_wait(&ra->wake, &ra->mu);
        }
        if (ra->stop)
            break;
        job->state = RA_LOADING;
        uint64_t first = job->first, count = job->count;
        unsigned char *buf = job->buf; /* nobody swaps it before RA_READY */
        pthread_mutex_unlock(&ra->mu);
        int rc = -1;
        pthread_rwlock_rdlock(&v->io_lock);
        if (have_ctx && !v->closed && range_acquire(v->lock, first, first + count) == 0) {
            /* not under another key by now, nor lost (a failed written-behind write) */
            if (in_window(v, first, first + count) && !lost_overlaps(v, first, first + count))
                rc = io_full(v->fd, buf, (size_t)(count * ss), v->data_offset + first * ss, 0);
            range_release(v->lock, first, first + count);
            stretch_drop(v, v->data_offset + first * ss, count * ss);
        }
        pthread_rwlock_unlock(&v->io_lock);
        /* Decrypted here, off the requests' path: while this thread runs the cipher
           the worker is answering the request before. */
        if (rc == 0)
            rc = crypt_with(v, &ctx, buf, buf, first, (size_t)count, 0);
        pthread_mutex_lock(&ra->mu);
        if (rc < 0)
            job->valid = 0;
        job->state = RA_READY;
        pthread_cond_broadcast(&ra->ready_cv);
    }
    pthread_mutex_unlock(&ra->mu);
    if (have_ctx)
        contexts_free(&ctx);
    return NULL;
}

/* ra->mu held: start the thread (first use, in this process) and its buffers. */
static int prefetch_started(FastVolumeObject *v)
{
    prefetch_t *ra = &v->ra;
    if (ra->pid == 0 && !ra->failed_start) {
        int ok = 1;
        for (int i = 0; i < RA_SLOTS && ok; i++)
            ok = posix_memalign((void **)&ra->slot[i].buf, 4096, BUF_LEN) == 0; /* swappable */
        threads_start(ra->thread, RA_THREADS, &ra->threads, &ra->pid, &ra->failed_start,
                      prefetch_main, v, ok);
    }
    return ra->pid == getpid() && !ra->stop;
}

/* ra->mu held: make sure [first, first + count) is read ahead, if a slot is free. */
static void prefetch_want(FastVolumeObject *v, uint64_t first, uint64_t count)
{
    prefetch_t *ra = &v->ra;
    ra_slot_t *free_slot = NULL;
    for (int i = 0; i < RA_SLOTS; i++) {
        ra_slot_t *sl = &ra->slot[i];
        if (sl->state != RA_EMPTY && sl->valid && sl->first == first && sl->count >= count)
            return; /* there or on its way */
        if (sl->state == RA_EMPTY || (sl->state == RA_READY && !sl->valid))
            free_slot = sl;
    }
    if (free_slot == NULL || !prefetch_started(v))
        return;
    free_slot->first = first;
    free_slot->count = count;
    free_slot->valid = 1;
    free_slot->state = RA_PENDING;
    pthread_cond_signal(&ra->wake);
}

/* A write to sectors [first, last) happened (its range lock still held): read-ahead
   overlapping it is stale. */
static void prefetch_invalidate(FastVolumeObject *v, uint64_t first, uint64_t last)
{
    prefetch_t *ra = &v->ra;
    pthread_mutex_lock(&ra->mu);
    for (int i = 0; i < RA_SLOTS; i++) {
        ra_slot_t *sl = &ra->slot[i];
        if (sl->state != RA_EMPTY && first < sl->first + sl->count && sl->first < last) {
            sl->valid = 0;
            pthread_cond_broadcast(&ra->ready_cv); /* a read waiting for it reads itself */
        }
    }
    pthread_mutex_unlock(&ra->mu);
}

/*
 * For a large direct read of [first, first + count): 1 when the read-ahead had all of
 * it (the plaintext is now in w->buf), else 0.  Read-ahead works in stretches of
 * RA_STRETCH bytes on a fixed grid, so requests of any size and alignment (a loop
 * device's mix of 1 MiB and 256 KiB, requests arriving out of order) are assembled
 * from the stretches they overlap.  A read near where the last one ended continues
 * a stream: the RA_SLOTS stretches from its end on are read ahead.
 */
static int prefetch_take(WorkerObject *w, uint64_t first, uint64_t count)
{
    FastVolumeObject *v = w->volume;
    prefetch_t *ra = &v->ra;
    uint64_t ss = v->sector_size, stretch = RA_STRETCH / ss;
    uint64_t total = v->size / ss, last = first + count;
    if (atomic_load(&v->closed) || (v->data_offset % DIRECT_ALIGN))
        return 0; /* closing (every request goes to Python), or no aligned stretches */
    pthread_mutex_lock(&ra->mu);
    if (ra->pid != 0 && ra->pid != getpid()) { /* a forked child: the threads are not here */
        pthread_mutex_unlock(&ra->mu);
        return 0;
    }
    int hit = 1;
    for (uint64_t g = first / stretch * stretch; g < last && hit; g += stretch) {
        ra_slot_t *sl = NULL;
        for (int i = 0; i < RA_SLOTS && sl == NULL; i++)
            if (ra->slot[i].state != RA_EMPTY && ra->slot[i].valid && ra->slot[i].first == g)
                sl = &ra->slot[i];
        if (sl == NULL) {
            hit = 0;
            break;
        }
        /* (the slot may be dropped or refilled meanwhile: then it is no longer ours) */
        while ((sl->state == RA_PENDING || sl->state == RA_LOADING) && sl->valid && sl->first == g)
            pthread_cond_wait(&ra->ready_cv, &ra->mu);
        uint64_t from = first > g ? first : g;
        uint64_t to = last < g + sl->count ? last : g + sl->count;
        if (sl->state != RA_READY || !sl->valid || sl->first != g
            || to < (last < g + stretch ? last : g + stretch)) {
            hit = 0;
            break;
        }
        if (first == g && last == g + sl->count) { /* the whole stretch: take its buffer */
            unsigned char *mine = w->buf;
            w->buf = sl->buf;
            sl->buf = mine;
            sl->state = RA_EMPTY;
        } else
            memcpy(w->buf + (from - first) * ss, sl->buf + (from - g) * ss,
                   (size_t)((to - from) * ss));
    }
    uint64_t near = 2 * stretch;
    int stream = hit || (first + near >= ra->next && first <= ra->next + near);
    ra->next = last;
    /* Dropped: stale stretches, those wholly before this read (the stream is past
       them) and those beyond the RA_SLOTS from the one it ends in (another stream's). */
    uint64_t hi = last / stretch * stretch + RA_SLOTS * stretch;
    for (int i = 0; i < RA_SLOTS; i++) {
        ra_slot_t *sl = &ra->slot[i];
        if ((sl->state == RA_READY || sl->state == RA_PENDING)
            && (!sl->valid || sl->first + sl->count <= first || sl->first >= hi)) {
            sl->state = RA_EMPTY;
            pthread_cond_broadcast(&ra->ready_cv); /* a read may wait for it */
        }
    }
    for (uint64_t k = 0, g = last / stretch * stretch; stream && k < RA_SLOTS && g < total;
         k++, g += stretch)
        prefetch_want(v, g, stretch < total - g ? stretch : total - g);
    pthread_mutex_unlock(&ra->mu);
    return hit;
}

/* Large, page-aligned and going to the O_DIRECT fd: what read-ahead is for. */
static int prefetch_wanted(FastVolumeObject *v, uint64_t first, uint64_t count)
{
    uint64_t len = count * v->sector_size, pos = v->data_offset + first * v->sector_size;
    return atomic_load(&v->direct_fd) >= 0 && len >= PREFETCH_MIN && direct_eligible(len, pos, 0);
}

/* -- write-behind -------------------------------------------------------------------------------- */

static void *writeback_main(void *arg)
{
    FastVolumeObject *v = arg;
    writeback_t *wb = &v->wb;
    uint64_t ss = v->sector_size;
    pthread_mutex_lock(&wb->mu);
    for (;;) {
        wb_slot_t *job = NULL;
        for (;;) {
            for (int i = 0; i < WB_SLOTS; i++) /* the oldest queued */
                if (wb->slot[i].state == WB_QUEUED && (job == NULL || wb->slot[i].seq < job->seq))
                    job = &wb->slot[i];
            if (job != NULL || wb->stop)
                break;
            pthread_cond_wait(&wb->wake, &wb->mu);
        }
        if (job == NULL)
            break; /* stopping, and nothing left to write */
        job->state = WB_WRITING;
        pthread_mutex_unlock(&wb->mu);
        uint64_t first = job->first;
        int rc = container_rw(v, job->buf, (size_t)(job->count * ss), v->data_offset + first * ss, 1);
        int err = errno;
        /* Recorded before the range lock goes: no read of these sectors may come
           between the failure and its record (it would get the old data). */
        if (rc < 0) {
            pthread_mutex_lock(&wb->mu);
            wb->failed++;
            if (wb->error == 0)
                wb->error = err ? err : EIO;
            lost_add(v, first, first + job->count);
            pthread_mutex_unlock(&wb->mu);
        } else
            lost_clear(v, first, first + job->count);
        /* Read-ahead of these sectors was made stale when the write was queued, and
           none can be read again before this range lock is released. */
        range_release(v->lock, job->lock_lo, job->lock_hi); /* taken by the worker that queued it */
        pthread_mutex_lock(&wb->mu);
        job->state = WB_FREE;
        pthread_cond_broadcast(&wb->done_cv);
    }
    pthread_mutex_unlock(&wb->mu);
    return NULL;
}

/* wb->mu held: allocate the slots and start the threads, once. */
static void writeback_start(FastVolumeObject *v)
{
    writeback_t *wb = &v->wb;
    if (wb->pid == 0 && !wb->failed_start) {
        int ok = 1;
        for (int i = 0; i < WB_SLOTS && ok; i++)
            ok = posix_memalign((void **)&wb->slot[i].buf, 4096, MAX_IO) == 0;
        threads_start(wb->thread, WB_THREADS, &wb->threads, &wb->pid, &wb->failed_start,
                      writeback_main, v, ok);
    }
}

/* A free slot, now WB_FILLING, for a write of *len* bytes (waiting for one if all are
   busy), or NULL: no write-behind here. */
static wb_slot_t *writeback_slot(FastVolumeObject *v)
{
    writeback_t *wb = &v->wb;
    wb_slot_t *got = NULL;
    pthread_mutex_lock(&wb->mu);
    writeback_start(v);
    while (wb->pid == getpid() && !wb->stop && got == NULL) {
        for (int i = 0; i < WB_SLOTS && got == NULL; i++)
            if (wb->slot[i].state == WB_FREE)
                got = &wb->slot[i];
        if (got == NULL)
            pthread_cond_wait(&wb->done_cv, &wb->mu);
    }
    if (got != NULL)
        got->state = WB_FILLING;
    pthread_mutex_unlock(&wb->mu);
    return got;
}

/* Hand a filled slot to the threads; they release the range lock [first, first+count). */
static void writeback_queue(FastVolumeObject *v, wb_slot_t *sl, uint64_t first, uint64_t count,
                            uint64_t lock_lo, uint64_t lock_hi)
{
    writeback_t *wb = &v->wb;
    pthread_mutex_lock(&wb->mu);
    sl->first = first;
    sl->count = count;
    sl->lock_lo = lock_lo;
    sl->lock_hi = lock_hi;
    sl->seq = ++wb->seq;
    sl->state = WB_QUEUED;
    pthread_cond_signal(&wb->wake);
    pthread_mutex_unlock(&wb->mu);
}

static void writeback_unfill(FastVolumeObject *v, wb_slot_t *sl)
{
    pthread_mutex_lock(&v->wb.mu);
    sl->state = WB_FREE;
    pthread_cond_broadcast(&v->wb.done_cv);
    pthread_mutex_unlock(&v->wb.mu);
}

/*
 * A large whole-sector write, written behind: 1 when queued (answer it), 0 when it was
 * not taken (no slot, closing, or the cipher failed: the caller goes on without).
 */
static int write_behind(WorkerObject *w, const unsigned char *data, uint64_t first, size_t count)
{
    FastVolumeObject *v = w->volume;
    uint64_t last = first + count, lo, hi;
    int queued = 0;
    write_lock_range(v, first, last, 1, &lo, &hi);
    pthread_rwlock_rdlock(&v->io_lock);
    if (!v->closed) {
        wb_slot_t *sl = writeback_slot(v);
        if (sl != NULL && range_acquire(v->lock, lo, hi) == 0) {
            /* Now, not once written: the answer goes out first, and a read after it
               must not be served a stretch read ahead before this write. */
            prefetch_invalidate(v, first, last);
            if (last * v->sector_size <= atomic_load(&v->size) /* not shrunk meanwhile */
                && in_window(v, first, last) /* nor moved to the partner's key */
                && transfer(w, data, sl->buf, first, count, 1, IO_NONE, 0) == 0) {
                writeback_queue(v, sl, first, count, lo, hi);
                queued = 1;
            } else
                range_release(v->lock, lo, hi);
        }
        if (sl != NULL && !queued)
            writeback_unfill(v, sl);
    }
    pthread_rwlock_unlock(&v->io_lock);
    return queued;
}

static void reply(FastVolumeObject *v, int fuse_fd, uint64_t unique, const void *payload,
                  size_t len)
{
    struct {
        uint32_t len;
        int32_t error;
        uint64_t unique;
    } header = {(uint32_t)(OUT_HEADER + len), 0, unique};
    struct iovec iov[2] = {{&header, OUT_HEADER}, {(void *)payload, len}};
    ssize_t n;
    do {
        n = writev(fuse_fd, iov, len ? 2 : 1);
    } while (n < 0 && errno == EINTR);
    /* ENOENT: the request was interrupted and answered already; ENODEV: unmounted;
       ECONNABORTED: the connection was aborted. */
    if (n < 0 && errno != ENOENT && errno != ENODEV && errno != ECONNABORTED)
        atomic_fetch_add(&v->reply_errors, 1);
}

/* Sectors [first, first + count) with their container I/O, under the range lock and
   unless the volume is closing: 0, or -1 (the request goes back to Python, also when
   a resize shrank the volume below it meanwhile). */
static int locked_transfer(WorkerObject *w, const unsigned char *src, uint64_t first,
                           size_t count, int write)
{
    FastVolumeObject *v = w->volume;
    uint64_t last = first + count, lo = first, hi = last;
    uint64_t pos = v->data_offset + first * v->sector_size;
    int failed = -1;
    if (write)
        write_lock_range(v, first, last, 1, &lo, &hi);
    pthread_rwlock_rdlock(&v->io_lock);
    if (!v->closed && range_acquire(v->lock, lo, hi) == 0) {
        /* not shrunk, nor moved to the partner's key, while this waited for the lock */
        if (last * v->sector_size <= atomic_load(&v->size) && in_window(v, first, last)) {
            if (!write && lost_overlaps(v, first, last))
                failed = -1; /* Python answers EIO */
            else
                failed = transfer(w, src, w->buf, first, count, write,
                                  write ? IO_WRITE : IO_READ, pos);
            if (write) /* even after a failure: part may be written */
                prefetch_invalidate(v, first, last);
            if (write && failed == 0)
                lost_clear(v, first, last);
        }
        range_release(v->lock, lo, hi);
    }
    pthread_rwlock_unlock(&v->io_lock);
    return failed;
}

/* 1 when answered, 0 when the request goes back to Python. */
static int fast_read(WorkerObject *w, int fuse_fd, uint64_t unique, uint64_t offset, uint32_t size)
{
    FastVolumeObject *v = w->volume;
    if (size > MAX_IO)
        return 0;
    if (offset >= v->size || size == 0) {
        atomic_fetch_add(&v->reads, 1);
        reply(v, fuse_fd, unique, NULL, 0);
        return 1;
    }
    uint64_t end = offset + size < v->size ? offset + size : v->size;
    uint64_t ss = v->sector_size;
    uint64_t first = offset / ss, last = (end + ss - 1) / ss;
    if (!in_window(v, first, last))
        return 0;
    if (prefetch_wanted(v, first, last - first) && prefetch_take(w, first, last - first))
        atomic_fetch_add(&v->prefetched, 1); /* the plaintext is in w->buf */
    else if (locked_transfer(w, w->buf, first, (size_t)(last - first), 0) < 0)
        return 0;
    atomic_fetch_add(&v->reads, 1);
    reply(v, fuse_fd, unique, w->buf + (offset - first * ss), (size_t)(end - offset));
    return 1;
}

/* last_write_ns becomes *ns* unless it is later already (a maximum: two writers may get
   here in the other order than their clock reads). */
static void note_write_time(FastVolumeObject *v, int64_t ns)
{
    int64_t seen = atomic_load(&v->last_write_ns);
    while (seen < ns && !atomic_compare_exchange_weak(&v->last_write_ns, &seen, ns))
        ;
}

static int fast_write(WorkerObject *w, int fuse_fd, uint64_t unique, uint64_t offset,
                      uint32_t size, const unsigned char *data)
{
    FastVolumeObject *v = w->volume;
    uint64_t ss = v->sector_size;
    /* Partial sectors (read-modify-write), short writes at the end, ENOSPC and EROFS
       are Python's. */
    if (v->readonly || size == 0 || size > MAX_IO || offset % ss || size % ss
        || offset >= v->size || size > v->size - offset
        || !in_window(v, offset / ss, (offset + size) / ss))
        return 0;
    if (size >= BEHIND_MIN && write_behind(w, data, offset / ss, size / ss))
        atomic_fetch_add(&v->behind, 1);
    else if (locked_transfer(w, data, offset / ss, size / ss, 1) < 0)
        return 0;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    note_write_time(v, (int64_t)now.tv_sec * 1000000000 + now.tv_nsec);
    atomic_fetch_add(&v->writes, 1);
    struct {
        uint32_t size, padding;
    } out = {size, 0};
    reply(v, fuse_fd, unique, &out, sizeof(out));
    return 1;
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t x;
    memcpy(&x, p, 4);
    return x;
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t x;
    memcpy(&x, p, 8);
    return x;
}

/*
 * A READ/WRITE this worker's volume declined, tried on its partner (an online
 * reencryption's other key) with contexts made for it on first use: 1 when answered.
 * What the partner answers counts as this volume's too (VolumeFS polls the writes for
 * fsync; the reads and writes are what the daemon logs).
 */
static int partner_serve(WorkerObject *self, FastVolumeObject *p, int fuse_fd, uint32_t opcode,
                         uint64_t unique, uint64_t offset, uint32_t size,
                         const unsigned char *data)
{
    if (self->pvol != p) {
        if (self->pvol != NULL)
            contexts_free(&self->pctx);
        self->pvol = NULL;
        if (contexts_init(p, &self->pctx) < 0)
            return 0;
        self->pvol = p;
    }
    WorkerObject as = *self; /* the same thread's buffer, the partner's volume and contexts */
    as.volume = p;
    as.ctx = self->pctx;
    int handled = opcode == FUSE_READ ? fast_read(&as, fuse_fd, unique, offset, size)
                                      : fast_write(&as, fuse_fd, unique, offset, size, data);
    self->buf = as.buf; /* a read may have swapped it with a read-ahead buffer */
    FastVolumeObject *v = self->volume;
    if (handled)
        atomic_fetch_add(&v->partnered, 1);
    if (handled && opcode == FUSE_READ)
        atomic_fetch_add(&v->reads, 1);
    if (handled && opcode == FUSE_WRITE) {
        note_write_time(v, atomic_load(&p->last_write_ns));
        atomic_fetch_add(&v->writes, 1);
    }
    return handled;
}

static PyObject *Worker_serve(WorkerObject *self, PyObject *args)
{
    int fuse_fd;
    Py_buffer request;
    if (!PyArg_ParseTuple(args, "iw*:serve", &fuse_fd, &request))
        return NULL;
    if (worker_enter(self) < 0) {
        PyBuffer_Release(&request);
        return NULL;
    }
    unsigned char *req = request.buf;
    size_t cap = (size_t)request.len;
    ssize_t length = 0;
    int err = 0;
    FastVolumeObject *v = self->volume;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        length = read(fuse_fd, req, cap);
        if (length < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
                continue; /* interrupted, or a request the kernel took back */
            err = errno;
            break;
        }
        if ((size_t)length < IN_HEADER + RW_IN)
            break; /* end of file, or too short for a READ/WRITE: Python's */
        uint32_t opcode = get_u32(req + 4);
        uint64_t unique = get_u64(req + 8);
        const unsigned char *body = req + IN_HEADER;
        uint64_t offset = get_u64(body + 8);
        uint32_t size = get_u32(body + 16);
        int handled;
        if (opcode == FUSE_READ)
            handled = fast_read(self, fuse_fd, unique, offset, size);
        else if (opcode == FUSE_WRITE)
            handled = (size_t)length >= IN_HEADER + RW_IN + (size_t)size
                      && fast_write(self, fuse_fd, unique, offset, size, body + RW_IN);
        else
            break;
        FastVolumeObject *p = atomic_load(&v->partner);
        if (!handled && p != NULL && (opcode == FUSE_READ || (size_t)length >= IN_HEADER + RW_IN + (size_t)size))
            handled = partner_serve(self, p, fuse_fd, opcode, unique, offset, size, body + RW_IN);
        if (!handled) {
            atomic_fetch_add(&v->declined, 1);
            break;
        }
    }
    Py_END_ALLOW_THREADS
    atomic_store(&self->busy, 0);
    PyBuffer_Release(&request);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(length);
}

static PyObject *Worker_crypt(WorkerObject *self, PyObject *args, int encrypt)
{
    Py_buffer data;
    uint64_t first;
    int parallel = 0;
    if (!PyArg_ParseTuple(args, "y*O&|p", &data, to_u64, &first, &parallel))
        return NULL;
    PyObject *result = NULL;
    size_t ss = self->volume->sector_size;
    if ((size_t)data.len % ss || (size_t)data.len > MAX_IO) {
        PyErr_SetString(PyExc_ValueError, "whole sectors, at most 1 MiB");
        goto out;
    }
    if (worker_enter(self) < 0)
        goto out;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    if (parallel)
        rc = transfer(self, data.buf, self->buf, first, (size_t)data.len / ss, encrypt, IO_NONE, 0);
    else
        rc = crypt_with(self->volume, &self->ctx, data.buf, self->buf, first,
                        (size_t)data.len / ss, encrypt);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed");
    else
        result = PyBytes_FromStringAndSize((const char *)self->buf, data.len);
    atomic_store(&self->busy, 0);
out:
    PyBuffer_Release(&data);
    return result;
}

/* crypt_into(src, first_sector, dst, encrypt): any number of whole sectors from *src*
 * into the caller's *dst* (same length; the same buffer, or not overlapping: EVP works
 * in place), with the GIL released and no
 * copy through the worker's buffer: the reencryption's hot zones, tens of MiB a call. */
static PyObject *Worker_crypt_into(WorkerObject *self, PyObject *args)
{
    Py_buffer src, dst;
    uint64_t first;
    int encrypt;
    if (!PyArg_ParseTuple(args, "y*O&w*p", &src, to_u64, &first, &dst, &encrypt))
        return NULL;
    PyObject *result = NULL;
    size_t ss = self->volume->sector_size;
    const unsigned char *s = src.buf;
    unsigned char *d = dst.buf;
    if ((size_t)src.len % ss || dst.len != src.len) {
        PyErr_SetString(PyExc_ValueError, "whole sectors, and a destination of the same length");
        goto out;
    }
    if (src.len && s != d && s < d + dst.len && d < s + src.len) {
        PyErr_SetString(PyExc_ValueError, "source and destination overlap in part");
        goto out;
    }
    if (worker_enter(self) < 0)
        goto out;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = crypt_with(self->volume, &self->ctx, s, d, first, (size_t)src.len / ss, encrypt);
    Py_END_ALLOW_THREADS
    atomic_store(&self->busy, 0);
    if (rc < 0)
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed");
    else
        result = Py_NewRef(Py_None);
out:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *Worker_encrypt(WorkerObject *self, PyObject *args)
{
    return Worker_crypt(self, args, 1);
}

static PyObject *Worker_decrypt(WorkerObject *self, PyObject *args)
{
    return Worker_crypt(self, args, 0);
}

static PyMethodDef Worker_methods[] = {
    {"serve", (PyCFunction)Worker_serve, METH_VARARGS,
     "serve(fuse_fd, buffer) -> length: answer READ/WRITE requests until one that Python must "
     "handle arrives; it is left in buffer and its length returned (0 at end of file)."},
    {"encrypt", (PyCFunction)Worker_encrypt, METH_VARARGS,
     "encrypt(data, first_sector, parallel=False) -> bytes: the sectors as the fast path "
     "writes them; parallel: shared with the helper thread as large requests are."},
    {"crypt_into", (PyCFunction)Worker_crypt_into, METH_VARARGS,
     "crypt_into(src, first_sector, dst, encrypt) -> None: whole sectors of src, any "
     "number, encrypted or decrypted into dst (same length; the same buffer or apart)."},
    {"decrypt", (PyCFunction)Worker_decrypt, METH_VARARGS,
     "decrypt(data, first_sector, parallel=False) -> bytes: the sectors as the fast path "
     "reads them."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WorkerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cryptfuse._fastpath.Worker",
    .tp_basicsize = sizeof(WorkerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One serving thread's cipher contexts and I/O buffer (FastVolume.worker()).",
    .tp_dealloc = (destructor)Worker_dealloc,
    .tp_methods = Worker_methods,
};

static PyObject *FastVolume_invalidate(FastVolumeObject *self, PyObject *args)
{
    uint64_t first, count;
    if (!PyArg_ParseTuple(args, "O&O&:invalidate", to_u64, &first, to_u64, &count))
        return NULL;
    if (count > UINT64_MAX - first) {
        PyErr_SetString(PyExc_OverflowError, "sector range overflows");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    prefetch_invalidate(self, first, first + count);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *FastVolume_drain(FastVolumeObject *self, PyObject *unused)
{
    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    writeback_wait(self, 0);
    Py_END_ALLOW_THREADS
    /* Never cleared: an answered write that was lost stays lost, so every drain (every
       fsync of the volume) reports it, not just the first ("fsyncgate",
       docs/reliability.md). */
    pthread_mutex_lock(&self->wb.mu);
    int err = self->wb.error;
    pthread_mutex_unlock(&self->wb.mu);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *FastVolume_set_window(FastVolumeObject *self, PyObject *args)
{
    uint64_t lo, hi;
    if (!PyArg_ParseTuple(args, "O&O&:set_window", to_u64, &lo, to_u64, &hi))
        return NULL;
    if (lo > hi) {
        PyErr_SetString(PyExc_ValueError, "window start after its end");
        return NULL;
    }
    atomic_store(&self->win_lo, lo);
    atomic_store(&self->win_hi, hi);
    Py_RETURN_NONE;
}

static PyObject *FastVolume_set_partner(FastVolumeObject *self, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &FastVolumeType) || arg == (PyObject *)self) {
        PyErr_SetString(PyExc_TypeError, "set_partner() takes another FastVolume");
        return NULL;
    }
    FastVolumeObject *p = (FastVolumeObject *)arg;
    if (p->lock != self->lock || p->fd != self->fd || p->size != self->size
        || p->sector_size != self->sector_size || p->data_offset != self->data_offset) {
        PyErr_SetString(PyExc_ValueError,
                        "a partner has the same fd, geometry and range lock");
        return NULL;
    }
    FastVolumeObject *none = NULL;
    Py_INCREF(arg);
    if (!atomic_compare_exchange_strong(&self->partner, &none, p)) {
        Py_DECREF(arg);
        PyErr_SetString(PyExc_ValueError, "this FastVolume has a partner already");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *FastVolume_set_size(FastVolumeObject *self, PyObject *args)
{
    uint64_t size;
    if (!PyArg_ParseTuple(args, "O&:set_size", to_u64, &size))
        return NULL;
    if (size % self->sector_size || size > INT64_MAX - self->data_offset) {
        PyErr_SetString(PyExc_ValueError, "size is not a whole number of sectors");
        return NULL;
    }
    atomic_store(&self->size, size);
    Py_RETURN_NONE;
}

/* start_threads(): what the data path would otherwise start and allocate on first use
   (--lock-memory: before the first request, so it is locked and never allocated under
   memory pressure). */
static PyObject *FastVolume_start_threads(FastVolumeObject *self, PyObject *unused)
{
    (void)unused;
    if (atomic_load(&self->closed))
        Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->helper.mu);
    helper_start(self);
    pthread_mutex_unlock(&self->helper.mu);
    pthread_mutex_lock(&self->ra.mu);
    (void)prefetch_started(self);
    pthread_mutex_unlock(&self->ra.mu);
    if (!self->readonly) {
        pthread_mutex_lock(&self->wb.mu);
        writeback_start(self);
        pthread_mutex_unlock(&self->wb.mu);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *FastVolume_set_discards(FastVolumeObject *self, PyObject *args)
{
    int on;
    if (!PyArg_ParseTuple(args, "p:set_discards", &on))
        return NULL;
    atomic_store(&self->discards, on);
    Py_RETURN_NONE;
}

static int sector_range(FastVolumeObject *self, PyObject *args, const char *fmt, uint64_t *first,
                        uint64_t *last)
{
    if (!PyArg_ParseTuple(args, fmt, to_u64, first, to_u64, last))
        return -1;
    if (*first > *last || *last > self->size / self->sector_size) {
        PyErr_SetString(PyExc_ValueError, "sector range outside the volume");
        return -1;
    }
    return 0;
}

static PyObject *FastVolume_lost(FastVolumeObject *self, PyObject *args)
{
    uint64_t first, last;
    if (sector_range(self, args, "O&O&:lost", &first, &last) < 0)
        return NULL;
    return PyBool_FromLong(lost_overlaps(self, first, last));
}

static PyObject *FastVolume_rewritten(FastVolumeObject *self, PyObject *args)
{
    uint64_t first, last;
    if (sector_range(self, args, "O&O&:rewritten", &first, &last) < 0)
        return NULL;
    lost_clear(self, first, last);
    Py_RETURN_NONE;
}

static PyObject *FastVolume_write_lock_range(FastVolumeObject *self, PyObject *args)
{
    uint64_t first, last, lo, hi;
    if (!PyArg_ParseTuple(args, "O&O&:write_lock_range", to_u64, &first, to_u64, &last))
        return NULL;
    if (first > last || last > self->size / self->sector_size) {
        PyErr_SetString(PyExc_ValueError, "sector range outside the volume");
        return NULL;
    }
    write_lock_range(self, first, last, 0, &lo, &hi);
    return Py_BuildValue("KK", (unsigned long long)lo, (unsigned long long)hi);
}

static PyMethodDef FastVolume_methods[] = {
    {"set_window", (PyCFunction)FastVolume_set_window, METH_VARARGS,
     "set_window(lo, hi): serve sectors [lo, hi) only, decline the rest (hold the range "
     "lock of what changes meanwhile)."},
    {"set_partner", (PyCFunction)FastVolume_set_partner, METH_O,
     "set_partner(other): requests this one declines are tried on *other* (same fd, "
     "geometry and range lock, another key); once."},
    {"set_size", (PyCFunction)FastVolume_set_size, METH_VARARGS,
     "set_size(bytes): the volume's new size (call holding the range lock of every "
     "sector up to the larger of both sizes: no request is under way then)."},
    {"start_threads", (PyCFunction)FastVolume_start_threads, METH_NOARGS,
     "start_threads(): start the helper, read-ahead and write-behind threads and "
     "allocate their buffers now rather than on first use (--lock-memory)."},
    {"set_discards", (PyCFunction)FastVolume_set_discards, METH_VARARGS,
     "set_discards(on): sectors whose ciphertext is all zeros (holes) decrypt to zeros."},
    {"write_lock_range", (PyCFunction)FastVolume_write_lock_range, METH_VARARGS,
     "write_lock_range(first, last) -> (lo, hi): the sectors a write of [first, last) "
     "through the page cache locks (more than its own while O_DIRECT is in use)."},
    {"drain", (PyCFunction)FastVolume_drain, METH_NOARGS,
     "drain(): wait until the writes answered so far are written to the container; "
     "OSError (every time) once any of them has failed."},
    {"lost", (PyCFunction)FastVolume_lost, METH_VARARGS,
     "lost(first, last) -> bool: whether an answered write of a sector in [first, last) "
     "failed and none has replaced it since (reading them must fail)."},
    {"rewritten", (PyCFunction)FastVolume_rewritten, METH_VARARGS,
     "rewritten(first, last): sectors [first, last) were written successfully outside the C "
     "path (call with their range lock held)."},
    {"invalidate", (PyCFunction)FastVolume_invalidate, METH_VARARGS,
     "invalidate(first_sector, count): sectors written outside the C path (call with "
     "their range lock held); read-ahead of them is dropped."},
    {"worker", (PyCFunction)FastVolume_worker, METH_NOARGS,
     "worker() -> Worker: contexts and buffers for one thread (never share one)."},
    {"close", (PyCFunction)FastVolume_close, METH_NOARGS,
     "close(): wait for the container I/O under way, then decline every request (the "
     "volume closes its fd after this)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FastVolumeType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cryptfuse._fastpath.FastVolume",
    .tp_basicsize = sizeof(FastVolumeObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An AES-XTS/CBC volume's geometry and keys for the GIL-free READ/WRITE path.",
    .tp_new = FastVolume_new,
    .tp_dealloc = (destructor)FastVolume_dealloc,
    .tp_methods = FastVolume_methods,
    .tp_getset = FastVolume_getset,
};

/* block_digests(data, block_size, hash_name) -> bytes: the digest of every block_size
   block of data, concatenated (LUKS2 reencryption's checksum resilience).  The GIL is
   released, so a reencryption hashes a hot zone while its cipher runs on the other core;
   in Python the same loop costs a call per 4 KiB block. */
static PyObject *block_digests(PyObject *unused, PyObject *args)
{
    (void)unused;
    Py_buffer data;
    Py_ssize_t block;
    const char *name;
    if (!PyArg_ParseTuple(args, "y*ns:block_digests", &data, &block, &name))
        return NULL;
    PyObject *result = NULL;
    const EVP_MD *md = EVP_get_digestbyname(name);
    if (md == NULL) {
        PyErr_Format(PyExc_ValueError, "unknown hash %s", name);
        goto out;
    }
    if (block <= 0 || data.len % block) {
        PyErr_SetString(PyExc_ValueError, "data must be whole blocks");
        goto out;
    }
    Py_ssize_t count = data.len / block;
    int size = EVP_MD_get_size(md);
    if (size <= 0 || count > PY_SSIZE_T_MAX / size) {
        PyErr_SetString(PyExc_ValueError, "digest size");
        goto out;
    }
    result = PyBytes_FromStringAndSize(NULL, count * size);
    if (result == NULL)
        goto out;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(result);
    const unsigned char *src = data.buf;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL)
        failed = 1;
    for (Py_ssize_t i = 0; !failed && i < count; i++) {
        unsigned int len = 0;
        if (EVP_DigestInit_ex(ctx, md, NULL) != 1
            || EVP_DigestUpdate(ctx, src + i * block, (size_t)block) != 1
            || EVP_DigestFinal_ex(ctx, dst + i * size, &len) != 1 || (int)len != size)
            failed = 1;
    }
    EVP_MD_CTX_free(ctx);
    Py_END_ALLOW_THREADS
    if (failed) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL digest failed");
    }
out:
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef module_methods[] = {
    {"block_digests", block_digests, METH_VARARGS,
     "block_digests(data, block_size, hash_name) -> bytes: the digest of every block, "
     "concatenated, computed without the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "cryptfuse._fastpath",
    "FUSE READ/WRITE of AES-XTS and AES-CBC volumes served in C without the GIL.", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&RangeLockType) < 0 || PyType_Ready(&FastVolumeType) < 0
        || PyType_Ready(&WorkerType) < 0)
        return NULL;
    static int atfork_done; /* a second interpreter must not register the handlers twice */
    if (!atfork_done) {
        if (pthread_atfork(secrets_prepare, secrets_parent, secrets_child) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            return NULL;
        }
        atfork_done = 1;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "RangeLock", (PyObject *)&RangeLockType) < 0
        || PyModule_AddObjectRef(m, "FastVolume", (PyObject *)&FastVolumeType) < 0
        || PyModule_AddObjectRef(m, "Worker", (PyObject *)&WorkerType) < 0
        || PyModule_AddIntConstant(m, "MAX_IO", MAX_IO) < 0
        || PyModule_AddIntConstant(m, "IV_PLAIN64", IV_PLAIN64) < 0
        || PyModule_AddIntConstant(m, "IV_PLAIN", IV_PLAIN) < 0
        || PyModule_AddIntConstant(m, "IV_PLAIN64BE", IV_PLAIN64BE) < 0
        || PyModule_AddIntConstant(m, "IV_NULL", IV_NULL) < 0
        || PyModule_AddIntConstant(m, "IV_ESSIV", IV_ESSIV) < 0
        || PyModule_AddIntConstant(m, "MODE_XTS", MODE_XTS) < 0
        || PyModule_AddIntConstant(m, "MODE_CBC", MODE_CBC) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
