/* Screening of the handshake socket's recvmmsg batch in one call: header, size, mac1, per-source limiter.
 *
 * The handshake worker (turbowg/daemon/handshake_worker.py) reads the steered handshake socket with
 * recvmmsg into HandshakeReader's preallocated buffers (turbowg/conn/recvmmsg.py). Under a flood almost
 * every message is dropped: in Python each one cost ~8 us (a bytes copy, a tuple, a keyed BLAKE2s, a
 * token-bucket lookup), here well under 1 us, and no Python object is made for a dropped message.
 *
 * Screener(mac1_key, rate, burst, max_entries, gc_interval_ns).screen(headers, data, names, controls, n,
 * slot_bytes, cmsg_space, now_ns, under_load) walks the first n struct mmsghdr of `headers` (the array the
 * kernel filled), splits UDP_GRO reads by segment size, and per message decides as recvmmsg.screen_py does
 * (the pure-Python twin, tested against this on random batches):
 *   first word not a handshake header -> counted "other"; wrong size for its type -> "bad size";
 *   cookie reply (type 3) of the right size -> kept, FORWARD;
 *   initiation/response: mac1 = BLAKE2s-128 keyed with mac1_key over the message up to mac1 must match,
 *   else "bad mac1"; not under load -> kept, ACCEPT; under load with a non-zero mac2 -> kept, MAC2 (the
 *   caller checks mac2: it holds the cookie secret, and only a sender that got our cookie gets there); under load with an all-zero mac2 -> the per-source
 *   token bucket for cookie replies (as turbowg/ratelimiter RateLimiter: 20/s, burst 5 per IPv4 address /
 *   IPv6 /64, bounded, oldest evicted, idle ones collected every gc interval) -> kept, COOKIE, or counted
 *   "cookie rate limited".
 * Returns (kept, counters): kept = [(verdict, kind, source address bytes (4 or 16), port, message)],
 * counters = (other, bad_size, cookie_bad_size, bad_mac1, cookie_ratelimited, truncated, messages).
 * Screener.allow(address, now_ns) is the same bucket check for the caller (a mac2 that failed its check).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/udp.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

enum { V_ACCEPT = 1, V_COOKIE = 2, V_FORWARD = 3, V_MAC2 = 4 };
enum { INITIATION_SIZE = 148, RESPONSE_SIZE = 92, COOKIE_REPLY_SIZE = 64, MAC_SIZE = 16 };

/* ---------------------------------------------------------------- BLAKE2s (RFC 7693), keyed, 16-byte out */

static const uint32_t B2S_IV[8] = {0x6A09E667UL, 0xBB67AE85UL, 0x3C6EF372UL, 0xA54FF53AUL,
                                   0x510E527FUL, 0x9B05688CUL, 0x1F83D9ABUL, 0x5BE0CD19UL};
static const uint8_t B2S_SIGMA[10][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0}};

