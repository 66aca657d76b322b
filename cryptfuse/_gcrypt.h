/*
 * The C entry point of cryptfuse._gcrypt.Engine, for cryptfuse._fastpath.
 *
 * Engine.c_api is a PyCapsule named CRYPTFUSE_ENGINE_API_NAME holding a pointer to this
 * struct.  crypt(engine, src, dst, first, count, encrypt) en/decrypts *count* whole
 * sectors from src into dst (they may be the same buffer, not otherwise overlapping),
 * *first* counting encryption sectors from the start of the data area, exactly as
 * Engine.crypt; it returns 0, or -1 on failure.  It needs no GIL and is thread-safe;
 * the caller keeps a reference to the engine object while it may call.
 */
#ifndef CRYPTFUSE_GCRYPT_H
#define CRYPTFUSE_GCRYPT_H
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#define CRYPTFUSE_ENGINE_API_NAME "cryptfuse._gcrypt.engine_api"
#define CRYPTFUSE_ENGINE_API_VERSION 1

typedef struct {
    int version;
    int (*crypt)(PyObject *engine, const unsigned char *src, unsigned char *dst, uint64_t first,
                 size_t count, int encrypt);
} cryptfuse_engine_api;

#endif
