/* The relay's forwarding plane in C: one epoll loop per worker that owns authenticated DERP client sockets.
 *
 * Python (relay/fastpath.py) hands a client over once its ClientInfo/ServerInfo handshake is done: the fd,
 * the client's key and the bytes already read after the handshake. From then on this loop reads many
 * frames per recv() into one shared buffer, parses them in place, and for each SendPacket whose destination
 * key is routed here (a 32-byte-key hash table it owns, filled by Python's route()/unroute()) appends a
 * RecvPacket frame (src key + packet) to the destination's output buffer. Each dirty destination is written
 * once per loop turn with a single send(). Everything else -- control frames, SendPacket to keys it does
 * not hold, connection events -- is handed up to Python as a batch of (conn id, kind, bytes) per poll().
 *
 * Backpressure, not loss: a destination with more than `bound` bytes queued stops the senders feeding it
 * (their fds leave EPOLLIN; the unparsed rest of their input is kept) until it drains below bound/2. Only a
 * destination with no write progress for `write_timeout` seconds loses packets: its queued RecvPacket frames
 * are dropped head first (counted as queue_head), its senders resume, and Python hears EV_WRITE_TIMEOUT.
 *
 * Our outgoing link to a mesh peer relay (set_mesh_out) is a destination like a client whose frames are
 * ForwardPacket(src, dst, packet) instead of RecvPacket: the keys the peer announced route to it, and the same
 * bound, sender pauses, write timeout and head drops apply. It is never a second hop (a ForwardPacket from
 * another mesh peer for such a key goes up to Python), and all it reads goes up.
 *
 * TLS terminated by the relay (add(tls=...)): the conn keeps the SSL* of the Python ssl object that did the
 * handshake, with a BIO of this module in place of Python's memory BIOs. Ciphertext is recv()d into the conn's
 * tls->in, SSL_read decrypts records into the same read buffer the plain path uses, and the same parser runs;
 * queued frames (plaintext, so backpressure and head drops work on frames) are encrypted TLS_BATCH at a time
 * by one SSL_write into tls->out and sent with one send() per turn. OpenSSL is called through pointers
 * resolved at run time from the libssl Python's _ssl module loaded (no build dependency on its headers).
 *
 * Single-threaded by design: every method must be called from the thread that owns the asyncio loop.
 * poll() releases the GIL around its system calls and parsing (it touches no Python object meanwhile).
 *
 * Why one file (~1750 lines): one CPython extension module; the parser, the route table, the output buffers,
 * the TLS record layer calls and the backpressure links between senders and destinations all act on the
 * same conn_t array inside one poll() turn, and a split would only export these internals across objects.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define KEY 32
#define HDR 5
#define MAX_PACKET (64 << 10)
#define MAX_FRAME (2 * KEY + MAX_PACKET) /* ForwardPacket, the largest frame accepted after the handshake */
#define MAX_EVENTS 512

#define T_SEND 0x04
#define T_RECV 0x05
#define T_NOTE_PREFERRED 0x07
#define T_FORWARD 0x0A
#define T_WATCH 0x10
#define T_CLOSE_PEER 0x11
#define T_PING 0x12

/* kinds of poll() events that are not frames (frames carry their type, 0..255) */
#define EV_CLOSED 256        /* peer closed / read error; bytes: reason */
#define EV_PROTOCOL 257      /* frame over its length limit; bytes: message */
#define EV_WRITE_TIMEOUT 258 /* no write progress for write_timeout: queued packets dropped */
#define EV_DELIVERY 259      /* first packet from a sender to this conn; bytes: sender key */
#define EV_ACTIVE 260        /* a conn flagged notify_active sent something */
#define EV_RECORDS 261       /* records from a sibling channel the loop does not handle; bytes: whole records */

/* Records on a channel to a sibling shard (shards/records.py): 4-byte big-endian body length, 1-byte type. */
#define REC_PACKET 1 /* src key | dst key | packet */
#define REC_PRESENT 2
#define REC_GONE 3
#define REC_XOFF 4   /* key: the receiving shard's queue for key is over bound; stop sending to it */
#define REC_XON 5    /* key: it drained below bound/2 */
#define MAX_CHANNELS 64 /* channel bits in a client's xoff_mask */
#define CHAN_CAP 4   /* a client's queue fed by channels drops head past CHAN_CAP*bound (XOFF in flight) */

enum { K_CLIENT, K_CHAN };

enum { R_QUEUE_HEAD, R_WRITE_ERROR, R_GONE, NREASONS };
static const char *reason_names[NREASONS] = {"queue_head", "write_error", "gone_disconnected"};

static const uint8_t DISCO_MAGIC[6] = {'T', 'S', 0xf0, 0x9f, 0x92, 0xac};
#define DISCO_MIN (6 + KEY + 24)

/* A TLS conn's ciphertext: received and not yet taken by OpenSSL (in), and written by OpenSSL and not yet sent
 * (out). The SSL's BIO (one custom BIO for both directions, see tls_bio_*) reads and writes these directly
 * (and, during a read, the loop's shared cbuf the socket was read into), so ciphertext is copied once
 * between the socket and OpenSSL each way, and an idle conn holds no buffer. Owned by that BIO: freed when the
 * SSL frees it (the SSL lives as long as the Python object holding it). */
typedef struct {
    uint8_t *in; size_t in_len, in_cap;       /* ciphertext OpenSSL has not taken yet (a partial record, usually) */
    const uint8_t *rd; size_t rd_len, rd_off; /* what the BIO reads: `in`, or the loop's cbuf during a read */
    uint8_t *out; size_t out_len, out_off, out_cap;
} tls_t;

typedef struct {
    int fd;            /* -1: free slot */
    int kind;          /* K_CLIENT: a DERP client; K_CHAN: the channel to a sibling shard (records, not frames) */
    int chan_bit;      /* K_CHAN: its bit in the clients' xoff_mask, -1 if none */
    uint64_t xoff_mask; /* K_CLIENT: channels told XOFF for this client's key (XON is owed when it drains) */
    int blocked_x;     /* the sender waits in blocked_on's xwaiters (an XOFF'd key), not its waiters */
    int *xwaiters; int nxwaiters, cxwaiters; /* K_CHAN: senders waiting for an XON */
    unsigned long long rec_out, rec_in; /* K_CHAN: PACKET records queued by C senders / delivered in C */
    int mesh;          /* a mesh peer relay (set_mesh): its ForwardPacket frames are delivered here in C */
    int mesh_out;      /* our DERP client link to a mesh peer relay (set_mesh_out): keys routed here get
                        * ForwardPacket(src, dst, packet) frames; frames the peer sends all go up to Python */
    double wtimeout;   /* this conn's write timeout if > 0 (mesh peers get longer), else the loop's */
    uint32_t gen;      /* bumped on reuse: ids are gen<<32 | slot */
    uint32_t uid;      /* unique per add(), for the delivery sets */
    uint8_t key[KEY];
    uint32_t mask;     /* current epoll interest */
    int dead;          /* closed or errored: no more I/O, waiting for remove() */
    int reading;       /* Python wants reads (set_reading) */
    int blocked_on;    /* slot of the destination this sender waits for, -1 */
    int notify_active;
    unsigned long long active_poll; /* poll number of the last EV_ACTIVE */
    int dirty, in_reparse, in_outwait, want_out;
    int stalled;
    uint8_t *in; size_t in_len, in_cap;
    uint8_t *out; size_t out_len, out_off, out_head, out_cap;
    double last_progress;
    double queued_at; /* when the oldest unsent output was queued (approximately: see write_out) */
    int *waiters; int nwaiters, cwaiters;
    uint32_t *seen; uint32_t seen_cap, seen_n;
    /* TLS terminated here (add(tls=...)): the SSL* of the Python _ssl socket object `sslref` (held until
     * free_conn) and the ciphertext buffers its BIO reads from and writes to. `out` keeps plaintext frames:
     * backpressure, head drops and the queue clock work on frames as for plain conns. */
    void *ssl;
    tls_t *tls;
    PyObject *sslref;
    int tls_more; /* decryption stopped on a full buffer: records may wait in tls->in */
} conn_t;

/* state 0 empty 1 used 2 tomb; uid: fresh whenever the entry points somewhere new (a key announced by a sibling
 * is a delivery source without a conn: its uid stands in for the conn's in the delivery sets); xoff: the
 * sibling said XOFF for this key (only for entries that point at a channel) */
typedef struct { uint8_t key[KEY]; int32_t slot; uint32_t uid; uint8_t state, xoff; } route_t;

typedef struct { uint64_t id; int kind; size_t off, len; } event_t;

typedef struct {
    PyObject_HEAD
    int epfd, evfd;
    int busy;
    size_t bound, read_chunk;
    double write_timeout;
    uint64_t seed;
    conn_t *conns; int nconns, cconns;
    int *free_slots; int nfree, cfree;
    uint32_t next_uid;
    route_t *routes; size_t rcap, rused, rtomb;
    int *dirty; int ndirty, cdirty;
    int *reparse; int nreparse, creparse;
    int *outwait; int noutwait, coutwait;
    uint8_t *rbuf; size_t rbuf_cap;
    uint8_t *cbuf; size_t cbuf_cap; /* TLS: one conn's ciphertext (kept + recv()d) while it is decrypted */
    uint8_t *obuf; size_t obuf_cap; /* TLS: one conn's ciphertext while it is encrypted and sent */
    event_t *ev; size_t nev, cev;
    uint8_t *arena; size_t arena_len, arena_cap;
    int oom;
    double now;
    /* counters (cumulative) */
    unsigned long long packets_received, bytes_received, packets_received_disco, packets_sent, bytes_sent;
    unsigned long long dropped[NREASONS][2], dropped_bytes[NREASONS][2];
    unsigned long long sender_pauses, reads, writes, frames_up, polls, write_timeouts;
    unsigned long long forwarded_out, forwarded_in, xoffs_sent, xoff_pauses;
    unsigned long long mesh_out; /* ForwardPacket frames queued in C on mesh-out links (part of forwarded_out) */
    unsigned long long tls_records_in, tls_bytes_in, tls_bytes_out; /* TLS: SSL_read calls, ciphertext read / sent */
    int chan_slot[MAX_CHANNELS]; /* channel bit -> slot, -1 */
    double avg_queue_ms; /* derper's average_queue_duration_ms: EWMA, alpha 0.1 per packet written */
} Loop;

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline void put_hdr(uint8_t *p, uint8_t t, uint32_t n) {
    p[0] = t; p[1] = n >> 24; p[2] = n >> 16; p[3] = n >> 8; p[4] = n;
}

static inline int is_disco(const uint8_t *pkt, size_t n) {
    return n >= DISCO_MIN && memcmp(pkt, DISCO_MAGIC, 6) == 0;
}

static uint32_t frame_limit(uint8_t t) {
    switch (t) {
    case T_SEND: return KEY + MAX_PACKET;
    case T_FORWARD: return 2 * KEY + MAX_PACKET;
    case T_NOTE_PREFERRED: return 1;
    case T_WATCH: return 0;
    case T_CLOSE_PEER: return KEY;
    case T_PING: return 1000;
    default: return MAX_PACKET + KEY;
    }
}

static int grow(void **p, int *cap, int need, size_t elem) {
    if (need <= *cap) return 0;
    int n = *cap ? *cap : 16;
    while (n < need) n *= 2;
    void *q = realloc(*p, (size_t)n * elem);
    if (!q) return -1;
    *p = q; *cap = n;
    return 0;
}

