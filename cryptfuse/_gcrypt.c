/*
 * cryptfuse._gcrypt: dm-crypt sector encryption with libgcrypt's block ciphers, and
 * libgcrypt's hashes and PBKDF2.
 *
 * OpenSSL (through `cryptography`) serves AES; it has no Serpent or Twofish and hides
 * Whirlpool.  libgcrypt -- cryptsetup's default crypto backend -- has every cipher and
 * hash dm-crypt users meet (docs/ciphers.md).  Engine runs whole runs of sectors with
 * dm-crypt's semantics (drivers/md/dm-crypt.c: IV generators, keycount, iv_offset,
 * iv_large_sectors) without the GIL:
 *
 *   chain modes  ecb, cbc, xts, ctr, lrw (lrw built here on the block cipher)
 *   IV modes     null, plain, plain64, plain64be, essiv (its key hash(subkey) given by
 *                the caller), benbi, lmk (loop-AES v2/v3), tcw (TrueCrypt < 4.1), eboiv
 *                (the byte offset encrypted with the data key; cbc and ctr)
 *
 * Speed.  libgcrypt 1.10 runs ECB and XTS one block at a time for every cipher but AES,
 * while its CBC and CFB *decryption* use the 8/16-way AVX2 code.  Both are turned into
 * bulk ECB here (exact identities of the modes, nothing approximated):
 *   CBC decryption with IV 0 of C_1..C_n gives D(C_i) ^ C_(i-1), so D(C_i) = out_i ^ C_(i-1);
 *   CFB decryption with IV X_1 of X_2..X_n,0 gives X_(i+1) ^ E(X_i), so E(X_i) = out_i ^ X_(i+1).
 * XTS and LRW are then one bulk ECB pass between two whitening passes, several times
 * faster than libgcrypt's own XTS for Serpent, Twofish and Camellia (docs/ciphers.md);
 * CBC encryption runs block position by block position across the sectors of a run.
 *
 * The one key size libgcrypt lacks, 192-bit Twofish (the kernel has it), comes from
 * nettle (qemu's library): one block at a time, through the same mode code.
 *
 * Engine.c_api is a capsule ("cryptfuse._gcrypt.engine_api") with the C entry point
 * cryptfuse._fastpath calls for volumes whose cipher only this module has.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <gcrypt.h>
#include <nettle/twofish.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "_gcrypt.h"

enum { CH_ECB = 0, CH_CBC = 1, CH_XTS = 2, CH_CTR = 3, CH_LRW = 4 };
enum {
    IV_NULL = 0, IV_PLAIN = 1, IV_PLAIN64 = 2, IV_PLAIN64BE = 3, IV_ESSIV = 4, IV_BENBI = 5,
    IV_LMK = 6, IV_TCW = 7, IV_NONE = 8, IV_EBOIV = 9
};

/* bytes of sectors one pass works on: small enough for the scratch to stay in cache */
#define CHUNK (64 * 1024)
#define MAX_BS 16
#define MAX_SECTOR 4096
#define LMK_SEED_SIZE 64

/* One key's libgcrypt handles: CBC (also bulk decryption), CFB (bulk encryption), CTR;
   or, for 192-bit Twofish, nettle's key schedule instead (tf). */
typedef struct {
    gcry_cipher_hd_t cbc, cfb, ctr;
    struct twofish_ctx *tf;
} kctx_t;

/* One thread's handles for every subkey and its scratch; engines keep a free list. */
typedef struct slot {
    struct slot *next;
    kctx_t *data, *tweak, *essiv; /* [keycount] each; tweak for xts, essiv for essiv */
    unsigned char *tmp;            /* CHUNK + MAX_BS */
    unsigned char *tw;             /* CHUNK: LRW's tweak stream */
    unsigned char ivs[(CHUNK / 512) * MAX_BS];
    unsigned char sec[512];        /* tcw: one whitened ciphertext sector */
} slot_t;

typedef struct {
    PyObject_HEAD
    int algo, bs, chain, ivmode, keycount;
    uint32_t ss, spb, shift;
    uint64_t iv_offset;
    int dklen, tklen, eklen;
    unsigned char *dkeys, *tkeys, *ekeys; /* keycount keys each (gcry_malloc_secure-free) */
    uint64_t (*lrw_inc)[128][2];           /* [keycount][k] = K2 * (2^(k+1) - 1) */
    uint64_t (*lrw_k2)[2];
    int has_seed;
    unsigned char lmk_seed[LMK_SEED_SIZE];
    unsigned char tcw_seed[MAX_BS], tcw_white[16];
    pthread_mutex_t mu;
    slot_t *free;
} EngineObject;

static void wipe_free(void *p, size_t n)
{
    if (p != NULL) {
        volatile unsigned char *v = p;
        while (n--)
            *v++ = 0;
        free(p);
    }
}

static void xor_into(unsigned char *dst, const unsigned char *a, size_t len)
{
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t x, y;
        memcpy(&x, dst + i, 8);
        memcpy(&y, a + i, 8);
        x ^= y;
        memcpy(dst + i, &x, 8);
    }
    for (; i < len; i++)
        dst[i] ^= a[i];
}

/* -- bulk ECB from libgcrypt's parallel CBC/CFB decryption ------------------------------ */

static int ecb_encrypt(const EngineObject *e, kctx_t *k, unsigned char *dst,
                       const unsigned char *src, size_t len, unsigned char *tmp)
{
    size_t bs = (size_t)e->bs;
    if (k->tf != NULL) {
        twofish_encrypt(k->tf, len, dst, src);
        return 0;
    }
    while (len > 0) {
        size_t n = len < CHUNK ? len : CHUNK;
        memcpy(tmp, src + bs, n - bs);
        memset(tmp + n - bs, 0, bs);
        if (gcry_cipher_setiv(k->cfb, src, bs) || gcry_cipher_decrypt(k->cfb, dst, n, tmp, n))
            return -1;
        xor_into(dst, tmp, n);
        src += n;
        dst += n;
        len -= n;
    }
    return 0;
}