static inline uint32_t rotr32(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
static inline uint32_t load32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

#define B2S_G(a, b, c, d, x, y)            \
    do {                                   \
        v[a] = v[a] + v[b] + (x);          \
        v[d] = rotr32(v[d] ^ v[a], 16);    \
        v[c] = v[c] + v[d];                \
        v[b] = rotr32(v[b] ^ v[c], 12);    \
        v[a] = v[a] + v[b] + (y);          \
        v[d] = rotr32(v[d] ^ v[a], 8);     \
        v[c] = v[c] + v[d];                \
        v[b] = rotr32(v[b] ^ v[c], 7);     \
    } while (0)

static void b2s_compress(uint32_t h[8], const uint8_t block[64], uint64_t t, int last) {
    uint32_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load32(block + 4 * i);
    for (int i = 0; i < 8; i++) { v[i] = h[i]; v[i + 8] = B2S_IV[i]; }
    v[12] ^= (uint32_t)t;
    v[13] ^= (uint32_t)(t >> 32);
    if (last) v[14] = ~v[14];
    for (int r = 0; r < 10; r++) {
        const uint8_t *s = B2S_SIGMA[r];
        B2S_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        B2S_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        B2S_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        B2S_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        B2S_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        B2S_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        B2S_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        B2S_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* The state after the key block of BLAKE2s-128 keyed with a 32-byte key (the same for every message). */
static void b2s_keyed_prefix(uint32_t h[8], const uint8_t key[32]) {
    uint8_t block[64] = {0};
    for (int i = 0; i < 8; i++) h[i] = B2S_IV[i];
    h[0] ^= 0x01010000UL ^ (32UL << 8) ^ MAC_SIZE;
    memcpy(block, key, 32);
    b2s_compress(h, block, 64, 0);
}

/* BLAKE2s-128(key; data[0:len]) from the keyed prefix state; len >= 1. */
static void b2s_mac(const uint32_t prefix[8], const uint8_t *data, size_t len, uint8_t out[MAC_SIZE]) {
    uint32_t h[8];
    uint8_t block[64];
    uint64_t t = 64;
    memcpy(h, prefix, sizeof(h));
    while (len > 64) {
        t += 64;
        b2s_compress(h, data, t, 0);
        data += 64;
        len -= 64;
    }
    memset(block, 0, 64);
    memcpy(block, data, len);
    t += len;
    b2s_compress(h, block, t, 1);
    for (int i = 0; i < 4; i++) {
        out[4 * i] = (uint8_t)h[i];
        out[4 * i + 1] = (uint8_t)(h[i] >> 8);
        out[4 * i + 2] = (uint8_t)(h[i] >> 16);
        out[4 * i + 3] = (uint8_t)(h[i] >> 24);
    }
}

/* ---------------------------------------------------------------- token buckets (ratelimiter.RateLimiter) */

typedef struct Bucket {
    uint8_t key[8];
    uint8_t klen;
    int64_t tokens, last;
    struct Bucket *hnext;        /* hash chain */
    struct Bucket *oprev, *onext; /* creation order (the Python dict's order) */
} Bucket;

typedef struct {
    PyObject_HEAD
    uint32_t prefix[8];
    int64_t packet_cost, max_tokens, gc_interval;
    int64_t last_gc;
    int has_gc;
    Py_ssize_t max_entries, count;
    size_t mask;
    Bucket **heads;
    Bucket *ohead, *otail;
    Bucket *free_list;
} Screener;

static size_t bucket_hash(const uint8_t *key, int klen) {
    uint64_t x = (uint64_t)klen;
    for (int i = 0; i < klen; i++) x = (x << 8) | key[i];
    x ^= (uint64_t)klen << 56;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return (size_t)x;
}

static void bucket_remove(Screener *s, Bucket *b) {
    size_t slot = bucket_hash(b->key, b->klen) & s->mask;
    Bucket **p = &s->heads[slot];
    while (*p != NULL && *p != b) p = &(*p)->hnext;
    if (*p == b) *p = b->hnext;
    if (b->oprev) b->oprev->onext = b->onext; else s->ohead = b->onext;
    if (b->onext) b->onext->oprev = b->oprev; else s->otail = b->oprev;
    b->hnext = s->free_list;
    s->free_list = b;
    s->count--;
}

static void collect(Screener *s, int64_t now) {
    s->last_gc = now;
    Bucket *b = s->ohead;
    while (b != NULL) {
        Bucket *next = b->onext;
        if (now - b->last > s->gc_interval) bucket_remove(s, b);
        b = next;
    }
}

/* RateLimiter.allow: key is 4 bytes (IPv4, v4-mapped already folded) or 16 (IPv6: its /64). */
static int limiter_allow(Screener *s, const uint8_t *addr, int alen, int64_t now) {
    uint8_t key[8];
    int klen;
    if (!s->has_gc) {
        s->has_gc = 1;
        s->last_gc = now;
    } else if (now - s->last_gc >= s->gc_interval) {
        collect(s, now);
    }
    if (alen == 16 && memcmp(addr, "\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0) {
        addr += 12;
        alen = 4;
    }
    klen = alen == 4 ? 4 : 8;
    memcpy(key, addr, klen);
    size_t slot = bucket_hash(key, klen) & s->mask;
    for (Bucket *b = s->heads[slot]; b != NULL; b = b->hnext) {
        if (b->klen == klen && memcmp(b->key, key, klen) == 0) {
            int64_t tokens = b->tokens + now - b->last;
            b->last = now;
            if (tokens > s->max_tokens) tokens = s->max_tokens;
            if (tokens > s->packet_cost) {
                b->tokens = tokens - s->packet_cost;
                return 1;
            }
            b->tokens = tokens;
            return 0;
        }
    }
    if (s->count >= s->max_entries && s->ohead != NULL) bucket_remove(s, s->ohead);
    Bucket *b = s->free_list;
    if (b != NULL) {
        s->free_list = b->hnext;
    } else {
        b = PyMem_Malloc(sizeof(Bucket));
        if (b == NULL) return 0; /* out of memory: refuse (no reply) rather than fail the batch */
    }
    memcpy(b->key, key, klen);
    b->klen = (uint8_t)klen;
    b->tokens = s->max_tokens - s->packet_cost;
    b->last = now;
    slot = bucket_hash(key, klen) & s->mask;
    b->hnext = s->heads[slot];
    s->heads[slot] = b;
    b->onext = NULL;
    b->oprev = s->otail;
    if (s->otail) s->otail->onext = b; else s->ohead = b;
    s->otail = b;
    s->count++;
    return 1;
}

/* ---------------------------------------------------------------- the type */

static int Screener_init(Screener *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"mac1_key", "packets_per_second", "burst", "max_entries", "gc_interval_ns", NULL};
    Py_buffer key;
    double pps = 20.0;
    long long burst = 5, gc_interval = 1000000000LL;
    Py_ssize_t max_entries = 1 << 16;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|dLnL", kwlist, &key, &pps, &burst, &max_entries,
                                     &gc_interval))
        return -1;
    if (key.len != 32 || pps <= 0 || burst < 1 || max_entries < 1) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "mac1_key must be 32 bytes; rate, burst and max_entries positive");
        return -1;
    }
    b2s_keyed_prefix(self->prefix, key.buf);
    PyBuffer_Release(&key);
    self->packet_cost = (int64_t)(1000000000.0 / pps); /* int(_NS / packets_per_second), as Python */
    self->max_tokens = self->packet_cost * burst;
    self->gc_interval = gc_interval;
    self->max_entries = max_entries;
    if (self->heads == NULL) {
        size_t n = 1024;
        while (n < (size_t)max_entries && n < (1u << 20)) n <<= 1;
        self->heads = PyMem_Calloc(n, sizeof(Bucket *));
        if (self->heads == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->mask = n - 1;
    }
    return 0;
}