static int reserve(uint8_t **buf, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    size_t n = *cap ? *cap : 4096;
    while (n < need) n *= 2;
    uint8_t *q = realloc(*buf, n);
    if (!q) return -1;
    *buf = q; *cap = n;
    return 0;
}

/* ---- OpenSSL, resolved at run time from the libssl that Python's _ssl module uses ------------------------
 *
 * A TLS conn keeps the SSL* of the Python ssl object asyncio/uvloop did the handshake with, so the session,
 * its keys and the records it has buffered carry over unchanged; at the handover its memory BIOs give way to
 * a BIO of this module on the conn's own buffers (tls_attach).
 * libssl already loaded by _ssl (dlopen of _ssl's own file with RTLD_NOLOAD: dlsym then searches its
 * dependencies), so building this module needs no OpenSSL headers and calls the very library that made the
 * SSL*. Opaque pointers only; the few constants are OpenSSL's stable ABI values. */

#define TLS_ERROR_WANT_READ 2
#define TLS_ERROR_WANT_WRITE 3
#define TLS_ERROR_ZERO_RETURN 6
#define TLS_BATCH (256u << 10) /* plaintext encrypted per send (OpenSSL cuts it into 16 KiB records) */

static struct {
    int state; /* 0 not tried, 1 resolved, -1 unavailable */
    int (*read)(void *, void *, int);
    int (*write)(void *, const void *, int);
    int (*get_error)(const void *, int);
    int (*has_pending)(const void *);
    void *(*get_rbio)(const void *);
    void *(*get_wbio)(const void *);
    void *(*get_ctx)(const void *);
    int (*shutdown)(void *);
    int (*bio_write)(void *, const void *, int);
    int (*bio_read)(void *, void *, int);
    size_t (*bio_ctrl_pending)(void *);
    void (*err_clear)(void);
    void (*set_bio)(void *, void *, void *);
    int (*bio_get_new_index)(void);
    void *(*bio_meth_new)(int, const char *);
    int (*bio_meth_set_write)(void *, int (*)(void *, const char *, int));
    int (*bio_meth_set_read)(void *, int (*)(void *, char *, int));
    int (*bio_meth_set_ctrl)(void *, long (*)(void *, int, long, void *));
    int (*bio_meth_set_destroy)(void *, int (*)(void *));
    void *(*bio_new)(const void *);
    void (*bio_set_data)(void *, void *);
    void *(*bio_get_data)(void *);
    void (*bio_set_init)(void *, int);
    void (*bio_set_flags)(void *, int);
    void (*bio_clear_flags)(void *, int);
    int (*bio_free)(void *);
    void *method; /* the BIO_METHOD of tls_t BIOs */
    PyObject *ctx_type, *sock_type; /* _ssl._SSLContext, _ssl._SSLSocket */
} ossl;

/* ABI constants of OpenSSL's bio.h (stable since 1.1) */
#define TLS_BIO_TYPE_SOURCE_SINK 0x0400
#define TLS_BIO_FLAGS_READ 0x01
#define TLS_BIO_FLAGS_RWS 0x07
#define TLS_BIO_FLAGS_SHOULD_RETRY 0x08
#define TLS_BIO_CTRL_PENDING 10
#define TLS_BIO_CTRL_FLUSH 11
#define TLS_BIO_CTRL_WPENDING 13

static int tls_bio_read(void *b, char *buf, int len) {
    tls_t *t = ossl.bio_get_data(b);
    ossl.bio_clear_flags(b, TLS_BIO_FLAGS_RWS | TLS_BIO_FLAGS_SHOULD_RETRY);
    size_t have = t ? t->rd_len - t->rd_off : 0;
    if (!have || len <= 0) { /* nothing more for now: OpenSSL says WANT_READ */
        ossl.bio_set_flags(b, TLS_BIO_FLAGS_READ | TLS_BIO_FLAGS_SHOULD_RETRY);
        return -1;
    }
    size_t n = have < (size_t)len ? have : (size_t)len;
    memcpy(buf, t->rd + t->rd_off, n);
    t->rd_off += n;
    return (int)n;
}

static int tls_bio_write(void *b, const char *buf, int len) {
    tls_t *t = ossl.bio_get_data(b);
    ossl.bio_clear_flags(b, TLS_BIO_FLAGS_RWS | TLS_BIO_FLAGS_SHOULD_RETRY);
    if (!t || len < 0) return -1;
    if (t->out_off == t->out_len) t->out_off = t->out_len = 0;
    if (reserve(&t->out, &t->out_cap, t->out_len + len) < 0) return -1; /* an error, not a retry */
    memcpy(t->out + t->out_len, buf, len);
    t->out_len += len;
    return len;
}

static long tls_bio_ctrl(void *b, int cmd, long num, void *ptr) {
    tls_t *t = ossl.bio_get_data(b);
    (void)num; (void)ptr;
    switch (cmd) {
    case TLS_BIO_CTRL_FLUSH: return 1; /* the loop sends out itself, once per turn */
    case TLS_BIO_CTRL_PENDING: return t ? (long)(t->rd_len - t->rd_off) : 0;
    case TLS_BIO_CTRL_WPENDING: return t ? (long)(t->out_len - t->out_off) : 0;
    default: return 0;
    }
}

static int tls_bio_destroy(void *b) {
    tls_t *t = ossl.bio_get_data(b);
    if (t) { free(t->in); free(t->out); free(t); }
    ossl.bio_set_data(b, NULL);
    return 1;
}

static int tls_resolve(void) {
    if (ossl.state) return ossl.state;
    ossl.state = -1;
    PyObject *mod = PyImport_ImportModule("_ssl");
    if (!mod) { PyErr_Clear(); return -1; }
    void *h = NULL;
    PyObject *file = PyObject_GetAttrString(mod, "__file__");
    if (file && PyUnicode_Check(file)) {
        const char *path = PyUnicode_AsUTF8(file);
        if (path) h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    }
    Py_XDECREF(file);
    PyErr_Clear();
    if (!h) h = dlopen(NULL, RTLD_NOW); /* _ssl built into the interpreter */
    ossl.ctx_type = PyObject_GetAttrString(mod, "_SSLContext");
    ossl.sock_type = PyObject_GetAttrString(mod, "_SSLSocket");
    Py_DECREF(mod);
    PyErr_Clear();
    if (!h || !ossl.ctx_type || !ossl.sock_type) return -1;
#define SYM(field, name) if (!(*(void **)&ossl.field = dlsym(h, name))) return -1
    SYM(read, "SSL_read"); SYM(write, "SSL_write"); SYM(get_error, "SSL_get_error");
    SYM(has_pending, "SSL_has_pending"); SYM(get_rbio, "SSL_get_rbio"); SYM(get_wbio, "SSL_get_wbio");
    SYM(get_ctx, "SSL_get_SSL_CTX"); SYM(shutdown, "SSL_shutdown"); SYM(bio_write, "BIO_write");
    SYM(bio_read, "BIO_read"); SYM(bio_ctrl_pending, "BIO_ctrl_pending"); SYM(err_clear, "ERR_clear_error");
    SYM(set_bio, "SSL_set_bio"); SYM(bio_get_new_index, "BIO_get_new_index"); SYM(bio_meth_new, "BIO_meth_new");
    SYM(bio_meth_set_write, "BIO_meth_set_write"); SYM(bio_meth_set_read, "BIO_meth_set_read");
    SYM(bio_meth_set_ctrl, "BIO_meth_set_ctrl"); SYM(bio_meth_set_destroy, "BIO_meth_set_destroy");
    SYM(bio_new, "BIO_new"); SYM(bio_set_data, "BIO_set_data"); SYM(bio_get_data, "BIO_get_data");
    SYM(bio_set_init, "BIO_set_init"); SYM(bio_set_flags, "BIO_set_flags"); SYM(bio_clear_flags, "BIO_clear_flags");
    SYM(bio_free, "BIO_free");
#undef SYM
    int type = ossl.bio_get_new_index();
    if (type < 0 || !(ossl.method = ossl.bio_meth_new(type | TLS_BIO_TYPE_SOURCE_SINK, "turbowg relay conn")) ||
        !ossl.bio_meth_set_write(ossl.method, tls_bio_write) || !ossl.bio_meth_set_read(ossl.method, tls_bio_read) ||
        !ossl.bio_meth_set_ctrl(ossl.method, tls_bio_ctrl) || !ossl.bio_meth_set_destroy(ossl.method, tls_bio_destroy))
        return -1;
    ossl.state = 1;
    return 1;
}

/* The SSL* inside a CPython _ssl._SSLSocket (ssl.SSLObject._sslobj), checked against everything that can be
 * checked: the type, the layout's context pointer against the object's `context` attribute, and that the
 * SSL's SSL_CTX (asked of libssl) is that context's. Any mismatch: NULL and ValueError (the caller keeps the
 * connection in Python). The layout is CPython's since 3.7: {HEAD; Socket; SSL *ssl; PySSLContext *ctx; ...}
 * and {HEAD; SSL_CTX *ctx; ...}. */
typedef struct { PyObject_HEAD PyObject *Socket; void *ssl; PyObject *ctx; } py_sslsock_layout;
typedef struct { PyObject_HEAD void *ctx; } py_sslctx_layout;

static void *tls_take(PyObject *obj) {
#if PY_VERSION_HEX < 0x03070000 || PY_VERSION_HEX >= 0x030E0000
    PyErr_SetString(PyExc_ValueError, "TLS handover: untested Python version");
    return NULL;
#endif
    if (tls_resolve() < 0) { PyErr_SetString(PyExc_ValueError, "TLS handover: libssl functions not found"); return NULL; }
    if ((PyObject *)Py_TYPE(obj) != ossl.sock_type) {
        PyErr_SetString(PyExc_ValueError, "TLS handover: not an _ssl._SSLSocket"); return NULL;
    }
    py_sslsock_layout *so = (py_sslsock_layout *)obj;
    PyObject *ctx = PyObject_GetAttrString(obj, "context");
    if (!ctx) return NULL;
    int ok = ctx == so->ctx && PyObject_IsInstance(ctx, ossl.ctx_type) == 1 && so->ssl &&
             ossl.get_ctx(so->ssl) == ((py_sslctx_layout *)ctx)->ctx && ossl.get_rbio(so->ssl) &&
             ossl.get_wbio(so->ssl) && ossl.get_rbio(so->ssl) != ossl.get_wbio(so->ssl);
    Py_DECREF(ctx);
    PyErr_Clear();
    if (!ok) { PyErr_SetString(PyExc_ValueError, "TLS handover: SSL object layout not recognised"); return NULL; }
    return so->ssl;
}

/* Move what a memory BIO holds to the end of buf (the handover: what Python's BIOs still held). */
static int tls_move_bio(void *bio, uint8_t **buf, size_t *len, size_t *cap) {
    for (;;) {
        size_t n = ossl.bio_ctrl_pending(bio);
        if (!n) return 0;
        if (n > INT_MAX) n = INT_MAX;
        if (reserve(buf, cap, *len + n) < 0) return -1;
        int r = ossl.bio_read(bio, *buf + *len, (int)n);
        if (r <= 0) return 0;
        *len += r;
    }
}

/* The conn's SSL reads and writes its tls_t from now on: what Python's memory BIOs held moves there first
 * (ciphertext Python read but OpenSSL had not taken; its output BIO is empty, the caller checked). Python's
 * BIO objects stay as they are, detached. */