static int ecb_decrypt(const EngineObject *e, kctx_t *k, unsigned char *dst,
                       const unsigned char *src, size_t len, unsigned char *tmp)
{
    static const unsigned char zero[MAX_BS];
    size_t bs = (size_t)e->bs;
    if (k->tf != NULL) {
        twofish_decrypt(k->tf, len, dst, src);
        return 0;
    }
    while (len > 0) {
        size_t n = len < CHUNK ? len : CHUNK;
        const unsigned char *in = src;
        if (dst == src) {
            memcpy(tmp, src, n);
            in = tmp;
        }
        if (gcry_cipher_setiv(k->cbc, zero, bs) || gcry_cipher_decrypt(k->cbc, dst, n, in, n))
            return -1;
        xor_into(dst + bs, in, n - bs);
        src += n;
        dst += n;
        len -= n;
    }
    return 0;
}

/* -- XTS and LRW whitening -------------------------------------------------------------- */

/* dst[i][j] = src[i][j] ^ (T_i * x^j), IEEE 1619 (little-endian GF(2^128)) */
static void xts_whiten(unsigned char *dst, const unsigned char *src, const unsigned char *tw,
                       size_t n, size_t blocks)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t lo, hi;
        memcpy(&lo, tw + 16 * i, 8);
        memcpy(&hi, tw + 16 * i + 8, 8);
        for (size_t j = 0; j < blocks; j++) {
            uint64_t a, b;
            size_t off = (i * blocks + j) * 16;
            memcpy(&a, src + off, 8);
            memcpy(&b, src + off + 8, 8);
            a ^= lo;
            b ^= hi;
            memcpy(dst + off, &a, 8);
            memcpy(dst + off + 8, &b, 8);
            uint64_t carry = hi >> 63;
            hi = (hi << 1) | (lo >> 63);
            lo = (lo << 1) ^ (0x87 & (0 - carry));
        }
    }
}

static uint64_t be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static void put_be64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char)v;
        v >>= 8;
    }
}

/* a * b in GF(2^128) as LRW defines it: big-endian bit strings, x^128 = x^7 + x^2 + x + 1 */
static void gf_mul_bbe(uint64_t r[2], const uint64_t a[2], const uint64_t b[2])
{
    uint64_t hi = 0, lo = 0;
    for (int i = 127; i >= 0; i--) {
        uint64_t carry = hi >> 63;
        hi = (hi << 1) | (lo >> 63);
        lo = (lo << 1) ^ (0x87 & (0 - carry));
        uint64_t bit = i >= 64 ? (b[0] >> (i - 64)) & 1 : (b[1] >> i) & 1;
        hi ^= a[0] & (0 - bit);
        lo ^= a[1] & (0 - bit);
    }
    r[0] = hi;
    r[1] = lo;
}

/* LRW's tweak of each block of *n* sectors: T = K2 * I, I the 128-bit big-endian IV of the
   sector, incremented per block (the kernel's lrw template, IV from dm-crypt). */
static void lrw_stream(const EngineObject *e, int k, const unsigned char *ivs, size_t n,
                       unsigned char *tw)
{
    size_t blocks = e->ss / 16;
    for (size_t i = 0; i < n; i++) {
        uint64_t idx[2] = {be64(ivs + 16 * i), be64(ivs + 16 * i + 8)};
        uint64_t t[2];
        gf_mul_bbe(t, e->lrw_k2[k], idx);
        for (size_t j = 0; j < blocks; j++) {
            unsigned char *out = tw + (i * blocks + j) * 16;
            put_be64(out, t[0]);
            put_be64(out + 8, t[1]);
            /* I -> I + 1 flips the trailing ones and the zero above them:
               T ^= K2 * (2^(m+1) - 1), m the number of trailing ones */
            int m;
            if (idx[1] != UINT64_MAX)
                m = __builtin_ctzll(~idx[1]);
            else if (idx[0] != UINT64_MAX)
                m = 64 + __builtin_ctzll(~idx[0]);
            else
                m = 127;
            t[0] ^= e->lrw_inc[k][m][0];
            t[1] ^= e->lrw_inc[k][m][1];
            idx[1]++;
            if (idx[1] == 0)
                idx[0]++;
        }
    }
}

/* -- IV generators ---------------------------------------------------------------------- */

static void md5_compress(uint32_t st[4], const unsigned char block[64]);

/* loop-AES's IV: MD5 state (no final padding) over seed, plaintext bytes 16..511 and the
   sector number (dm-crypt's crypt_iv_lmk_one) */
static void lmk_iv(const EngineObject *e, uint64_t sector, const unsigned char *plain,
                   unsigned char *iv)
{
    uint32_t st[4] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476};
    unsigned char block[64];
    if (e->has_seed)
        md5_compress(st, e->lmk_seed);
    for (int b = 0; b < 7; b++)
        md5_compress(st, plain + 16 + 64 * b);
    memcpy(block, plain + 16 + 448, 48);
    uint32_t words[4] = {(uint32_t)(sector & 0xFFFFFFFF),
                         (uint32_t)((sector >> 32) & 0x00FFFFFF) | 0x80000000u, 4024, 0};
    for (int w = 0; w < 4; w++)
        for (int b = 0; b < 4; b++)
            block[48 + 4 * w + b] = (unsigned char)(words[w] >> (8 * b));
    md5_compress(st, block);
    unsigned char out[16];
    for (int w = 0; w < 4; w++)
        for (int b = 0; b < 4; b++)
            out[4 * w + b] = (unsigned char)(st[w] >> (8 * b));
    memcpy(iv, out, (size_t)e->bs);
}