static void Screener_dealloc(Screener *self) {
    while (self->ohead != NULL) bucket_remove(self, self->ohead);
    Bucket *b = self->free_list;
    while (b != NULL) {
        Bucket *next = b->hnext;
        PyMem_Free(b);
        b = next;
    }
    PyMem_Free(self->heads);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Screener_allow(Screener *self, PyObject *args) {
    Py_buffer addr;
    long long now;
    if (!PyArg_ParseTuple(args, "y*L", &addr, &now)) return NULL;
    if (addr.len != 4 && addr.len != 16) {
        PyBuffer_Release(&addr);
        PyErr_SetString(PyExc_ValueError, "address must be 4 or 16 bytes");
        return NULL;
    }
    int ok = limiter_allow(self, addr.buf, (int)addr.len, now);
    PyBuffer_Release(&addr);
    return PyBool_FromLong(ok);
}

static PyObject *Screener_len(Screener *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSsize_t(self->count);
}

static int keep(PyObject *kept, int verdict, int kind, const uint8_t *addr, int alen, int port,
                const uint8_t *msg, Py_ssize_t len) {
    PyObject *t = Py_BuildValue("(iiy#iy#)", verdict, kind, (const char *)addr, (Py_ssize_t)alen, port,
                                (const char *)msg, len);
    if (t == NULL) return -1;
    int rc = PyList_Append(kept, t);
    Py_DECREF(t);
    return rc;
}

static PyObject *Screener_screen(Screener *self, PyObject *args) {
    Py_buffer headers, data, names, controls;
    Py_ssize_t n, slot_bytes, cmsg_space;
    long long now;
    int under_load;
    if (!PyArg_ParseTuple(args, "y*y*y*y*nnnLp", &headers, &data, &names, &controls, &n, &slot_bytes,
                          &cmsg_space, &now, &under_load))
        return NULL;
    PyObject *kept = NULL, *result = NULL;
    long long other = 0, bad_size = 0, cookie_bad_size = 0, bad_mac1 = 0, limited = 0, truncated = 0, messages = 0;
    if (n < 0 || headers.len < n * (Py_ssize_t)sizeof(struct mmsghdr) || data.len < n * slot_bytes ||
        names.len < n * (Py_ssize_t)sizeof(struct sockaddr_in6) || controls.len < n * cmsg_space ||
        cmsg_space < (Py_ssize_t)CMSG_SPACE(sizeof(int)) || slot_bytes <= 0) {
        PyErr_SetString(PyExc_ValueError, "buffers too small for n slots");
        goto done;
    }
    kept = PyList_New(0);
    if (kept == NULL) goto done;
    const struct mmsghdr *hdrs = headers.buf;
    const uint8_t *base = data.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        const struct mmsghdr *h = &hdrs[i];
        Py_ssize_t size = h->msg_len;
        if (size > slot_bytes) size = slot_bytes;
        const uint8_t *name = (const uint8_t *)names.buf + i * sizeof(struct sockaddr_in6);
        const uint8_t *raw = name + 8; /* sin6_addr */
        const uint8_t *addr = raw;
        int alen = 16;
        if (memcmp(raw, "\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0) {
            addr = raw + 12;
            alen = 4;
        }
        int port = (name[2] << 8) | name[3];
        Py_ssize_t stride = size;
        if (h->msg_hdr.msg_controllen) {
            const struct cmsghdr *c = (const struct cmsghdr *)((const uint8_t *)controls.buf + i * cmsg_space);
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO) {
                uint16_t seg;
                memcpy(&seg, CMSG_DATA(c), sizeof(seg));
                if (seg > 0 && seg < size) stride = seg;
            }
        }
        if (h->msg_hdr.msg_flags & MSG_TRUNC) truncated++;
        const uint8_t *slot = base + i * slot_bytes;
        for (Py_ssize_t pos = 0; pos < size; pos += stride) {
            Py_ssize_t len = pos + stride < size ? stride : size - pos;
            const uint8_t *msg = slot + pos;
            int kind = (len >= 4 && msg[1] == 0 && msg[2] == 0 && msg[3] == 0) ? msg[0] : 0;
            if (len < 1 || kind < 1 || kind > 3) {
                other++;
                continue;
            }
            messages++;
            Py_ssize_t want = kind == 1 ? INITIATION_SIZE : kind == 2 ? RESPONSE_SIZE : COOKIE_REPLY_SIZE;
            if (len != want) {
                if (kind == 3) cookie_bad_size++; else bad_size++;
                continue;
            }
            if (kind == 3) {
                if (keep(kept, V_FORWARD, kind, addr, alen, port, msg, len) < 0) goto done;
                continue;
            }
            uint8_t mac1[MAC_SIZE];
            b2s_mac(self->prefix, msg, (size_t)(len - 2 * MAC_SIZE), mac1);
            uint8_t diff = 0;
            for (int j = 0; j < MAC_SIZE; j++) diff |= mac1[j] ^ msg[len - 2 * MAC_SIZE + j];
            if (diff) {
                bad_mac1++;
                continue;
            }
            int verdict = V_ACCEPT;
            if (under_load) {
                uint8_t any = 0;
                verdict = V_MAC2;
                for (int j = 0; j < MAC_SIZE; j++) any |= msg[len - MAC_SIZE + j];
                if (!any) {
                    if (!limiter_allow(self, addr, alen, now)) {
                        limited++;
                        continue;
                    }
                    verdict = V_COOKIE;
                }
            }
            if (keep(kept, verdict, kind, addr, alen, port, msg, len) < 0) goto done;
        }
    }
    result = Py_BuildValue("(O(LLLLLLL))", kept, other, bad_size, cookie_bad_size, bad_mac1, limited, truncated,
                           messages);
done:
    Py_XDECREF(kept);
    PyBuffer_Release(&headers);
    PyBuffer_Release(&data);
    PyBuffer_Release(&names);
    PyBuffer_Release(&controls);
    return result;
}