static tls_t *tls_attach(void *ssl) {
    tls_t *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    void *bio = ossl.bio_new(ossl.method);
    if (!bio || tls_move_bio(ossl.get_rbio(ssl), &t->in, &t->in_len, &t->in_cap) < 0 ||
        tls_move_bio(ossl.get_wbio(ssl), &t->out, &t->out_len, &t->out_cap) < 0) {
        free(t->in); free(t->out); free(t);
        if (bio) ossl.bio_free(bio);
        return NULL;
    }
    t->rd = t->in;
    t->rd_len = t->in_len;
    ossl.bio_set_data(bio, t);
    ossl.bio_set_init(bio, 1);
    ossl.set_bio(ssl, bio, bio); /* one reference for both directions; the old BIOs lose the SSL's */
    return t;
}

static inline size_t tls_unsent(const conn_t *c) { return c->tls ? c->tls->out_len - c->tls->out_off : 0; }

/* ---- route table: 32-byte key -> slot, open addressing, seeded hash -------------------------------- */

static inline uint64_t key_hash(const Loop *L, const uint8_t *k) {
    uint64_t h = L->seed, w;
    for (int i = 0; i < 4; i++) {
        memcpy(&w, k + 8 * i, 8);
        h ^= w;
        h *= 0x9E3779B97F4A7C15ULL;
        h ^= h >> 29;
    }
    return h;
}

static int route_find(const Loop *L, const uint8_t *k) {
    if (!L->rcap) return -1;
    size_t m = L->rcap - 1, i = key_hash(L, k) & m;
    for (;;) {
        const route_t *r = &L->routes[i];
        if (r->state == 0) return -1;
        if (r->state == 1 && memcmp(r->key, k, KEY) == 0) return (int)i;
        i = (i + 1) & m;
    }
}

static int route_rehash(Loop *L, size_t cap) {
    route_t *old = L->routes;
    size_t ocap = L->rcap;
    route_t *nr = calloc(cap, sizeof(route_t));
    if (!nr) return -1;
    L->routes = nr; L->rcap = cap; L->rused = 0; L->rtomb = 0;
    for (size_t j = 0; j < ocap; j++) {
        if (old[j].state != 1) continue;
        size_t i = key_hash(L, old[j].key) & (cap - 1);
        while (nr[i].state) i = (i + 1) & (cap - 1);
        nr[i] = old[j];
        L->rused++;
    }
    free(old);
    return 0;
}

static int route_set(Loop *L, const uint8_t *k, int slot) {
    int at = route_find(L, k);
    if (at >= 0) {
        route_t *r = &L->routes[at];
        if (r->slot != slot) { r->slot = slot; r->xoff = 0; r->uid = L->next_uid++; if (!L->next_uid) L->next_uid = 1; }
        return 0;
    }
    if ((L->rused + L->rtomb + 1) * 2 > L->rcap) { /* rehashing also clears the tombstones */
        size_t cap = 64;
        while ((L->rused + 1) * 4 > cap) cap *= 2;
        if (route_rehash(L, cap) < 0) return -1;
    }
    size_t m = L->rcap - 1, i = key_hash(L, k) & m;
    while (L->routes[i].state == 1) i = (i + 1) & m;
    if (L->routes[i].state == 2) L->rtomb--;
    memcpy(L->routes[i].key, k, KEY);
    L->routes[i].slot = slot;
    L->routes[i].state = 1;
    L->routes[i].xoff = 0;
    L->routes[i].uid = L->next_uid++;
    if (!L->next_uid) L->next_uid = 1;
    L->rused++;
    return 0;
}

static void route_del(Loop *L, const uint8_t *k) {
    int at = route_find(L, k);
    if (at < 0) return;
    L->routes[at].state = 2;
    L->rused--; L->rtomb++;
}

/* ---- events handed up --------------------------------------------------------------------------- */

static inline uint64_t conn_id(const Loop *L, int slot) {
    return ((uint64_t)L->conns[slot].gen << 32) | (uint32_t)slot;
}

static void emit(Loop *L, int slot, int kind, const void *data, size_t len) {
    if ((kind < 256 || kind == EV_RECORDS) && L->nev) { /* back to back from one conn: one event */
        event_t *last = &L->ev[L->nev - 1];
        int same_kind = kind < 256 ? last->kind < 256 : last->kind == kind;
        if (same_kind && last->id == conn_id(L, slot) && last->off + last->len == L->arena_len) {
            if (reserve(&L->arena, &L->arena_cap, L->arena_len + len) < 0) { L->oom = 1; return; }
            memcpy(L->arena + L->arena_len, data, len);
            L->arena_len += len;
            last->len += len;
            return;
        }
    }
    if (L->nev == L->cev) {
        size_t n = L->cev ? L->cev * 2 : 256;
        event_t *q = realloc(L->ev, n * sizeof(event_t));
        if (!q) { L->oom = 1; return; }
        L->ev = q; L->cev = n;
    }
    if (reserve(&L->arena, &L->arena_cap, L->arena_len + len) < 0) { L->oom = 1; return; }
    memcpy(L->arena + L->arena_len, data, len);
    event_t *e = &L->ev[L->nev++];
    e->id = conn_id(L, slot); e->kind = kind; e->off = L->arena_len; e->len = len;
    L->arena_len += len;
}

/* ---- epoll interest ----------------------------------------------------------------------------- */