static uint32_t crc32_le(const unsigned char *p, size_t n)
{
    /* the kernel's "crc32" shash: reflected 0xEDB88320, seed 0, no final inversion */
    uint32_t c = 0;
    while (n--) {
        c ^= *p++;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xEDB88320u & (0 - (c & 1)));
    }
    return c;
}

/* TrueCrypt's whitening of a 512-byte sector (dm-crypt's crypt_iv_tcw_whitening) */
static void tcw_whiten(const EngineObject *e, uint64_t sector, unsigned char *data)
{
    unsigned char buf[16];
    for (int i = 0; i < 16; i++)
        buf[i] = e->tcw_white[i] ^ (unsigned char)(sector >> (8 * (i % 8)));
    for (int i = 0; i < 4; i++) {
        uint32_t c = crc32_le(buf + 4 * i, 4);
        for (int b = 0; b < 4; b++)
            buf[4 * i + b] = (unsigned char)(c >> (8 * b));
    }
    for (int i = 0; i < 4; i++) {
        buf[i] ^= buf[12 + i];
        buf[4 + i] ^= buf[8 + i];
    }
    for (int i = 0; i < 512 / 8; i++)
        xor_into(data + 8 * i, buf, 8);
}

/* The IVs of *n* sectors from cc0 on (not lmk/tcw) into ivs, bs bytes each. */
static int gen_ivs(const EngineObject *e, slot_t *s, int k, uint64_t cc0, size_t n,
                   unsigned char *ivs)
{
    size_t bs = (size_t)e->bs;
    memset(ivs, 0, n * bs);
    for (size_t i = 0; i < n; i++) {
        uint64_t sec = (cc0 + i * e->spb) >> e->shift;
        unsigned char *iv = ivs + i * bs;
        switch (e->ivmode) {
        case IV_PLAIN:
            sec &= 0xFFFFFFFF;
            /* fall through */
        case IV_PLAIN64:
        case IV_ESSIV:
            for (size_t b = 0; b < 8 && b < bs; b++)
                iv[b] = (unsigned char)(sec >> (8 * b));
            break;
        case IV_PLAIN64BE:
            put_be64(iv + bs - 8, sec);
            break;
        case IV_BENBI: {
            int log = __builtin_ctz((unsigned)bs);
            put_be64(iv + bs - 8, (sec << (9 - log)) + 1);
            break;
        }
        case IV_EBOIV: /* the byte offset dm-crypt computes (wraps like its u64) */
            sec *= e->ss;
            for (size_t b = 0; b < 8; b++)
                iv[b] = (unsigned char)(sec >> (8 * b));
            break;
        default:
            break;
        }
    }
    if (e->ivmode == IV_ESSIV)
        return ecb_encrypt(e, &s->essiv[k], ivs, ivs, n * bs, s->tmp);
    if (e->ivmode == IV_EBOIV) /* encrypted with the data key itself */
        return ecb_encrypt(e, &s->data[k], ivs, ivs, n * bs, s->tmp);
    return 0;
}

/* -- the chain modes -------------------------------------------------------------------- */

/* En/decrypt n sectors of subkey k with the IVs given. */
static int crypt_ivs(const EngineObject *e, slot_t *s, int k, const unsigned char *src,
                     unsigned char *dst, const unsigned char *ivs, size_t n, int enc)
{
    size_t ss = e->ss, bs = (size_t)e->bs, len = n * ss;
    kctx_t *d = &s->data[k];
    switch (e->chain) {
    case CH_ECB:
        return enc ? ecb_encrypt(e, d, dst, src, len, s->tmp)
                   : ecb_decrypt(e, d, dst, src, len, s->tmp);
    case CH_XTS:
    case CH_LRW: {
        unsigned char tweaks[(CHUNK / 512) * 16];
        if (e->chain == CH_XTS) {
            if (ecb_encrypt(e, &s->tweak[k], tweaks, ivs, n * 16, s->tmp))
                return -1;
            xts_whiten(dst, src, tweaks, n, ss / 16);
        } else {
            lrw_stream(e, k, ivs, n, s->tw);
            if (dst != src)
                memcpy(dst, src, len);
            xor_into(dst, s->tw, len);
        }
        if ((enc ? ecb_encrypt(e, d, dst, dst, len, s->tmp)
                 : ecb_decrypt(e, d, dst, dst, len, s->tmp)))
            return -1;
        if (e->chain == CH_XTS)
            xts_whiten(dst, dst, tweaks, n, ss / 16);
        else
            xor_into(dst, s->tw, len);
        return 0;
    }
    default:
        if (e->chain == CH_CBC && enc && (n > 1 || d->tf != NULL)) {
            /* CBC encryption is serial within a sector, not across sectors: encrypt
               block j of all n sectors in one bulk pass, j = 0, 1, ... (in place too:
               column j of src is read before column j of dst is written) */
            unsigned char col[(CHUNK / 512) * MAX_BS];
            size_t blocks = ss / bs;
            for (size_t j = 0; j < blocks; j++) {
                for (size_t i = 0; i < n; i++) {
                    const unsigned char *chainv = j == 0 ? ivs + i * bs : dst + i * ss + (j - 1) * bs;
                    memcpy(col + i * bs, src + i * ss + j * bs, bs);
                    xor_into(col + i * bs, chainv, bs);
                }
                if (ecb_encrypt(e, d, col, col, n * bs, s->tmp))
                    return -1;
                for (size_t i = 0; i < n; i++)
                    memcpy(dst + i * ss + j * bs, col + i * bs, bs);
            }
            return 0;
        }
        if (d->tf != NULL) { /* nettle: CBC decryption and CTR from its block function */
            for (size_t i = 0; i < n; i++) {
                const unsigned char *in = src + i * ss;
                unsigned char *out = dst + i * ss;
                const unsigned char *iv = ivs + i * bs;
                if (e->chain == CH_CBC) {
                    if (in == out) {
                        memcpy(s->tmp, in, ss);
                        in = s->tmp;
                    }
                    twofish_decrypt(d->tf, ss, out, in);
                    xor_into(out, iv, bs);
                    xor_into(out + bs, in, ss - bs);
                } else { /* CTR: the IV as a big-endian counter, one block per step */
                    unsigned char ctr[MAX_BS];
                    memcpy(ctr, iv, bs);
                    for (size_t j = 0; j < ss / bs; j++) {
                        memcpy(s->tw + j * bs, ctr, bs);
                        for (size_t b = bs; b-- > 0;)
                            if (++ctr[b] != 0)
                                break;
                    }
                    twofish_encrypt(d->tf, ss, s->tw, s->tw);
                    if (out != in)
                        memcpy(out, in, ss);
                    xor_into(out, s->tw, ss);
                }
            }
            return 0;
        }
        for (size_t i = 0; i < n; i++) {
            const unsigned char *in = src + i * ss;
            unsigned char *out = dst + i * ss;
            gcry_cipher_hd_t h = e->chain == CH_CBC ? d->cbc : d->ctr;
            gcry_error_t err = e->chain == CH_CBC ? gcry_cipher_setiv(h, ivs + i * bs, bs)
                                                  : gcry_cipher_setctr(h, ivs + i * bs, bs);
            if (!err)
                err = enc ? gcry_cipher_encrypt(h, out, ss, in == out ? NULL : in,
                                                in == out ? 0 : ss)
                          : gcry_cipher_decrypt(h, out, ss, in == out ? NULL : in,
                                                in == out ? 0 : ss);
            if (err)
                return -1;
        }
        return 0;
    }
}