static PyObject *mac1_fn(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer key, data;
    if (!PyArg_ParseTuple(args, "y*y*", &key, &data)) return NULL;
    PyObject *out = NULL;
    if (key.len != 32 || data.len < 1) {
        PyErr_SetString(PyExc_ValueError, "key must be 32 bytes and data not empty");
    } else {
        uint32_t prefix[8];
        uint8_t mac[MAC_SIZE];
        b2s_keyed_prefix(prefix, key.buf);
        b2s_mac(prefix, data.buf, (size_t)data.len, mac);
        out = PyBytes_FromStringAndSize((const char *)mac, MAC_SIZE);
    }
    PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef Screener_methods[] = {
    {"screen", (PyCFunction)Screener_screen, METH_VARARGS, "Screen n recvmmsg slots; (kept, counters)."},
    {"allow", (PyCFunction)Screener_allow, METH_VARARGS, "One cookie reply to address at now_ns: allowed?"},
    {"buckets", (PyCFunction)Screener_len, METH_NOARGS, "Number of token buckets held."},
    {NULL, NULL, 0, NULL}};

static PyTypeObject ScreenerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "turbowg.conn._hsscreen.Screener",
    .tp_basicsize = sizeof(Screener),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Screener_init,
    .tp_dealloc = (destructor)Screener_dealloc,
    .tp_methods = Screener_methods,
    .tp_doc = "mac1 + per-source cookie-reply limiter over a recvmmsg batch (see the module source).",
};

static PyMethodDef module_methods[] = {
    {"mac1", mac1_fn, METH_VARARGS, "BLAKE2s-128 keyed with a 32-byte key (for tests)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_hsscreen", NULL, -1, module_methods};

PyMODINIT_FUNC PyInit__hsscreen(void) {
    if (PyType_Ready(&ScreenerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) return NULL;
    Py_INCREF(&ScreenerType);
    if (PyModule_AddObject(m, "Screener", (PyObject *)&ScreenerType) < 0) {
        Py_DECREF(&ScreenerType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "SIZEOF_MMSGHDR", (long)sizeof(struct mmsghdr));
    return m;
}