static void update_mask(Loop *L, conn_t *c, int slot) {
    if (c->fd < 0 || c->dead) return;
    uint32_t m = 0;
    if (!c->dead) {
        if (c->reading && c->blocked_on < 0) m |= EPOLLIN;
        if (c->want_out) m |= EPOLLOUT;
    }
    if (m == c->mask) return;
    struct epoll_event ev = {.events = m, .data.u64 = (uint64_t)slot};
    epoll_ctl(L->epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->mask = m;
}

static void signal_work(Loop *L) {
    uint64_t one = 1;
    ssize_t r = write(L->evfd, &one, 8);
    (void)r;
}

static void add_reparse(Loop *L, int slot) {
    conn_t *c = &L->conns[slot];
    if (c->in_reparse || (!c->in_len && !c->tls_more)) return;
    if (grow((void **)&L->reparse, &L->creparse, L->nreparse + 1, sizeof(int)) < 0) { L->oom = 1; return; }
    c->in_reparse = 1;
    L->reparse[L->nreparse++] = slot;
}

static void mark_dirty(Loop *L, int slot) {
    conn_t *c = &L->conns[slot];
    if (c->dirty) return;
    if (grow((void **)&L->dirty, &L->cdirty, L->ndirty + 1, sizeof(int)) < 0) { L->oom = 1; return; }
    c->dirty = 1;
    L->dirty[L->ndirty++] = slot;
}

/* ---- output buffers ----------------------------------------------------------------------------- */

static inline size_t pending(const conn_t *c) { return c->out_len - c->out_off; }

/* An output buffer holds frames (a client's) or records (a channel's): both have a 5-byte header. */
static inline size_t unit_len(const conn_t *c, const uint8_t *p) {
    return HDR + (c->kind == K_CHAN ? be32(p) : be32(p + 1));
}

static inline int unit_is_packet(const conn_t *c, const uint8_t *p) {
    /* a mesh-out link's ForwardPacket frames are packets too (droppable, counted), its pongs are not */
    return c->kind == K_CHAN ? p[4] == REC_PACKET : (p[0] == T_RECV || (c->mesh_out && p[0] == T_FORWARD));
}

static void count_drop(Loop *L, int reason, const conn_t *c, const uint8_t *frame) {
    int chan = c->kind == K_CHAN;
    uint32_t n = chan ? be32(frame) : be32(frame + 1), head = chan || frame[0] == T_FORWARD ? 2 * KEY : KEY;
    const uint8_t *pkt = frame + HDR + head;
    size_t plen = n >= head ? n - head : 0;
    int kind = is_disco(pkt, plen) ? 0 : 1;
    L->dropped[reason][kind]++;
    L->dropped_bytes[reason][kind] += plen;
}

/* Drop queued RecvPacket frames, oldest first, until at most `keep` bytes are pending. A frame that is
 * partly written already is kept (the stream must stay framed); control frames are always kept. */
static void drop_head(Loop *L, conn_t *c, int reason, size_t keep) {
    size_t p = c->out_head;
    if (c->out_off > p) p += unit_len(c, c->out + p); /* partly written: keep it */
    size_t w = p, end = c->out_len, left = pending(c);
    while (p < end) {
        if (left <= keep) { /* enough: the rest stays as it is */
            if (w != p) memmove(c->out + w, c->out + p, end - p);
            w += end - p;
            break;
        }
        size_t flen = unit_len(c, c->out + p);
        if (unit_is_packet(c, c->out + p)) {
            count_drop(L, reason, c, c->out + p);
            left -= flen;
        } else {
            if (w != p) memmove(c->out + w, c->out + p, flen);
            w += flen;
        }
        p += flen;
    }
    c->out_len = w;
    if (c->out_off > c->out_len) c->out_off = c->out_len;
}

static void drop_all(Loop *L, conn_t *c, int reason) {
    size_t p = c->out_head;
    while (p + HDR <= c->out_len) {
        size_t flen = unit_len(c, c->out + p);
        if (unit_is_packet(c, c->out + p) && p + flen <= c->out_len && p + flen > c->out_off)
            count_drop(L, reason, c, c->out + p);
        p += flen;
    }
    c->out_len = c->out_off = c->out_head = 0;
}

static uint8_t *out_append(Loop *L, conn_t *c, size_t n) {
    if (c->out_len == c->out_off && c->out_len) c->out_len = c->out_off = c->out_head = 0;
    if (reserve(&c->out, &c->out_cap, c->out_len + n) < 0) { L->oom = 1; return NULL; }
    if (c->out_len == c->out_off) c->last_progress = c->queued_at = L->now; /* the write clock starts now */
    uint8_t *p = c->out + c->out_len;
    c->out_len += n;
    return p;
}

static void release_waiters(Loop *L, int *list, int n) {
    for (int i = 0; i < n; i++) {
        int s = list[i];
        conn_t *w = &L->conns[s];
        if (w->fd < 0) continue;
        w->blocked_on = -1;
        w->blocked_x = 0;
        update_mask(L, w, s);
        add_reparse(L, s);
    }
}

static void mark_dirty(Loop *L, int slot);
static uint8_t *out_append(Loop *L, conn_t *c, size_t n);

static void put_record(uint8_t *o, uint8_t type, uint32_t n) {
    o[0] = n >> 24; o[1] = n >> 16; o[2] = n >> 8; o[3] = n; o[4] = type;
}

/* XOFF/XON for `key` to the sibling on channel slot ch (written with the channel's next batch). */
static void send_flow(Loop *L, int ch, uint8_t type, const uint8_t *key) {
    conn_t *c = &L->conns[ch];
    if (c->fd < 0 || c->dead || c->kind != K_CHAN) return;
    uint8_t *o = out_append(L, c, HDR + KEY);
    if (!o) return;
    put_record(o, type, KEY);
    memcpy(o + HDR, key, KEY);
    mark_dirty(L, ch);
}

/* d drained (or went away): the senders it paused go on; siblings told XOFF for its key hear XON. */
static void wake_waiters(Loop *L, conn_t *d) {
    int n = d->nwaiters;
    d->nwaiters = 0;
    release_waiters(L, d->waiters, n);
    uint64_t m = d->xoff_mask;
    d->xoff_mask = 0;
    for (int b = 0; m && b < MAX_CHANNELS; b++, m >>= 1)
        if ((m & 1) && L->chan_slot[b] >= 0) send_flow(L, L->chan_slot[b], REC_XON, d->key);
}

static void wake_xwaiters(Loop *L, conn_t *ch) {
    int n = ch->nxwaiters;
    ch->nxwaiters = 0;
    release_waiters(L, ch->xwaiters, n);
}

static void remove_waiter(Loop *L, conn_t *d, int slot) {
    for (int i = 0; i < d->nwaiters; i++)
        if (d->waiters[i] == slot) { d->waiters[i] = d->waiters[--d->nwaiters]; return; }
    for (int i = 0; i < d->nxwaiters; i++)
        if (d->xwaiters[i] == slot) { d->xwaiters[i] = d->xwaiters[--d->nxwaiters]; return; }
}

static void add_outwait(Loop *L, int slot) {
    conn_t *c = &L->conns[slot];
    if (c->in_outwait) return;
    if (grow((void **)&L->outwait, &L->coutwait, L->noutwait + 1, sizeof(int)) < 0) { L->oom = 1; return; }
    c->in_outwait = 1;
    L->outwait[L->noutwait++] = slot;
}

static void conn_fail(Loop *L, int slot, int kind, const char *why) {
    conn_t *c = &L->conns[slot];
    if (c->dead) return;
    c->dead = 1;
    if (c->mask) epoll_ctl(L->epfd, EPOLL_CTL_DEL, c->fd, NULL); /* no more events until remove() */
    c->mask = 0;
    if (c->blocked_on >= 0) { remove_waiter(L, &L->conns[c->blocked_on], slot); c->blocked_on = -1; }
    wake_waiters(L, c);
    wake_xwaiters(L, c);
    emit(L, slot, kind, why, strlen(why));
}

static void write_failed(Loop *L, int slot, const char *what) {
    char why[96];
    snprintf(why, sizeof why, "%s: %s", what, strerror(errno));
    drop_all(L, &L->conns[slot], R_WRITE_ERROR);
    conn_fail(L, slot, EV_CLOSED, why);
}

/* A TLS conn's turn to write: once the ciphertext of the last batch is all sent, up to TLS_BATCH bytes of
 * queued frames go through one SSL_write (records of up to 16 KiB in the write BIO) and out with one send().
 * A few rounds while the socket takes everything. Returns ciphertext bytes sent, -1 if the conn failed. */
/* Give the loop's shared encryption buffer back after a send; the unsent rest (if any) moves to the conn's own
 * buffer `own`. -1: out of memory. */
static int tls_unlend(Loop *L, tls_t *t, uint8_t *own, size_t own_cap) {
    size_t rest = t->out_len - t->out_off;
    L->obuf = t->out;
    L->obuf_cap = t->out_cap;
    int rc = 0;
    if (rest) {
        if (reserve(&own, &own_cap, rest) < 0) { rest = 0; rc = -1; }
        else memcpy(own, L->obuf + t->out_off, rest);
    }
    t->out = own; t->out_cap = own_cap; t->out_len = rest; t->out_off = 0;
    return rc;
}

static ssize_t tls_send(Loop *L, int slot) {
    conn_t *c = &L->conns[slot];
    tls_t *t = c->tls;
    ssize_t sent = 0;
    for (int round = 0; round < 4; round++) {
        int lent = 0;
        uint8_t *own = NULL;
        size_t own_cap = 0;
        if (!tls_unsent(c)) {
            size_t n = pending(c);
            if (!n) break;
            if (n > TLS_BATCH) n = TLS_BATCH;
            /* encrypt into the loop's shared buffer, lent to the conn's BIO: a conn keeps a buffer of its own
             * only for what the socket did not take */
            own = t->out; own_cap = t->out_cap;
            t->out = L->obuf; t->out_cap = L->obuf_cap; t->out_len = t->out_off = 0;
            lent = 1;
            ossl.err_clear();
            int r = ossl.write(c->ssl, c->out + c->out_off, (int)n);
            if (r <= 0) { /* our BIO never blocks; renegotiation is off in OpenSSL 3 servers: an error */
                ossl.err_clear();
                t->out_len = t->out_off = 0;
                tls_unlend(L, t, own, own_cap);
                errno = EPROTO;
                write_failed(L, slot, "tls write");
                return -1;
            }
            c->out_off += r;
        }
        ssize_t k = 0;
        int err = 0;
        if (tls_unsent(c)) {
            k = send(c->fd, t->out + t->out_off, tls_unsent(c), MSG_DONTWAIT | MSG_NOSIGNAL);
            L->writes++;
            if (k < 0) {
                err = errno;
                k = 0;
            }
        }
        t->out_off += k;
        sent += k;
        L->tls_bytes_out += k;
        if (lent && tls_unlend(L, t, own, own_cap) < 0 && !err) err = ENOMEM;
        if (err && err != EAGAIN && err != EWOULDBLOCK && err != EINTR) {
            errno = err;
            write_failed(L, slot, "write");
            return -1;
        }
        if (tls_unsent(c)) break; /* the socket is full: EPOLLOUT brings the rest */
        t->out_off = t->out_len = 0;
    }
    if (!tls_unsent(c) && t->out_cap > (64u << 10)) { free(t->out); t->out = NULL; t->out_cap = 0; }
    return sent;
}

static void write_out(Loop *L, int slot) {
    conn_t *c = &L->conns[slot];
    c->dirty = 0;
    if (c->fd < 0 || c->dead) return;
    size_t left = pending(c);
    if (left || (c->ssl && tls_unsent(c))) {
        ssize_t n;
        if (c->ssl) {
            n = tls_send(L, slot); /* progress: ciphertext sent (frames only encrypted are not progress) */
            if (n < 0) return;
        } else {
            n = send(c->fd, c->out + c->out_off, left, MSG_DONTWAIT | MSG_NOSIGNAL);
            L->writes++;
            if (n < 0) {
                if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                    write_failed(L, slot, "write");
                    return;
                }
                n = 0;
            }
            if (n > 0) c->out_off += n;
        }
        if (n > 0) {
            c->last_progress = L->now;
            c->stalled = 0;
            int done = 0;
            while (c->out_head < c->out_off) { /* frames fully written */
                size_t flen = unit_len(c, c->out + c->out_head);
                if (c->out_head + flen > c->out_off) break;
                done += c->kind == K_CLIENT && c->out[c->out_head] == T_RECV; /* queue time: clients only */
                c->out_head += flen;
            }
            if (done) { /* the batch is charged its oldest packet's age, as the Python path */
                double keep = 1.0;
                for (int i = 0; i < done && keep > 1e-9; i++) keep *= 0.9;
                double waited = (double)(long long)((L->now - c->queued_at) * 1000.0);
                L->avg_queue_ms = L->avg_queue_ms * keep + waited * (1.0 - keep);
                c->queued_at = L->now; /* what is left waited at most since now (an underestimate) */
            }
        }
        if (c->out_off == c->out_len) {
            c->out_len = c->out_off = c->out_head = 0;
            if (c->out_cap > (256u << 10)) { free(c->out); c->out = NULL; c->out_cap = 0; }
        } else if (c->out_head > (64u << 10) && c->out_head * 2 > c->out_len) {
            memmove(c->out, c->out + c->out_head, c->out_len - c->out_head);
            c->out_len -= c->out_head; c->out_off -= c->out_head; c->out_head = 0;
        }
    }
    int want = pending(c) > 0 || tls_unsent(c) > 0;
    if (want != c->want_out) {
        c->want_out = want;
        update_mask(L, c, slot);
    }
    if (want) add_outwait(L, slot);
    if ((c->nwaiters || c->xoff_mask) && pending(c) <= L->bound / 2) wake_waiters(L, c);
}

static void flush_dirty(Loop *L) {
    /* writing can wake senders and queue an XON on a channel (appended to dirty: the same pass writes it) */
    for (int i = 0; i < L->ndirty; i++) {
        int s = L->dirty[i];
        if (L->conns[s].dirty) write_out(L, s);
    }
    L->ndirty = 0;
}

/* ---- input -------------------------------------------------------------------------------------- */

static int seen_check_add(Loop *L, conn_t *d, uint32_t uid) {
    /* 1 if uid was new (and is now recorded) */
    if (d->seen_n * 2 + 2 > d->seen_cap) {
        uint32_t ncap = d->seen_cap ? d->seen_cap * 2 : 8;
        if (ncap > 8192) { /* churn: forget and re-report (Python's set dedups) */
            memset(d->seen, 0, d->seen_cap * sizeof(uint32_t));
            d->seen_n = 0;
        } else {
            uint32_t *ns = calloc(ncap, sizeof(uint32_t));
            if (!ns) { L->oom = 1; return 0; }
            for (uint32_t i = 0; i < d->seen_cap; i++) {
                uint32_t u = d->seen[i];
                if (!u) continue;
                uint32_t j = (u * 2654435761u) & (ncap - 1);
                while (ns[j]) j = (j + 1) & (ncap - 1);
                ns[j] = u;
            }
            free(d->seen);
            d->seen = ns; d->seen_cap = ncap;
        }
    }
    uint32_t m = d->seen_cap - 1, j = (uid * 2654435761u) & m;
    while (d->seen[j]) {
        if (d->seen[j] == uid) return 0;
        j = (j + 1) & m;
    }
    d->seen[j] = uid;
    d->seen_n++;
    return 1;
}

static void keep_rest(Loop *L, conn_t *s, const uint8_t *buf, size_t len, size_t p) {
    size_t rest = len - p;
    if (rest) {
        if (reserve(&s->in, &s->in_cap, rest) < 0) { L->oom = 1; s->in_len = 0; return; }
        memmove(s->in, buf + p, rest);
    } else if (s->in_cap > (64u << 10)) {
        free(s->in); s->in = NULL; s->in_cap = 0;
    }
    s->in_len = rest;
}

static void block_sender(Loop *L, int slot, int ds, int on_xoff) {
    conn_t *s = &L->conns[slot], *d = &L->conns[ds];
    s->blocked_on = ds;
    s->blocked_x = on_xoff;
    if (on_xoff ? grow((void **)&d->xwaiters, &d->cxwaiters, d->nxwaiters + 1, sizeof(int))
                : grow((void **)&d->waiters, &d->cwaiters, d->nwaiters + 1, sizeof(int))) {
        L->oom = 1;
    } else if (on_xoff) {
        d->xwaiters[d->nxwaiters++] = slot;
    } else {
        d->waiters[d->nwaiters++] = slot;
    }
    L->sender_pauses++;
    if (on_xoff) L->xoff_pauses++;
    update_mask(L, s, slot);
}

/* Records from the sibling on channel `slot`: PACKET records for keys routed to a local client are delivered
 * here (never forwarded again: a sibling only delivers locally), XOFF/XON switch a key's route, the rest
 * (PRESENT/GONE, packets for keys the C loop does not hold) goes up to Python as EV_RECORDS. */