/* n sectors of subkey k from cc0 on (every sector in the run uses subkey k) */
static int run_chunk(const EngineObject *e, slot_t *s, int k, const unsigned char *src,
                     unsigned char *dst, uint64_t cc0, size_t n, int enc)
{
    size_t bs = (size_t)e->bs, ss = e->ss;
    if (e->ivmode != IV_LMK && e->ivmode != IV_TCW) {
        if (e->ivmode != IV_NONE && gen_ivs(e, s, k, cc0, n, s->ivs))
            return -1;
        return crypt_ivs(e, s, k, src, dst, s->ivs, n, enc);
    }
    for (size_t i = 0; i < n; i++) {
        uint64_t sec = (cc0 + i * e->spb) >> e->shift;
        const unsigned char *in = src + i * ss;
        unsigned char *out = dst + i * ss;
        unsigned char iv[MAX_BS] = {0};
        if (e->ivmode == IV_LMK) {
            if (enc)
                lmk_iv(e, sec, in, iv);
            if (crypt_ivs(e, s, k, in, out, iv, 1, enc))
                return -1;
            if (!enc) {
                lmk_iv(e, sec, out, iv);
                xor_into(out, iv, bs);
            }
        } else { /* IV_TCW */
            for (size_t b = 0; b < bs; b++)
                iv[b] = e->tcw_seed[b] ^ (unsigned char)(sec >> (8 * (b % 8)));
            if (!enc) {
                memcpy(s->sec, in, ss);
                tcw_whiten(e, sec, s->sec);
                in = s->sec;
            }
            if (crypt_ivs(e, s, k, in, out, iv, 1, enc))
                return -1;
            if (enc)
                tcw_whiten(e, sec, out);
        }
    }
    return 0;
}

static int engine_run(const EngineObject *e, slot_t *s, const unsigned char *src,
                      unsigned char *dst, uint64_t first, size_t count, int enc)
{
    size_t per = e->keycount > 1 ? 1 : CHUNK / e->ss;
    for (size_t i = 0; i < count;) {
        uint64_t cc = (first + i) * e->spb + e->iv_offset; /* wraps like the kernel's u64 */
        size_t n = count - i < per ? count - i : per;
        int k = (int)(cc & (uint64_t)(e->keycount - 1));
        if (run_chunk(e, s, k, src + i * e->ss, dst + i * e->ss, cc, n, enc))
            return -1;
        i += n;
    }
    return 0;
}

/* -- slots ------------------------------------------------------------------------------ */

static void kctx_close(kctx_t *k)
{
    if (k->cbc)
        gcry_cipher_close(k->cbc);
    if (k->cfb)
        gcry_cipher_close(k->cfb);
    if (k->ctr)
        gcry_cipher_close(k->ctr);
    k->cbc = k->cfb = k->ctr = NULL;
    wipe_free(k->tf, sizeof(*k->tf));
    k->tf = NULL;
}

/* libgcrypt has Twofish with 128- and 256-bit keys only; the kernel and nettle all three */
static int nettle_twofish192(int algo, int len)
{
    return len == 24 && (algo == GCRY_CIPHER_TWOFISH || algo == GCRY_CIPHER_TWOFISH128);
}

static int kctx_open(kctx_t *k, int algo, const unsigned char *key, int len, int ctr)
{
    if (nettle_twofish192(algo, len)) {
        k->tf = malloc(sizeof(*k->tf));
        if (k->tf == NULL)
            return -1;
        twofish_set_key(k->tf, (size_t)len, key);
        return 0;
    }
    if (gcry_cipher_open(&k->cbc, algo, GCRY_CIPHER_MODE_CBC, 0)
        || gcry_cipher_setkey(k->cbc, key, (size_t)len)
        || gcry_cipher_open(&k->cfb, algo, GCRY_CIPHER_MODE_CFB, 0)
        || gcry_cipher_setkey(k->cfb, key, (size_t)len)
        || (ctr
            && (gcry_cipher_open(&k->ctr, algo, GCRY_CIPHER_MODE_CTR, 0)
                || gcry_cipher_setkey(k->ctr, key, (size_t)len)))) {
        kctx_close(k);
        return -1;
    }
    return 0;
}

