/*
 * cryptfuse._xts: the XTS tweak chain, the one part of the sector engine that
 * numpy cannot do in a single pass.
 *
 * xor_tweaks(dst, src, tweaks, sector_size) computes, for every sector i and
 * every 16-byte block j of it, dst[i][j] = src[i][j] ^ (T_i * x^j) in GF(2^128)
 * (IEEE 1619 little-endian convention), T_i being the 16 bytes at tweaks[16 i].
 * dst may be src.  The AES passes stay in OpenSSL (through `cryptography`);
 * this only whitens before and after them.  sector.py falls back to numpy
 * when this module is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define LANES 4

static inline void xor_block(uint8_t *dst, const uint8_t *src, uint64_t lo, uint64_t hi)
{
    uint64_t a, b;
    memcpy(&a, src, 8);
    memcpy(&b, src + 8, 8);
    a ^= lo;
    b ^= hi;
    memcpy(dst, &a, 8);
    memcpy(dst + 8, &b, 8);
}

/* multiply by x: shift left one bit, reduce by x^128 = x^7 + x^2 + x + 1 */
#define DOUBLE(lo, hi)                                   \
    do {                                                 \
        uint64_t carry_ = (hi) >> 63;                    \
        (hi) = ((hi) << 1) | ((lo) >> 63);               \
        (lo) = ((lo) << 1) ^ (0x87 & (0 - carry_));      \
    } while (0)

static void xor_run(uint8_t *dst, const uint8_t *src, const uint8_t *tweaks,
                    Py_ssize_t sectors, Py_ssize_t blocks)
{
    Py_ssize_t stride = blocks * 16;
    Py_ssize_t i = 0;
    /* The doubling chain of one sector is serial; running LANES sectors side
       by side lets the CPU overlap their chains. */
    for (; i + LANES <= sectors; i += LANES) {
        uint64_t lo[LANES], hi[LANES];
        for (int k = 0; k < LANES; k++) {
            memcpy(&lo[k], tweaks + 16 * (i + k), 8);
            memcpy(&hi[k], tweaks + 16 * (i + k) + 8, 8);
        }
        for (Py_ssize_t j = 0; j < blocks; j++) {
            for (int k = 0; k < LANES; k++) {
                Py_ssize_t at = (i + k) * stride + j * 16;
                xor_block(dst + at, src + at, lo[k], hi[k]);
                DOUBLE(lo[k], hi[k]);
            }
        }
    }
    for (; i < sectors; i++) {
        uint64_t lo, hi;
        memcpy(&lo, tweaks + 16 * i, 8);
        memcpy(&hi, tweaks + 16 * i + 8, 8);
        for (Py_ssize_t j = 0; j < blocks; j++) {
            Py_ssize_t at = i * stride + j * 16;
            xor_block(dst + at, src + at, lo, hi);
            DOUBLE(lo, hi);
        }
    }
}

/* Buffers from this size on are processed without the GIL. */
#define RELEASE_GIL_FROM (64 * 1024)

static PyObject *xor_tweaks(PyObject *self, PyObject *args)
{
    Py_buffer dst, src, tweaks;
    Py_ssize_t sector_size;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*y*y*n", &dst, &src, &tweaks, &sector_size))
        return NULL;
    PyObject *result = NULL;
    if (sector_size <= 0 || sector_size % 16 || src.len % sector_size || dst.len < src.len
        || tweaks.len < (src.len / sector_size) * 16) {
        PyErr_SetString(PyExc_ValueError, "xor_tweaks: inconsistent buffer sizes");
        goto out;
    }
    if (src.len >= RELEASE_GIL_FROM) {
        Py_BEGIN_ALLOW_THREADS
        xor_run(dst.buf, src.buf, tweaks.buf, src.len / sector_size, sector_size / 16);
        Py_END_ALLOW_THREADS
    } else {
        /* a few sectors take less time than handing the GIL over and back */
        xor_run(dst.buf, src.buf, tweaks.buf, src.len / sector_size, sector_size / 16);
    }
    result = Py_NewRef(Py_None);
out:
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    PyBuffer_Release(&tweaks);
    return result;
}

static PyMethodDef methods[] = {
    {"xor_tweaks", xor_tweaks, METH_VARARGS,
     "xor_tweaks(dst, src, tweaks, sector_size): dst = src ^ XTS tweak chain of each sector."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "cryptfuse._xts", "XTS tweak chain for the sector engine.", -1, methods,
};

PyMODINIT_FUNC PyInit__xts(void) { return PyModule_Create(&module); }