static void process_records(Loop *L, int slot, const uint8_t *buf, size_t len) {
    conn_t *ch = &L->conns[slot];
    size_t p = 0;
    while (len - p >= HDR) {
        uint32_t n = be32(buf + p);
        uint8_t t = buf[p + 4];
        if (n > MAX_FRAME || (t == REC_PACKET && n < 2 * KEY) || ((t == REC_XOFF || t == REC_XON) && n != KEY)) {
            char why[96];
            snprintf(why, sizeof why, "channel record type %u length %u is malformed", t, n);
            ch->in_len = 0;
            conn_fail(L, slot, EV_PROTOCOL, why);
            return;
        }
        if (p + HDR + n > len) break;
        const uint8_t *b = buf + p + HDR;
        if (t == REC_PACKET) {
            int at = route_find(L, b + KEY);
            conn_t *d = at >= 0 ? &L->conns[L->routes[at].slot] : NULL;
            if (d && d->kind == K_CLIENT && !d->mesh_out && !d->dead && d->fd >= 0) { /* a sibling: one hop */
                int ds = L->routes[at].slot;
                size_t plen = n - 2 * KEY;
                /* the sibling cannot be paused per key at once (XOFF is in flight): a cap, then head drops */
                if (pending(d) >= CHAN_CAP * L->bound || (d->stalled && pending(d) >= L->bound))
                    drop_head(L, d, R_QUEUE_HEAD, L->bound);
                uint8_t *o = out_append(L, d, HDR + KEY + plen);
                if (o) {
                    put_hdr(o, T_RECV, KEY + plen);
                    memcpy(o + HDR, b, KEY);
                    memcpy(o + HDR + KEY, b + 2 * KEY, plen);
                    L->packets_sent++;
                    L->bytes_sent += plen;
                    L->forwarded_in++;
                    ch->rec_in++;
                    int sat = route_find(L, b);
                    /* a source without a route here: its key hash, kept apart from the counted uids */
                    uint32_t uid = sat >= 0 ? L->routes[sat].uid : (uint32_t)key_hash(L, b) | 0x80000000u;
                    if (seen_check_add(L, d, uid)) emit(L, ds, EV_DELIVERY, b, KEY);
                    mark_dirty(L, ds);
                    if (pending(d) >= L->bound && ch->chan_bit >= 0 && !(d->xoff_mask & (1ULL << ch->chan_bit))) {
                        d->xoff_mask |= 1ULL << ch->chan_bit;
                        L->xoffs_sent++;
                        send_flow(L, slot, REC_XOFF, d->key);
                    }
                }
                p += HDR + n;
                continue;
            }
        } else if (t == REC_XOFF || t == REC_XON) {
            int at = route_find(L, b);
            if (at >= 0 && L->routes[at].slot == slot) {
                L->routes[at].xoff = t == REC_XOFF;
                if (t == REC_XON) wake_xwaiters(L, ch);
            }
            p += HDR + n;
            continue;
        }
        emit(L, slot, EV_RECORDS, buf + p, HDR + n);
        p += HDR + n;
    }
    keep_rest(L, ch, buf, len, p);
}

/* ForwardPacket from mesh peer `slot` (src | dst | packet in `b`): the packet's last hop, as derper's. To a
 * local client (the mesh peer is not paused per destination: past 2*bound the oldest queued packets go, as
 * deliver()), or on to the sibling shard holding dst (which only delivers locally). 0: not handled here. */
static int mesh_forward(Loop *L, int slot, const uint8_t *b, uint32_t n) {
    int at = route_find(L, b + KEY);
    if (at < 0) return 0;
    int ds = L->routes[at].slot;
    conn_t *d = &L->conns[ds];
    if (d->dead || d->fd < 0 || d->mesh_out) return 0; /* behind another relay: never a second hop (Python drops) */
    size_t plen = n - 2 * KEY;
    if (d->kind == K_CHAN) {
        if (pending(d) >= L->bound) {
            if (!d->stalled) { block_sender(L, slot, ds, 0); return -1; }
            drop_head(L, d, R_QUEUE_HEAD, L->bound / 2);
        }
        uint8_t *o = out_append(L, d, HDR + n);
        if (!o) return 1;
        put_record(o, REC_PACKET, n);
        memcpy(o + HDR, b, n);
        L->forwarded_in++;
        L->forwarded_out++;
        d->rec_out++;
        mark_dirty(L, ds);
        return 1;
    }
    if (pending(d) >= 2 * L->bound || (d->stalled && pending(d) >= L->bound)) drop_head(L, d, R_QUEUE_HEAD, L->bound);
    uint8_t *o = out_append(L, d, HDR + KEY + plen);
    if (!o) return 1;
    put_hdr(o, T_RECV, KEY + plen);
    memcpy(o + HDR, b, KEY);
    memcpy(o + HDR + KEY, b + 2 * KEY, plen);
    L->forwarded_in++;
    L->packets_sent++;
    L->bytes_sent += plen;
    int sat = route_find(L, b);
    uint32_t uid = sat >= 0 ? L->routes[sat].uid : (uint32_t)key_hash(L, b) | 0x80000000u;
    if (seen_check_add(L, d, uid)) emit(L, ds, EV_DELIVERY, b, KEY);
    mark_dirty(L, ds);
    return 1;
}

/* Parse frames from buf[0:len] for sender `slot`; keep what is not consumed in the sender's `in`. */
static void process_input(Loop *L, int slot, const uint8_t *buf, size_t len) {
    conn_t *s = &L->conns[slot];
    size_t p = 0;
    if (s->kind == K_CHAN) { process_records(L, slot, buf, len); return; }
    if (s->notify_active && s->active_poll != L->polls && len) {
        s->active_poll = L->polls;
        emit(L, slot, EV_ACTIVE, "", 0);
    }
    while (len - p >= HDR) {
        uint8_t t = buf[p];
        uint32_t flen = be32(buf + p + 1);
        if (flen > frame_limit(t)) {
            char why[96];
            snprintf(why, sizeof why, "frame type 0x%02x length %u exceeds limit %u", t, flen, frame_limit(t));
            s->in_len = 0;
            conn_fail(L, slot, EV_PROTOCOL, why);
            return;
        }
        if (p + HDR + flen > len) break;
        const uint8_t *payload = buf + p + HDR;
        if (t == T_SEND && flen >= KEY) {
            int at = route_find(L, payload);
            if (at >= 0) {
                int ds = L->routes[at].slot;
                conn_t *d = &L->conns[ds];
                if (!d->dead && d->fd >= 0 && (d->kind == K_CHAN || d->mesh_out)) {
                    /* the key is on a sibling shard (a PACKET record on its channel) or behind a mesh peer
                       relay (a ForwardPacket frame on our link to it): src key, dst key, packet */
                    size_t plen = flen - KEY;
                    int chan = d->kind == K_CHAN;
                    if (chan && L->routes[at].xoff) { block_sender(L, slot, ds, 1); break; }
                    if (pending(d) >= L->bound) {
                        if (!d->stalled) { block_sender(L, slot, ds, 0); break; } /* waits for it to drain */
                        drop_head(L, d, R_QUEUE_HEAD, L->bound / 2); /* it took nothing for the timeout */
                    }
                    uint8_t *o = out_append(L, d, HDR + 2 * KEY + plen);
                    if (o) {
                        if (chan) put_record(o, REC_PACKET, 2 * KEY + plen);
                        else put_hdr(o, T_FORWARD, 2 * KEY + plen);
                        memcpy(o + HDR, s->key, KEY);
                        memcpy(o + HDR + KEY, payload, KEY + plen); /* dst key and packet, as they came */
                        L->packets_received++;
                        L->bytes_received += plen;
                        if (is_disco(payload + KEY, plen)) L->packets_received_disco++;
                        L->forwarded_out++;
                        if (!chan) L->mesh_out++;
                        d->rec_out++;
                        mark_dirty(L, ds);
                    }
                    p += HDR + flen;
                    continue;
                }
                if (!d->dead && d->fd >= 0) {
                    size_t plen = flen - KEY;
                    if (pending(d) >= L->bound) {
                        if (!d->stalled) { block_sender(L, slot, ds, 0); break; } /* waits for d to drain */
                        drop_head(L, d, R_QUEUE_HEAD, L->bound / 2); /* stalled past the write timeout */
                    }
                    uint8_t *o = out_append(L, d, HDR + KEY + plen);
                    if (o) {
                        put_hdr(o, T_RECV, KEY + plen);
                        memcpy(o + HDR, s->key, KEY);
                        memcpy(o + HDR + KEY, payload + KEY, plen);
                        const uint8_t *pkt = payload + KEY;
                        L->packets_received++;
                        L->bytes_received += plen;
                        if (is_disco(pkt, plen)) L->packets_received_disco++;
                        L->packets_sent++;
                        L->bytes_sent += plen;
                        if (seen_check_add(L, d, s->uid)) emit(L, ds, EV_DELIVERY, s->key, KEY);
                        mark_dirty(L, ds);
                    }
                    p += HDR + flen;
                    continue;
                }
            }
        }
        if (t == T_FORWARD && s->mesh && flen >= 2 * KEY) {
            int r = mesh_forward(L, slot, payload, flen);
            if (r < 0) break; /* paused on a full channel */
            if (r > 0) { p += HDR + flen; continue; }
        }
        L->frames_up++;
        emit(L, slot, t, buf + p, HDR + flen);
        p += HDR + flen;
    }
    keep_rest(L, s, buf, len, p);
}

/* A TLS conn's read: ciphertext from the socket into tls->in (which the SSL's BIO reads), the records
 * decrypted into rbuf after the input kept from before, then the same frame parser. Decryption stops when
 * rbuf is full (records then wait in tls->in: tls_more makes the conn reparse) or at a partial record
 * (WANT_READ: the socket brings the rest). A close_notify ends the conn after the frames before it; a record that fails to
 * decrypt ends it after the frames before it too. What SSL_read writes (a KeyUpdate answer, an alert)
 * goes to the ciphertext buffer at once. */
static void tls_read_conn(Loop *L, int slot, int do_read) {
    conn_t *c = &L->conns[slot];
    size_t have = c->in_len;
    if (have) memcpy(L->rbuf, c->in, have);
    int eof = 0, closed = 0, failed = 0;
    tls_t *t = c->tls;
    if (do_read) { /* into the shared cbuf, after the ciphertext kept from the last read */
        if (reserve(&L->cbuf, &L->cbuf_cap, t->in_len + L->read_chunk) < 0) {
            c->in_len = 0;
            conn_fail(L, slot, EV_CLOSED, "tls: out of memory");
            return;
        }
        ssize_t n = recv(c->fd, L->cbuf + t->in_len, L->read_chunk, MSG_DONTWAIT);
        L->reads++;
        if (n == 0) {
            eof = 1;
        } else if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                char why[64];
                snprintf(why, sizeof why, "read: %s", strerror(errno));
                c->in_len = 0;
                conn_fail(L, slot, EV_CLOSED, why);
                return;
            }
            if (!c->tls_more) return;
        } else {
            L->tls_bytes_in += n;
        }
        memcpy(L->cbuf, t->in, t->in_len);
        t->rd = L->cbuf;
        t->rd_len = t->in_len + (n > 0 ? (size_t)n : 0);
        t->rd_off = 0;
    }
    c->tls_more = 0;
    ossl.err_clear();
    for (;;) {
        if (have >= L->rbuf_cap) { c->tls_more = 1; break; }
        size_t room = L->rbuf_cap - have;
        int r = ossl.read(c->ssl, L->rbuf + have, room > INT_MAX ? INT_MAX : (int)room);
        if (r > 0) { have += r; L->tls_records_in++; continue; }
        int e = ossl.get_error(c->ssl, r);
        if (e == TLS_ERROR_WANT_READ) break;
        if (e == TLS_ERROR_ZERO_RETURN) closed = 1;
        else failed = 1;
        ossl.err_clear();
        break;
    }
    /* keep what OpenSSL did not take (a partial record; more when rbuf filled up) in the conn's own buffer */
    size_t rest = t->rd_len - t->rd_off;
    if (t->rd != t->in) {
        if (reserve(&t->in, &t->in_cap, rest) < 0) { rest = 0; failed = 1; }
        else memcpy(t->in, t->rd + t->rd_off, rest);
    } else if (t->rd_off) {
        memmove(t->in, t->in + t->rd_off, rest);
    }
    t->in_len = rest;
    if (!rest && t->in_cap > (64u << 10)) { free(t->in); t->in = NULL; t->in_cap = 0; }
    t->rd = t->in; t->rd_len = rest; t->rd_off = 0;
    if (tls_unsent(c)) mark_dirty(L, slot); /* what SSL_read wrote: a KeyUpdate answer, an alert */
    process_input(L, slot, L->rbuf, have);
    if (c->dead) return;
    if (closed) { /* answer the close_notify (best effort: the conn is closed next) */
        ossl.err_clear();
        ossl.shutdown(c->ssl);
        ossl.err_clear();
        if (tls_unsent(c)) {
            ssize_t k = send(c->fd, t->out + t->out_off, tls_unsent(c), MSG_DONTWAIT | MSG_NOSIGNAL);
            if (k > 0) t->out_off += k;
        }
    }
    if (closed || failed || eof) {
        const char *why = closed ? "tls close_notify" : failed ? "tls: bad record" : c->in_len ? "eof mid-frame"
                          : (ossl.has_pending(c->ssl) || t->in_len) ? "eof mid-record" : "eof";
        c->in_len = 0;
        conn_fail(L, slot, EV_CLOSED, why);
        return;
    }
    if (c->tls_more && c->blocked_on < 0) add_reparse(L, slot);
}