static void slot_free(const EngineObject *e, slot_t *s)
{
    if (s == NULL)
        return;
    for (int i = 0; i < e->keycount; i++) {
        if (s->data)
            kctx_close(&s->data[i]);
        if (s->tweak)
            kctx_close(&s->tweak[i]);
        if (s->essiv)
            kctx_close(&s->essiv[i]);
    }
    free(s->data);
    free(s->tweak);
    free(s->essiv);
    wipe_free(s->tmp, CHUNK + MAX_BS);
    wipe_free(s->tw, CHUNK);
    free(s);
}

static slot_t *slot_new(const EngineObject *e)
{
    slot_t *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return NULL;
    s->data = calloc((size_t)e->keycount, sizeof(kctx_t));
    s->tweak = e->chain == CH_XTS ? calloc((size_t)e->keycount, sizeof(kctx_t)) : NULL;
    s->essiv = e->ivmode == IV_ESSIV ? calloc((size_t)e->keycount, sizeof(kctx_t)) : NULL;
    s->tmp = malloc(CHUNK + MAX_BS);
    s->tw = malloc(CHUNK);
    if (s->data == NULL || s->tmp == NULL || s->tw == NULL
        || (e->chain == CH_XTS && s->tweak == NULL)
        || (e->ivmode == IV_ESSIV && s->essiv == NULL))
        goto fail;
    for (int i = 0; i < e->keycount; i++) {
        if (kctx_open(&s->data[i], e->algo, e->dkeys + (size_t)i * e->dklen, e->dklen,
                      e->chain == CH_CTR)
            || (s->tweak
                && kctx_open(&s->tweak[i], e->algo, e->tkeys + (size_t)i * e->tklen, e->tklen, 0))
            || (s->essiv
                && kctx_open(&s->essiv[i], e->algo, e->ekeys + (size_t)i * e->eklen, e->eklen,
                             0)))
            goto fail;
    }
    return s;
fail:
    slot_free(e, s);
    return NULL;
}

static slot_t *slot_get(EngineObject *e)
{
    pthread_mutex_lock(&e->mu);
    slot_t *s = e->free;
    if (s != NULL)
        e->free = s->next;
    pthread_mutex_unlock(&e->mu);
    return s != NULL ? s : slot_new(e);
}

static void slot_put(EngineObject *e, slot_t *s)
{
    pthread_mutex_lock(&e->mu);
    s->next = e->free;
    e->free = s;
    pthread_mutex_unlock(&e->mu);
}

/* The C entry point (also _fastpath's): 0, or -1 when libgcrypt fails or memory runs out. */
static int engine_crypt(PyObject *engine, const unsigned char *src, unsigned char *dst,
                        uint64_t first, size_t count, int encrypt)
{
    EngineObject *e = (EngineObject *)engine;
    slot_t *s = slot_get(e);
    if (s == NULL)
        return -1;
    int rc = engine_run(e, s, src, dst, first, count, encrypt);
    slot_put(e, s);
    return rc;
}

static const cryptfuse_engine_api ENGINE_API = {CRYPTFUSE_ENGINE_API_VERSION, engine_crypt};

/* -- Python type ------------------------------------------------------------------------ */

static int copy_keys(PyObject *list, int keycount, unsigned char **out, int *len,
                     const char *what)
{
    if (!PyList_Check(list) || PyList_GET_SIZE(list) != keycount) {
        PyErr_Format(PyExc_ValueError, "Engine: %s must be a list of %d keys", what, keycount);
        return -1;
    }
    for (int i = 0; i < keycount; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        if (!PyBytes_Check(item) || (i > 0 && PyBytes_GET_SIZE(item) != *len)
            || PyBytes_GET_SIZE(item) == 0 || PyBytes_GET_SIZE(item) > 64) {
            PyErr_Format(PyExc_ValueError, "Engine: invalid %s", what);
            return -1;
        }
        if (i == 0) {
            *len = (int)PyBytes_GET_SIZE(item);
            *out = malloc((size_t)keycount * (size_t)*len);
            if (*out == NULL) {
                PyErr_NoMemory();
                return -1;
            }
        }
        memcpy(*out + (size_t)i * *len, PyBytes_AS_STRING(item), (size_t)*len);
    }
    return 0;
}

static void Engine_dealloc(EngineObject *self)
{
    while (self->free != NULL) {
        slot_t *s = self->free;
        self->free = s->next;
        slot_free(self, s);
    }
    wipe_free(self->dkeys, (size_t)self->keycount * self->dklen);
    wipe_free(self->tkeys, (size_t)self->keycount * self->tklen);
    wipe_free(self->ekeys, (size_t)self->keycount * self->eklen);
    wipe_free(self->lrw_inc, (size_t)self->keycount * sizeof(*self->lrw_inc));
    wipe_free(self->lrw_k2, (size_t)self->keycount * sizeof(*self->lrw_k2));
    memset(self->lmk_seed, 0, sizeof(self->lmk_seed));
    memset(self->tcw_seed, 0, sizeof(self->tcw_seed));
    memset(self->tcw_white, 0, sizeof(self->tcw_white));
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"algo",        "chain",     "ivmode",   "keys",  "tweak_keys",
                             "essiv_keys",  "sector_size", "iv_offset", "iv_shift", "extra",
                             NULL};
    const char *algo_name;
    int chain, ivmode, sector_size, iv_shift;
    unsigned long long iv_offset;
    PyObject *keys, *tweak_keys, *essiv_keys;
    Py_buffer extra = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "siiOOOiKi|y*:Engine", kwlist, &algo_name,
                                     &chain, &ivmode, &keys, &tweak_keys, &essiv_keys,
                                     &sector_size, &iv_offset, &iv_shift, &extra))
        return NULL;
    EngineObject *self = NULL;
    int algo = gcry_cipher_map_name(algo_name);
    int bs = algo ? (int)gcry_cipher_get_algo_blklen(algo) : 0;
    if (algo == 0 || (bs != 8 && bs != 16)) {
        PyErr_Format(PyExc_ValueError, "Engine: libgcrypt has no block cipher %s", algo_name);
        goto out;
    }
    if (chain < CH_ECB || chain > CH_LRW || ivmode < IV_NULL || ivmode > IV_EBOIV
        || (sector_size != 512 && sector_size != 1024 && sector_size != 2048
            && sector_size != 4096)
        || iv_shift < 0 || iv_shift > 3 || ((chain == CH_XTS || chain == CH_LRW) && bs != 16)
        || ((chain == CH_ECB) != (ivmode == IV_NONE))
        || ((ivmode == IV_LMK || ivmode == IV_TCW) && sector_size != 512)
        || (ivmode == IV_EBOIV && chain != CH_CBC && chain != CH_CTR)) {
        PyErr_SetString(PyExc_ValueError, "Engine: invalid mode, IV mode or geometry");
        goto out;
    }
    self = (EngineObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        goto out;
    pthread_mutex_init(&self->mu, NULL);
    self->algo = algo;
    self->bs = bs;
    self->chain = chain;
    self->ivmode = ivmode;
    self->ss = (uint32_t)sector_size;
    self->spb = (uint32_t)sector_size / 512;
    self->shift = (uint32_t)iv_shift;
    self->iv_offset = iv_offset;
    self->keycount = PyList_Check(keys) ? (int)PyList_GET_SIZE(keys) : 0;
    if (self->keycount < 1 || (self->keycount & (self->keycount - 1))) {
        PyErr_SetString(PyExc_ValueError, "Engine: key count must be a power of two");
        goto fail;
    }
    if (copy_keys(keys, self->keycount, &self->dkeys, &self->dklen, "keys") < 0)
        goto fail;
    if (chain == CH_XTS
        && copy_keys(tweak_keys, self->keycount, &self->tkeys, &self->tklen, "tweak keys") < 0)
        goto fail;
    if (ivmode == IV_ESSIV
        && copy_keys(essiv_keys, self->keycount, &self->ekeys, &self->eklen, "ESSIV keys") < 0)
        goto fail;
    if (chain == CH_LRW) {
        unsigned char *k2 = NULL;
        int k2len = 0;
        if (copy_keys(tweak_keys, self->keycount, &k2, &k2len, "tweak keys") < 0)
            goto fail;
        self->lrw_k2 = calloc((size_t)self->keycount, sizeof(*self->lrw_k2));
        self->lrw_inc = calloc((size_t)self->keycount, sizeof(*self->lrw_inc));
        if (k2len != 16 || self->lrw_k2 == NULL || self->lrw_inc == NULL) {
            wipe_free(k2, (size_t)self->keycount * (size_t)k2len);
            PyErr_SetString(PyExc_ValueError, "Engine: LRW needs 16-byte tweak keys");
            goto fail;
        }
        for (int i = 0; i < self->keycount; i++) {
            self->lrw_k2[i][0] = be64(k2 + 16 * i);
            self->lrw_k2[i][1] = be64(k2 + 16 * i + 8);
            for (int m = 0; m < 128; m++) {
                uint64_t ones[2] = {m >= 64 ? (m == 127 ? UINT64_MAX : (2ULL << (m - 64)) - 1) : 0,
                                    m >= 63 ? UINT64_MAX : (2ULL << m) - 1};
                gf_mul_bbe(self->lrw_inc[i][m], self->lrw_k2[i], ones);
            }
        }
        wipe_free(k2, (size_t)self->keycount * 16);
    }
    if (ivmode == IV_LMK && extra.len > 0) {
        /* v3: the seed key's first 16 bytes (an MD5 digest's size), zero-padded to 64 */
        if (extra.len < 16) {
            PyErr_SetString(PyExc_ValueError, "Engine: LMK seed shorter than 16 bytes");
            goto fail;
        }
        self->has_seed = 1;
        memcpy(self->lmk_seed, extra.buf, 16);
    }
    if (ivmode == IV_TCW) {
        if (extra.len != bs + 16) {
            PyErr_SetString(PyExc_ValueError, "Engine: TCW needs an IV seed and 16 bytes of whitening");
            goto fail;
        }
        memcpy(self->tcw_seed, extra.buf, (size_t)bs);
        memcpy(self->tcw_white, (const char *)extra.buf + bs, 16);
    }
    /* one set of handles now: a key libgcrypt refuses fails here, not on the data path */
    slot_t *s = slot_new(self);
    if (s == NULL) {
        PyErr_SetString(PyExc_ValueError, "Engine: libgcrypt refused a key");
        goto fail;
    }
    slot_put(self, s);
    goto out;
fail:
    Py_CLEAR(self);
out:
    if (extra.obj != NULL)
        PyBuffer_Release(&extra);
    return (PyObject *)self;
}