static void read_conn(Loop *L, int slot, int do_read) {
    conn_t *c = &L->conns[slot];
    if (c->fd < 0 || c->dead || c->blocked_on >= 0 || !c->reading) return; /* set_reading(True) reparses */
    if (c->ssl) { tls_read_conn(L, slot, do_read); return; }
    size_t have = c->in_len;
    if (have) memcpy(L->rbuf, c->in, have);
    size_t room = L->rbuf_cap - have;
    if (room > L->read_chunk) room = L->read_chunk;
    if (do_read && room >= 4096) {
        ssize_t n = recv(c->fd, L->rbuf + have, room, MSG_DONTWAIT);
        L->reads++;
        if (n == 0) {
            c->in_len = 0;
            conn_fail(L, slot, EV_CLOSED, have ? "eof mid-frame" : "eof");
            return;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
            char why[64];
            snprintf(why, sizeof why, "read: %s", strerror(errno));
            c->in_len = 0;
            conn_fail(L, slot, EV_CLOSED, why);
            return;
        }
        have += n;
    }
    process_input(L, slot, L->rbuf, have);
}

static void check_timeouts(Loop *L) {
    int j = 0;
    for (int i = 0; i < L->noutwait; i++) {
        int s = L->outwait[i];
        conn_t *c = &L->conns[s];
        if (c->fd < 0 || c->dead || !(pending(c) || tls_unsent(c))) { c->in_outwait = 0; continue; }
        double wt = c->wtimeout > 0 ? c->wtimeout : L->write_timeout;
        if (!c->stalled && wt > 0 && L->now - c->last_progress > wt) {
            c->stalled = 1;
            L->write_timeouts++;
            drop_head(L, c, R_QUEUE_HEAD, 0);
            wake_waiters(L, c);
            emit(L, s, EV_WRITE_TIMEOUT, "", 0);
        }
        L->outwait[j++] = s;
    }
    L->noutwait = j;
}

/* ---- the loop object ---------------------------------------------------------------------------- */

static int get_slot(Loop *L, uint64_t id) {
    uint32_t slot = (uint32_t)id, gen = (uint32_t)(id >> 32);
    if (slot >= (uint32_t)L->nconns) return -1;
    conn_t *c = &L->conns[slot];
    if (c->fd < 0 || c->gen != gen) return -1;
    return (int)slot;
}

static int slot_arg(Loop *L, PyObject *arg) {
    unsigned long long id = PyLong_AsUnsignedLongLong(arg);
    if (id == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    int s = get_slot(L, id);
    if (s < 0) PyErr_SetString(PyExc_KeyError, "no such connection");
    return s;
}

static int check_idle(Loop *L) {
    if (L->epfd < 0) { PyErr_SetString(PyExc_ValueError, "loop is closed"); return -1; }
    if (L->busy) { PyErr_SetString(PyExc_RuntimeError, "fastpath loop used from two threads"); return -1; }
    return 0;
}

static void free_conn(Loop *L, int slot) {
    conn_t *c = &L->conns[slot];
    free(c->in); free(c->out); free(c->waiters); free(c->xwaiters); free(c->seen);
    /* the Python ssl object goes (and with its last reference the SSL*, freed by _ssl without a shutdown) */
    PyObject *sslref = c->sslref;
    uint32_t gen = c->gen;
    memset(c, 0, sizeof *c);
    c->fd = -1; c->gen = gen + 1; c->blocked_on = -1;
    Py_XDECREF(sslref);
}

static PyObject *Loop_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"bound", "write_timeout", "read_chunk", NULL};
    Py_ssize_t bound = 2 << 20, chunk = 256 << 10;
    double wt = 2.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|ndn", kwlist, &bound, &wt, &chunk)) return NULL;
    if (bound < 1 || chunk < 4096) { PyErr_SetString(PyExc_ValueError, "bound >= 1, read_chunk >= 4096"); return NULL; }
    Loop *L = (Loop *)type->tp_alloc(type, 0);
    if (!L) return NULL;
    L->epfd = L->evfd = -1;
    L->bound = bound; L->read_chunk = chunk; L->write_timeout = wt;
    L->next_uid = 1;
    for (int i = 0; i < MAX_CHANNELS; i++) L->chan_slot[i] = -1;
    L->epfd = epoll_create1(EPOLL_CLOEXEC);
    L->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    L->rbuf_cap = chunk + 2 * (HDR + MAX_FRAME) + 64;
    L->rbuf = malloc(L->rbuf_cap);
    if (L->epfd < 0 || L->evfd < 0 || !L->rbuf) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(L);
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
    epoll_ctl(L->epfd, EPOLL_CTL_ADD, L->evfd, &ev);
    uint64_t seed = 0;
    FILE *f = fopen("/dev/urandom", "rb");
    if (f) { if (fread(&seed, 1, 8, f) != 8) seed = 0; fclose(f); }
    L->seed = seed ^ (uint64_t)(uintptr_t)L ^ (uint64_t)(mono() * 1e9);
    return (PyObject *)L;
}

static void Loop_close_all(Loop *L) {
    for (int i = 0; i < L->nconns; i++)
        if (L->conns[i].fd >= 0) { close(L->conns[i].fd); free_conn(L, i); }
    if (L->epfd >= 0) close(L->epfd);
    if (L->evfd >= 0) close(L->evfd);
    L->epfd = L->evfd = -1;
}

static void Loop_dealloc(Loop *L) {
    Loop_close_all(L);
    free(L->conns); free(L->free_slots); free(L->routes); free(L->dirty); free(L->reparse); free(L->outwait);
    free(L->rbuf); free(L->cbuf); free(L->obuf); free(L->ev); free(L->arena);
    Py_TYPE(L)->tp_free((PyObject *)L);
}

static PyObject *Loop_fileno(Loop *L, PyObject *unused) {
    if (L->epfd < 0) { PyErr_SetString(PyExc_ValueError, "loop is closed"); return NULL; }
    return PyLong_FromLong(L->epfd);
}

static PyObject *Loop_close(Loop *L, PyObject *unused) {
    Loop_close_all(L);
    L->nconns = 0; L->nfree = 0; L->ndirty = L->nreparse = L->noutwait = 0;
    free(L->routes); L->routes = NULL; L->rcap = L->rused = L->rtomb = 0;
    Py_RETURN_NONE;
}

/* add(fd, key, inbytes=b"", outbytes=b"", channel=-1, tls=None) -> id. The loop owns fd from now on
 * (remove() closes it). channel >= 0: fd is the channel to sibling shard number `channel` (records, not DERP
 * frames; key is only a label); route() keys the sibling announces to its id. tls: the _ssl._SSLSocket
 * (ssl.SSLObject._sslobj) of a connection whose TLS is terminated here, with nothing of it buffered in Python
 * but `inbytes` (plaintext after the last whole frame): the loop holds it until remove(). ValueError if it
 * cannot be used from C (the caller keeps the connection in Python). */
static PyObject *Loop_add(Loop *L, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "key", "inbytes", "outbytes", "channel", "tls", NULL};
    int fd, channel = -1;
    Py_buffer key, in = {0}, out = {0};
    PyObject *tlsobj = Py_None;
    void *ssl = NULL;
    if (check_idle(L) < 0) return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iy*|y*y*iO", kwlist, &fd, &key, &in, &out, &channel, &tlsobj))
        return NULL;
    PyObject *ret = NULL;
    int slot = -1;
    if (key.len != KEY) { PyErr_SetString(PyExc_ValueError, "key must be 32 bytes"); goto done; }
    if (tlsobj != Py_None) {
        if (channel >= 0) { PyErr_SetString(PyExc_ValueError, "a channel has no TLS"); goto done; }
        if (!(ssl = tls_take(tlsobj))) goto done;
    }
    if (channel >= 0 && channel < MAX_CHANNELS && L->chan_slot[channel] >= 0) {
        PyErr_SetString(PyExc_ValueError, "channel number in use"); goto done;
    }
    if (in.len > MAX_FRAME + HDR + (Py_ssize_t)L->read_chunk) { PyErr_SetString(PyExc_ValueError, "inbytes too long"); goto done; }
    if (grow((void **)&L->free_slots, &L->cfree, L->nfree + 1, sizeof(int)) < 0) { PyErr_NoMemory(); goto done; }
    if (L->nfree) {
        slot = L->free_slots[--L->nfree];
    } else {
        if (grow((void **)&L->conns, &L->cconns, L->nconns + 1, sizeof(conn_t)) < 0) { PyErr_NoMemory(); goto done; }
        slot = L->nconns++;
        memset(&L->conns[slot], 0, sizeof(conn_t));
        L->conns[slot].fd = -1;
        L->conns[slot].blocked_on = -1;
    }
    conn_t *c = &L->conns[slot];
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) { PyErr_SetFromErrno(PyExc_OSError); goto undo; }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)slot};
    if (epoll_ctl(L->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) { PyErr_SetFromErrno(PyExc_OSError); goto undo; }
    c->fd = fd;
    c->mask = EPOLLIN;
    c->reading = 1;
    c->blocked_on = -1;
    c->kind = channel >= 0 ? K_CHAN : K_CLIENT;
    c->chan_bit = channel >= 0 && channel < MAX_CHANNELS ? channel : -1;
    if (c->chan_bit >= 0) L->chan_slot[c->chan_bit] = slot;
    c->uid = L->next_uid++;
    if (!L->next_uid) L->next_uid = 1;
    memcpy(c->key, key.buf, KEY);
    L->now = mono();
    if (ssl) {
    }
    if (in.len) {
        if (reserve(&c->in, &c->in_cap, in.len) < 0) { PyErr_NoMemory(); goto undo_fd; }
        memcpy(c->in, in.buf, in.len);
        c->in_len = in.len;
        add_reparse(L, slot);
        signal_work(L);
    }
    if (out.len) {
        uint8_t *o = out_append(L, c, out.len);
        if (!o) { PyErr_NoMemory(); goto undo_fd; }
        memcpy(o, out.buf, out.len);
        mark_dirty(L, slot);
        signal_work(L);
    }
    if (ssl) { /* last: nothing fails after the SSL's BIOs are switched (a refused conn stays Python's) */
        if (!(c->tls = tls_attach(ssl))) { PyErr_NoMemory(); goto undo_fd; }
        c->ssl = ssl;
        c->sslref = tlsobj;
        Py_INCREF(tlsobj);
        c->tls_more = 1; /* whatever the read BIO held (a partial record, usually) is decrypted first */
        add_reparse(L, slot);
        if (tls_unsent(c)) mark_dirty(L, slot);
        signal_work(L);
    }
    ret = PyLong_FromUnsignedLongLong(conn_id(L, slot));
    goto done;
undo_fd:
    epoll_ctl(L->epfd, EPOLL_CTL_DEL, fd, NULL);
    free_conn(L, slot);
    L->free_slots[L->nfree++] = slot;
    goto done;
undo:
    L->free_slots[L->nfree++] = slot;
done:
    PyBuffer_Release(&key);
    if (in.obj) PyBuffer_Release(&in);
    if (out.obj) PyBuffer_Release(&out);
    return ret;
}

/* remove(id): close the socket, count its queued packets as gone_disconnected, forget it. */
static PyObject *Loop_remove(Loop *L, PyObject *arg) {
    if (check_idle(L) < 0) return NULL;
    int s = slot_arg(L, arg);
    if (s < 0) return NULL;
    if (grow((void **)&L->free_slots, &L->cfree, L->nfree + 1, sizeof(int)) < 0) return PyErr_NoMemory();
    conn_t *c = &L->conns[s];
    drop_all(L, c, R_GONE);
    epoll_ctl(L->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    if (c->blocked_on >= 0) remove_waiter(L, &L->conns[c->blocked_on], s);
    c->dead = 1;
    wake_waiters(L, c);
    wake_xwaiters(L, c);
    if (c->kind == K_CHAN) { /* every key the sibling announced: handed up from now on */
        for (size_t i = 0; i < L->rcap; i++)
            if (L->routes[i].state == 1 && L->routes[i].slot == s) { L->routes[i].state = 2; L->rused--; L->rtomb++; }
        if (c->chan_bit >= 0) {
            uint64_t bit = 1ULL << c->chan_bit;
            for (int i = 0; i < L->nconns; i++) L->conns[i].xoff_mask &= ~bit;
            L->chan_slot[c->chan_bit] = -1;
        }
    } else {
        int at = route_find(L, c->key);
        if (at >= 0 && L->routes[at].slot == s) route_del(L, c->key);
    }
    free_conn(L, s);
    L->free_slots[L->nfree++] = s;
    if (L->nreparse) signal_work(L);
    Py_RETURN_NONE;
}

static PyObject *Loop_route(Loop *L, PyObject *args) {
    Py_buffer key;
    PyObject *idobj;
    if (check_idle(L) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "y*O", &key, &idobj)) return NULL;
    PyObject *ret = NULL;
    int s;
    if (key.len != KEY) PyErr_SetString(PyExc_ValueError, "key must be 32 bytes");
    else if ((s = slot_arg(L, idobj)) >= 0) {
        if (route_set(L, key.buf, s) < 0) PyErr_NoMemory();
        else { ret = Py_None; Py_INCREF(ret); }
    }
    PyBuffer_Release(&key);
    return ret;
}

static PyObject *Loop_unroute(Loop *L, PyObject *arg) {
    Py_buffer key;
    if (check_idle(L) < 0) return NULL;
    if (PyObject_GetBuffer(arg, &key, PyBUF_SIMPLE) < 0) return NULL;
    if (key.len == KEY) route_del(L, key.buf);
    PyBuffer_Release(&key);
    if (key.len != KEY) { PyErr_SetString(PyExc_ValueError, "key must be 32 bytes"); return NULL; }
    Py_RETURN_NONE;
}

/* write(id, frames): raw bytes (whole control frames) appended to the conn's output. */
static PyObject *Loop_write(Loop *L, PyObject *args) {
    PyObject *idobj;
    Py_buffer b;
    if (check_idle(L) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "Oy*", &idobj, &b)) return NULL;
    PyObject *ret = NULL;
    int s = slot_arg(L, idobj);
    if (s >= 0) {
        conn_t *c = &L->conns[s];
        if (!c->dead) {
            L->now = mono();
            uint8_t *o = out_append(L, c, b.len);
            if (!o) { PyErr_NoMemory(); goto out; }
            memcpy(o, b.buf, b.len);
            mark_dirty(L, s);
        }
        ret = Py_None; Py_INCREF(ret);
    }
out:
    PyBuffer_Release(&b);
    return ret;
}

/* deliver(id, src, packet) -> bool: a RecvPacket from elsewhere (a Python conn, a shard, the mesh).
 * Those senders cannot be paused per destination: past 2*bound the oldest queued packets go (queue_head). */
static PyObject *Loop_deliver(Loop *L, PyObject *args) {
    PyObject *idobj;
    Py_buffer src, pkt;
    if (check_idle(L) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "Oy*y*", &idobj, &src, &pkt)) return NULL;
    PyObject *ret = NULL;
    int s = slot_arg(L, idobj);
    if (s < 0) goto out;
    if (src.len != KEY || pkt.len > MAX_PACKET) { PyErr_SetString(PyExc_ValueError, "bad key or packet size"); goto out; }
    conn_t *c = &L->conns[s];
    if (c->kind != K_CLIENT) { PyErr_SetString(PyExc_ValueError, "deliver() to a channel: use forward()"); goto out; }
    if (c->dead) { ret = Py_False; Py_INCREF(ret); goto out; }
    L->now = mono();
    if (pending(c) >= 2 * L->bound || (c->stalled && pending(c) >= L->bound)) drop_head(L, c, R_QUEUE_HEAD, L->bound);
    uint8_t *o = out_append(L, c, HDR + KEY + pkt.len);
    if (!o) { PyErr_NoMemory(); goto out; }
    put_hdr(o, T_RECV, KEY + pkt.len);
    memcpy(o + HDR, src.buf, KEY);
    memcpy(o + HDR + KEY, pkt.buf, pkt.len);
    L->packets_sent++;
    L->bytes_sent += pkt.len;
    mark_dirty(L, s);
    ret = Py_True; Py_INCREF(ret);
out:
    PyBuffer_Release(&src);
    PyBuffer_Release(&pkt);
    return ret;
}

/* forward(channel id, src, dst, packet, limit) -> queued bytes, or -1 (dropped: over `limit` or closed): a
 * PACKET record from a sender Python holds (TLS, WebSocket, a mesh peer) to a key on the sibling. */
static PyObject *Loop_forward(Loop *L, PyObject *args) {
    PyObject *idobj;
    Py_buffer src, dst, pkt;
    Py_ssize_t limit;
    if (check_idle(L) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "Oy*y*y*n", &idobj, &src, &dst, &pkt, &limit)) return NULL;
    PyObject *ret = NULL;
    int s = slot_arg(L, idobj);
    if (s < 0) goto out;
    if (src.len != KEY || dst.len != KEY || pkt.len > MAX_PACKET) {
        PyErr_SetString(PyExc_ValueError, "bad key or packet size"); goto out;
    }
    conn_t *c = &L->conns[s];
    if (c->kind != K_CHAN) { PyErr_SetString(PyExc_ValueError, "forward() needs a channel"); goto out; }
    if (c->dead || pending(c) > (size_t)limit) { ret = PyLong_FromLong(-1); goto out; }
    L->now = mono();
    uint8_t *o = out_append(L, c, HDR + 2 * KEY + pkt.len);
    if (!o) { PyErr_NoMemory(); goto out; }
    put_record(o, REC_PACKET, 2 * KEY + pkt.len);
    memcpy(o + HDR, src.buf, KEY);
    memcpy(o + HDR + KEY, dst.buf, KEY);
    memcpy(o + HDR + 2 * KEY, pkt.buf, pkt.len);
    mark_dirty(L, s);
    ret = PyLong_FromSize_t(pending(c));
out:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&pkt);
    return ret;
}

static PyObject *Loop_flush(Loop *L, PyObject *unused) {
    if (check_idle(L) < 0) return NULL;
    if (!L->ndirty) Py_RETURN_NONE;
    L->now = mono();
    flush_dirty(L);
    if (L->nreparse) signal_work(L);
    if (L->nev) signal_work(L); /* a write error: poll() hands it up */
    Py_RETURN_NONE;
}

static PyObject *Loop_set_reading(Loop *L, PyObject *args) {
    PyObject *idobj;
    int on;
    if (check_idle(L) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "Op", &idobj, &on)) return NULL;
    int s = slot_arg(L, idobj);
    if (s < 0) return NULL;
    conn_t *c = &L->conns[s];
    c->reading = on;
    update_mask(L, c, s);
    if (on && (c->in_len || c->tls_more) && c->blocked_on < 0) { add_reparse(L, s); signal_work(L); }
    Py_RETURN_NONE;
}

static PyObject *Loop_set_notify_active(Loop *L, PyObject *args) {
    PyObject *idobj;
    int on;
    if (!PyArg_ParseTuple(args, "Op", &idobj, &on)) return NULL;
    int s = slot_arg(L, idobj);
    if (s < 0) return NULL;
    L->conns[s].notify_active = on;
    Py_RETURN_NONE;
}

/* set_mesh_out(id, write_timeout): the conn is this relay's DERP client link to a mesh peer relay (mesh.py's
 * MeshPeer): keys routed to it get ForwardPacket frames; nothing it reads is handled in C (all goes up). */
static PyObject *Loop_set_mesh_out(Loop *L, PyObject *args) {
    PyObject *idobj;
    double wt;
    if (!PyArg_ParseTuple(args, "Od", &idobj, &wt)) return NULL;
    int s = slot_arg(L, idobj);
    if (s < 0) return NULL;
    conn_t *c = &L->conns[s];
    if (c->kind != K_CLIENT || c->mesh) { PyErr_SetString(PyExc_ValueError, "set_mesh_out() needs a plain client conn"); return NULL; }
    c->mesh_out = 1;
    c->notify_active = 0;
    c->wtimeout = wt;
    Py_RETURN_NONE;
}

/* set_mesh(id, write_timeout): the conn is a mesh peer relay (its ForwardPacket frames are delivered in C)
 * with its own write timeout (0: the loop's). */
static PyObject *Loop_set_mesh(Loop *L, PyObject *args) {
    PyObject *idobj;
    double wt;
    if (!PyArg_ParseTuple(args, "Od", &idobj, &wt)) return NULL;
    int s = slot_arg(L, idobj);
    if (s < 0) return NULL;
    if (L->conns[s].kind != K_CLIENT || L->conns[s].mesh_out) { PyErr_SetString(PyExc_ValueError, "set_mesh() on a channel"); return NULL; }
    L->conns[s].mesh = 1;
    L->conns[s].wtimeout = wt;
    Py_RETURN_NONE;
}

static PyObject *Loop_queue_bytes(Loop *L, PyObject *arg) {
    int s = slot_arg(L, arg);
    if (s < 0) return NULL;
    return PyLong_FromSize_t(pending(&L->conns[s]));
}