static PyObject *Engine_crypt(EngineObject *self, PyObject *args)
{
    Py_buffer src, dst;
    unsigned long long first;
    int encrypt;
    if (!PyArg_ParseTuple(args, "y*w*Kp:crypt", &src, &dst, &first, &encrypt))
        return NULL;
    PyObject *result = NULL;
    if (src.len != dst.len || src.len % self->ss) {
        PyErr_SetString(PyExc_ValueError, "crypt: buffers must be whole sectors of equal length");
        goto out;
    }
    const unsigned char *a = src.buf;
    unsigned char *b = dst.buf;
    if (a != b && a < b + dst.len && b < a + src.len) {
        PyErr_SetString(PyExc_ValueError, "crypt: buffers overlap");
        goto out;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = engine_crypt((PyObject *)self, a, b, first, (size_t)(src.len / self->ss), encrypt);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_SetString(PyExc_RuntimeError, "libgcrypt failed");
        goto out;
    }
    result = Py_NewRef(Py_None);
out:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *Engine_get_c_api(EngineObject *self, void *closure)
{
    return PyCapsule_New((void *)&ENGINE_API, CRYPTFUSE_ENGINE_API_NAME, NULL);
}

static PyMethodDef Engine_methods[] = {
    {"crypt", (PyCFunction)Engine_crypt, METH_VARARGS,
     "crypt(src, dst, first_sector, encrypt): whole sectors from src into dst (GIL released)"},
    {NULL}};

static PyGetSetDef Engine_getset[] = {
    {"c_api", (getter)Engine_get_c_api, NULL, "capsule with the C entry point", NULL},
    {NULL}};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cryptfuse._gcrypt.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "dm-crypt sector encryption with a libgcrypt cipher",
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
    .tp_new = Engine_new,
};

/* -- hashes ----------------------------------------------------------------------------- */

static int md_algo(const char *name)
{
    int algo = gcry_md_map_name(name);
    if (algo == 0 || gcry_md_test_algo(algo)) {
        PyErr_Format(PyExc_ValueError, "libgcrypt has no hash %s", name);
        return 0;
    }
    return algo;
}

static PyObject *py_digest(PyObject *unused, PyObject *args)
{
    const char *name;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "sy*:digest", &name, &data))
        return NULL;
    PyObject *out = NULL;
    int algo = md_algo(name);
    if (algo) {
        out = PyBytes_FromStringAndSize(NULL, gcry_md_get_algo_dlen(algo));
        if (out != NULL)
            gcry_md_hash_buffer(algo, PyBytes_AS_STRING(out), data.buf, (size_t)data.len);
    }
    PyBuffer_Release(&data);
    return out;
}

static PyObject *py_digest_size(PyObject *unused, PyObject *args)
{
    const char *name;
    if (!PyArg_ParseTuple(args, "s:digest_size", &name))
        return NULL;
    int algo = md_algo(name);
    return algo ? PyLong_FromUnsignedLong(gcry_md_get_algo_dlen(algo)) : NULL;
}

static PyObject *py_pbkdf2(PyObject *unused, PyObject *args)
{
    const char *name;
    Py_buffer password, salt;
    unsigned long iterations;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "sy*y*kn:pbkdf2", &name, &password, &salt, &iterations, &length))
        return NULL;
    PyObject *out = NULL;
    int algo = md_algo(name);
    if (algo && (iterations < 1 || length < 1)) {
        PyErr_SetString(PyExc_ValueError, "pbkdf2: invalid iteration count or length");
        algo = 0;
    }
    if (algo && (out = PyBytes_FromStringAndSize(NULL, length)) != NULL) {
        gcry_error_t err;
        char *dst = PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS
        err = gcry_kdf_derive(password.buf, (size_t)password.len, GCRY_KDF_PBKDF2, algo,
                              salt.buf, (size_t)salt.len, iterations, (size_t)length, dst);
        Py_END_ALLOW_THREADS
        if (err) {
            Py_CLEAR(out);
            PyErr_Format(PyExc_ValueError, "pbkdf2: %s", gcry_strerror(err));
        }
    }
    PyBuffer_Release(&password);
    PyBuffer_Release(&salt);
    return out;
}

static PyObject *py_cipher_info(PyObject *unused, PyObject *args)
{
    /* (block size, accepts this key length) of a libgcrypt cipher name, or None */
    const char *name;
    Py_ssize_t keylen;
    if (!PyArg_ParseTuple(args, "sn:cipher_info", &name, &keylen))
        return NULL;
    int algo = gcry_cipher_map_name(name);
    if (algo == 0)
        Py_RETURN_NONE;
    size_t bs = gcry_cipher_get_algo_blklen(algo);
    int ok = 0;
    gcry_cipher_hd_t h;
    if (nettle_twofish192(algo, (int)keylen)) {
        ok = 1;
    } else if (keylen > 0 && keylen <= 64
               && !gcry_cipher_open(&h, algo, GCRY_CIPHER_MODE_CBC, 0)) {
        unsigned char key[64];
        /* a key libgcrypt would call weak (DES) is not what is asked: test a pattern */
        for (int i = 0; i < 64; i++)
            key[i] = (unsigned char)(0x5a + 37 * i);
        ok = gcry_cipher_setkey(h, key, (size_t)keylen) == 0;
        gcry_cipher_close(h);
    }
    return Py_BuildValue("(nO)", (Py_ssize_t)bs, ok ? Py_True : Py_False);
}

static PyObject *py_library_crypt(PyObject *unused, PyObject *args)
{
    /* libgcrypt's own mode over the whole buffer, one IV (the benchmark's yardstick) */
    const char *name, *mode_name;
    Py_buffer key, iv, src, dst;
    int encrypt;
    if (!PyArg_ParseTuple(args, "ssy*y*y*w*p:library_crypt", &name, &mode_name, &key, &iv, &src,
                          &dst, &encrypt))
        return NULL;
    PyObject *result = NULL;
    int algo = gcry_cipher_map_name(name);
    int mode = strcmp(mode_name, "xts") == 0   ? GCRY_CIPHER_MODE_XTS
               : strcmp(mode_name, "cbc") == 0 ? GCRY_CIPHER_MODE_CBC
               : strcmp(mode_name, "ecb") == 0 ? GCRY_CIPHER_MODE_ECB
               : strcmp(mode_name, "ctr") == 0 ? GCRY_CIPHER_MODE_CTR
                                               : 0;
    gcry_cipher_hd_t h = NULL;
    gcry_error_t err = 1;
    if (algo && mode && src.len == dst.len && !gcry_cipher_open(&h, algo, mode, 0)
        && !gcry_cipher_setkey(h, key.buf, (size_t)key.len)) {
        Py_BEGIN_ALLOW_THREADS
        err = mode == GCRY_CIPHER_MODE_ECB ? 0
              : mode == GCRY_CIPHER_MODE_CTR
                  ? gcry_cipher_setctr(h, iv.buf, (size_t)iv.len)
                  : gcry_cipher_setiv(h, iv.buf, (size_t)iv.len);
        if (!err)
            err = encrypt ? gcry_cipher_encrypt(h, dst.buf, (size_t)dst.len, src.buf, (size_t)src.len)
                          : gcry_cipher_decrypt(h, dst.buf, (size_t)dst.len, src.buf, (size_t)src.len);
        Py_END_ALLOW_THREADS
    }
    if (h != NULL)
        gcry_cipher_close(h);
    if (err)
        PyErr_SetString(PyExc_ValueError, "library_crypt: libgcrypt refused the parameters");
    else
        result = Py_NewRef(Py_None);
    PyBuffer_Release(&key);
    PyBuffer_Release(&iv);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *py_version(PyObject *unused, PyObject *noargs)
{
    return PyUnicode_FromString(gcry_check_version(NULL));
}

/* -- MD5's compression function (RFC 1321), for lmk's unpadded state ------------------- */

#define ROTL(x, c) (((x) << (c)) | ((x) >> (32 - (c))))
static void md5_compress(uint32_t st[4], const unsigned char block[64])
{
    static const uint32_t K[64] = {
        0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613,
        0xfd469501, 0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193,
        0xa679438e, 0x49b40821, 0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d,
        0x02441453, 0xd8a1e681, 0xe7d3fbc8, 0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed,
        0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a, 0xfffa3942, 0x8771f681, 0x6d9d6122,
        0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70, 0x289b7ec6, 0xeaa127fa,
        0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665, 0xf4292244,
        0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
        0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb,
        0xeb86d391};
    static const int R[16] = {7, 12, 17, 22, 5, 9, 14, 20, 4, 11, 16, 23, 6, 10, 15, 21};
    uint32_t m[16];
    for (int i = 0; i < 16; i++)
        m[i] = (uint32_t)block[4 * i] | (uint32_t)block[4 * i + 1] << 8
               | (uint32_t)block[4 * i + 2] << 16 | (uint32_t)block[4 * i + 3] << 24;
    uint32_t a = st[0], b = st[1], c = st[2], d = st[3];
    for (int i = 0; i < 64; i++) {
        uint32_t f;
        int g;
        if (i < 16) {
            f = (b & c) | (~b & d);
            g = i;
        } else if (i < 32) {
            f = (d & b) | (~d & c);
            g = (5 * i + 1) % 16;
        } else if (i < 48) {
            f = b ^ c ^ d;
            g = (3 * i + 5) % 16;
        } else {
            f = c ^ (b | ~d);
            g = (7 * i) % 16;
        }
        uint32_t tmp = d;
        d = c;
        c = b;
        uint32_t sum = a + f + K[i] + m[g];
        int r = R[(i / 16) * 4 + i % 4];
        b = b + ROTL(sum, r);
        a = tmp;
    }
    st[0] += a;
    st[1] += b;
    st[2] += c;
    st[3] += d;
}

static PyObject *py_md5_state(PyObject *unused, PyObject *args)
{
    /* MD5's state after whole 64-byte blocks, no padding (for tests of lmk) */
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*:md5_state", &data))
        return NULL;
    PyObject *out = NULL;
    if (data.len % 64) {
        PyErr_SetString(PyExc_ValueError, "md5_state: whole 64-byte blocks only");
    } else {
        uint32_t st[4] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476};
        for (Py_ssize_t i = 0; i < data.len; i += 64)
            md5_compress(st, (const unsigned char *)data.buf + i);
        unsigned char o[16];
        for (int w = 0; w < 4; w++)
            for (int b = 0; b < 4; b++)
                o[4 * w + b] = (unsigned char)(st[w] >> (8 * b));
        out = PyBytes_FromStringAndSize((const char *)o, 16);
    }
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef module_methods[] = {
    {"digest", py_digest, METH_VARARGS, "digest(name, data): libgcrypt hash of data"},
    {"digest_size", py_digest_size, METH_VARARGS, "digest_size(name): bytes"},
    {"pbkdf2", py_pbkdf2, METH_VARARGS,
     "pbkdf2(hash, password, salt, iterations, length) with libgcrypt (GIL released)"},
    {"cipher_info", py_cipher_info, METH_VARARGS,
     "cipher_info(name, key_len): (block size, key accepted) or None"},
    {"md5_state", py_md5_state, METH_VARARGS, "md5_state(data): unpadded MD5 state"},
    {"library_crypt", py_library_crypt, METH_VARARGS,
     "library_crypt(cipher, mode, key, iv, src, dst, encrypt): libgcrypt's own mode, one IV"},
    {"version", py_version, METH_NOARGS, "libgcrypt's version"},
    {NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "cryptfuse._gcrypt",
                                    "dm-crypt ciphers and hashes from libgcrypt", -1,
                                    module_methods};

PyMODINIT_FUNC PyInit__gcrypt(void)
{
    if (!gcry_check_version("1.8.0")) {
        PyErr_SetString(PyExc_ImportError, "libgcrypt >= 1.8 is required");
        return NULL;
    }
    if (!gcry_control(GCRYCTL_INITIALIZATION_FINISHED_P)) {
        /* no secure memory: keys live in ordinary memory, as in the rest of cryptfuse */
        gcry_control(GCRYCTL_DISABLE_SECMEM, 0);
        gcry_control(GCRYCTL_INITIALIZATION_FINISHED, 0);
    }
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