static PyObject *Loop_conn_info(Loop *L, PyObject *arg) {
    int s = slot_arg(L, arg);
    if (s < 0) return NULL;
    conn_t *c = &L->conns[s];
    return Py_BuildValue("{s:n,s:n,s:O,s:O,s:O,s:O,s:i,s:O,s:K,s:s,s:K,s:K,s:O,s:n,s:n}", "queue_bytes", (Py_ssize_t)pending(c),
                         "in_bytes", (Py_ssize_t)c->in_len, "paused", c->blocked_on >= 0 ? Py_True : Py_False,
                         "reading", (c->mask & EPOLLIN) ? Py_True : Py_False, "stalled", c->stalled ? Py_True : Py_False,
                         "dead", c->dead ? Py_True : Py_False, "fd", c->fd,
                         "xoff_paused", c->blocked_x ? Py_True : Py_False, "xoff_mask", (unsigned long long)c->xoff_mask,
                         "kind", c->kind == K_CHAN ? "channel" : c->mesh_out ? "mesh_out" : "client", "records_out", c->rec_out,
                         "records_in", c->rec_in, "tls", c->ssl ? Py_True : Py_False,
                         "tls_unsent", (Py_ssize_t)(c->ssl ? tls_unsent(c) : 0),
                         "tls_buffers", (Py_ssize_t)(c->tls ? c->tls->in_cap + c->tls->out_cap : 0));
}

/* poll() -> [(id, kind, bytes), ...]: one non-blocking turn. kind < 256: frames handed up (bytes = whole
 * frames, headers included, as many as came back to back from that conn; kind is the first one's type);
 * the EV_* kinds are connection events. */
static PyObject *Loop_poll(Loop *L, PyObject *unused) {
    if (check_idle(L) < 0) return NULL;
    struct epoll_event evs[MAX_EVENTS];
    L->busy = 1;
    L->polls++;
    Py_BEGIN_ALLOW_THREADS
    int n = epoll_wait(L->epfd, evs, MAX_EVENTS, 0);
    L->now = mono();
    if (L->nreparse) { /* senders resumed or conns added with bytes already read */
        int cnt = L->nreparse;
        int *list = malloc(cnt * sizeof(int));
        if (list) {
            memcpy(list, L->reparse, cnt * sizeof(int));
            L->nreparse = 0;
            for (int i = 0; i < cnt; i++) {
                conn_t *c = &L->conns[list[i]];
                if (!c->in_reparse) continue;
                c->in_reparse = 0;
                read_conn(L, list[i], 0);
            }
            free(list);
        }
    }
    for (int i = 0; i < n; i++) {
        uint64_t d = evs[i].data.u64;
        if (d == UINT64_MAX) {
            uint64_t v;
            ssize_t r = read(L->evfd, &v, 8);
            (void)r;
            continue;
        }
        int s = (int)d;
        conn_t *c = &L->conns[s];
        if (c->fd < 0 || c->dead) continue;
        uint32_t e = evs[i].events;
        if (e & EPOLLOUT) mark_dirty(L, s);
        if (e & EPOLLIN) read_conn(L, s, 1);
        else if ((e & (EPOLLHUP | EPOLLERR)) && !(e & EPOLLOUT)) {
            /* hung up while not reading (paused): nothing more can come or go */
            drop_all(L, c, R_WRITE_ERROR);
            conn_fail(L, s, EV_CLOSED, "hangup");
        }
    }
    flush_dirty(L);
    /* senders woken by these writes: give them their turn now (their bytes are already here) */
    for (int round = 0; round < 2 && L->nreparse; round++) {
        int cnt = L->nreparse;
        int *list = malloc(cnt * sizeof(int));
        if (!list) break;
        memcpy(list, L->reparse, cnt * sizeof(int));
        L->nreparse = 0;
        for (int i = 0; i < cnt; i++) {
            conn_t *c = &L->conns[list[i]];
            if (!c->in_reparse) continue;
            c->in_reparse = 0;
            read_conn(L, list[i], 0);
        }
        free(list);
        flush_dirty(L);
    }
    check_timeouts(L);
    if (L->nreparse) signal_work(L);
    Py_END_ALLOW_THREADS
    L->busy = 0;
    if (L->oom) { L->oom = 0; L->nev = 0; L->arena_len = 0; return PyErr_NoMemory(); }
    PyObject *list = PyList_New(L->nev);
    if (!list) goto fail;
    for (size_t i = 0; i < L->nev; i++) {
        event_t *e = &L->ev[i];
        PyObject *t = Py_BuildValue("(Kiy#)", (unsigned long long)e->id, e->kind, (const char *)L->arena + e->off,
                                    (Py_ssize_t)e->len);
        if (!t) { Py_DECREF(list); list = NULL; goto fail; }
        PyList_SET_ITEM(list, i, t);
    }
fail:
    L->nev = 0;
    L->arena_len = 0;
    if (L->arena_cap > (1u << 20)) { free(L->arena); L->arena = NULL; L->arena_cap = 0; }
    return list;
}

static PyObject *Loop_stats(Loop *L, PyObject *unused) {
    size_t queued = 0, held = 0; /* bytes waiting to be written / read but not yet parsed, all conns */
    for (int i = 0; i < L->nconns; i++)
        if (L->conns[i].fd >= 0) { queued += pending(&L->conns[i]); held += L->conns[i].in_len; }
    PyObject *d = Py_BuildValue(
        "{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:i,s:n,s:d,s:n,s:n,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}",
        "packets_received", L->packets_received,
        "bytes_received", L->bytes_received, "packets_received_disco", L->packets_received_disco,
        "packets_sent", L->packets_sent, "bytes_sent", L->bytes_sent, "sender_pauses", L->sender_pauses,
        "reads", L->reads, "writes", L->writes, "frames_up", L->frames_up, "polls", L->polls,
        "write_timeouts", L->write_timeouts, "conns", L->nconns - L->nfree, "routes", (Py_ssize_t)L->rused,
        "avg_queue_ms", L->avg_queue_ms, "queued_bytes", (Py_ssize_t)queued, "unparsed_bytes", (Py_ssize_t)held,
        "packets_forwarded_out", L->forwarded_out, "packets_forwarded_in", L->forwarded_in,
        "xoffs_sent", L->xoffs_sent, "xoff_pauses", L->xoff_pauses, "tls_records_in", L->tls_records_in,
        "tls_bytes_in", L->tls_bytes_in, "tls_bytes_out", L->tls_bytes_out, "mesh_forwarded_out", L->mesh_out);
    if (!d) return NULL;
    PyObject *drops = PyDict_New();
    if (!drops) { Py_DECREF(d); return NULL; }
    for (int r = 0; r < NREASONS; r++)
        for (int k = 0; k < 2; k++) {
            PyObject *key = Py_BuildValue("(ss)", reason_names[r], k ? "other" : "disco");
            PyObject *val = Py_BuildValue("(KK)", L->dropped[r][k], L->dropped_bytes[r][k]);
            if (!key || !val || PyDict_SetItem(drops, key, val) < 0) {
                Py_XDECREF(key); Py_XDECREF(val); Py_DECREF(drops); Py_DECREF(d); return NULL;
            }
            Py_DECREF(key); Py_DECREF(val);
        }
    PyDict_SetItemString(d, "dropped", drops);
    Py_DECREF(drops);
    return d;
}

/* counters() -> (packets_received, bytes_received, packets_received_disco, packets_sent, bytes_sent, drops,
 *                avg_queue_ms):
 * the cheap subset of stats() that Python syncs after every poll */
static PyObject *Loop_counters(Loop *L, PyObject *unused) {
    unsigned long long drops = 0;
    for (int r = 0; r < NREASONS; r++) drops += L->dropped[r][0] + L->dropped[r][1];
    return Py_BuildValue("(KKKKKKdKK)", L->packets_received, L->bytes_received, L->packets_received_disco,
                         L->packets_sent, L->bytes_sent, drops, L->avg_queue_ms, L->forwarded_out, L->forwarded_in);
}

static PyMethodDef Loop_methods[] = {
    {"counters", (PyCFunction)Loop_counters, METH_NOARGS, "the packet counters and total drops, as a tuple"},
    {"fileno", (PyCFunction)Loop_fileno, METH_NOARGS, "the epoll fd (readable when poll() has work)"},
    {"close", (PyCFunction)Loop_close, METH_NOARGS, "close every socket and the epoll fd"},
    {"add", (PyCFunction)(void (*)(void))Loop_add, METH_VARARGS | METH_KEYWORDS,
     "add(fd, key, inbytes=b'', outbytes=b'', channel=-1, tls=None) -> id; the loop owns fd from now on"},
    {"remove", (PyCFunction)Loop_remove, METH_O, "remove(id): close the socket, count queued packets as gone"},
    {"route", (PyCFunction)Loop_route, METH_VARARGS, "route(key, id): SendPacket to key goes to id here"},
    {"unroute", (PyCFunction)Loop_unroute, METH_O, "unroute(key): SendPacket to key is handed up"},
    {"write", (PyCFunction)Loop_write, METH_VARARGS, "write(id, frames): queue raw frame bytes"},
    {"deliver", (PyCFunction)Loop_deliver, METH_VARARGS, "deliver(id, src, packet) -> bool: queue a RecvPacket"},
    {"forward", (PyCFunction)Loop_forward, METH_VARARGS,
     "forward(channel, src, dst, packet, limit) -> queued bytes or -1: queue a PACKET record to a sibling"},
    {"flush", (PyCFunction)Loop_flush, METH_NOARGS, "write every conn with queued output"},
    {"poll", (PyCFunction)Loop_poll, METH_NOARGS, "one non-blocking turn -> [(id, kind, bytes)]"},
    {"set_reading", (PyCFunction)Loop_set_reading, METH_VARARGS, "set_reading(id, on)"},
    {"set_notify_active", (PyCFunction)Loop_set_notify_active, METH_VARARGS, "set_notify_active(id, on)"},
    {"set_mesh", (PyCFunction)Loop_set_mesh, METH_VARARGS, "set_mesh(id, write_timeout): a mesh peer relay"},
    {"set_mesh_out", (PyCFunction)Loop_set_mesh_out, METH_VARARGS,
     "set_mesh_out(id, write_timeout): our client link to a mesh peer relay (ForwardPacket frames to it)"},
    {"queue_bytes", (PyCFunction)Loop_queue_bytes, METH_O, "queue_bytes(id) -> bytes queued for the conn"},
    {"conn_info", (PyCFunction)Loop_conn_info, METH_O, "conn_info(id) -> dict (tests, debugging)"},
    {"stats", (PyCFunction)Loop_stats, METH_NOARGS, "cumulative counters"},
    {NULL},
};

static PyTypeObject LoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "turbowg.relay._fastpath.Loop",
    .tp_basicsize = sizeof(Loop),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Loop_new,
    .tp_dealloc = (destructor)Loop_dealloc,
    .tp_methods = Loop_methods,
    .tp_doc = "The relay's C forwarding plane: one epoll loop owning authenticated DERP client sockets.",
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_fastpath", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (PyType_Ready(&LoopType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    Py_INCREF(&LoopType);
    PyModule_AddObject(m, "Loop", (PyObject *)&LoopType);
    PyModule_AddIntConstant(m, "EV_CLOSED", EV_CLOSED);
    PyModule_AddIntConstant(m, "EV_PROTOCOL", EV_PROTOCOL);
    PyModule_AddIntConstant(m, "EV_WRITE_TIMEOUT", EV_WRITE_TIMEOUT);
    PyModule_AddIntConstant(m, "EV_DELIVERY", EV_DELIVERY);
    PyModule_AddIntConstant(m, "EV_ACTIVE", EV_ACTIVE);
    PyModule_AddIntConstant(m, "EV_RECORDS", EV_RECORDS);
    PyModule_AddIntConstant(m, "REC_XOFF", REC_XOFF);
    PyModule_AddIntConstant(m, "REC_XON", REC_XON);
    PyModule_AddIntConstant(m, "MAX_FRAME", HDR + MAX_FRAME);
    return m;
}
