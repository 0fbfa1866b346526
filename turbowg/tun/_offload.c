/*
 * turbowg.tun._offload: the TUN offload hot paths in C.
 *
 *   ingest(frame, frame_len, dst, dst_off, layout, idx) -> (count, next_off)
 *       One vnet-header TUN read -> plain IP packets (GSO split / checksum completion / copy).
 *   coalesce(src, layout, count, dst, frames, tcp, udp) -> nframes
 *       IP packets -> vnet-header TUN frames, packets of one flow merged (GRO).
 *
 * The output is byte-identical to the Python reference (turbowg/tun/gso.py split + finish_checksum as used
 * by TunDevice.read_batch, and gro.coalesce + gro.frame_iov); turbowg/tun/fast.py chooses between the two
 * and tests/test_tun_fast.py compares them.  Keep the rules here in step with those files.
 *
 * Packets are located by (offset, length) pairs of native int32 in caller-owned buffers so that a whole
 * batch crosses the C boundary in one call with no Python object per packet.
 *
 * Checksums: a region's ones' complement sum is computed in native (little-endian) 16-bit lanes with a
 * 64-bit accumulator and converted to network order once at the end (RFC 1071: the sum is byte-order
 * independent up to a final byte swap).  Regions are always summed relative to their own first byte, so
 * the absolute alignment of the buffers does not matter (all loads go through memcpy).
 *
 * Why one file (~830 lines): one CPython extension module; ingest (GSO split) and coalesce (GRO) share
 * the header parsing and the checksum code, and a split would export internal symbols across objects.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define VNET_HDR_LEN 10
#define NEEDS_CSUM 1
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_UDP_L4 5
#define GSO_ECN 0x80

#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17

#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_CWR 0x80

#define MAX_GROUP_BYTES 65535
#define MAX_SEGMENTS 64

/* ------------------------------------------------------------------------------------------------------ */
/* byte access */

static inline uint32_t rd16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }

static inline uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void wr16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Native-order fields: the virtio header and the int32 layout tables. */
static inline void wrn16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

static inline void wrn32(uint8_t *p, int32_t v) { memcpy(p, &v, 4); }

static inline int32_t rdn32(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint16_t rdn16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* ------------------------------------------------------------------------------------------------------ */
/* ones' complement sums */

/* Sum of p[0:n] as little-endian 16-bit words (odd tail zero padded), not folded.  Two 64-bit accumulators
 * of 32-bit halves cannot overflow for any buffer below 2**34 bytes, so no carry handling in the loop. */
static uint64_t sum_le(const uint8_t *p, size_t n)
{
    uint64_t a = 0, b = 0;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        a += w & 0xFFFFFFFFu;
        b += w >> 32;
    }
    for (; n >= 2; n -= 2, p += 2)
        a += rdn16(p);
    if (n)
        a += p[0]; /* the first byte of a little-endian word is its low byte */
    return a + b;
}

/* The same, copying src to dst on the way (one pass over the payload). */
static uint64_t copy_sum_le(uint8_t *restrict dst, const uint8_t *restrict src, size_t n)
{
    uint64_t a = 0, b = 0;
    for (; n >= 8; n -= 8, src += 8, dst += 8) {
        uint64_t w;
        memcpy(&w, src, 8);
        memcpy(dst, &w, 8);
        a += w & 0xFFFFFFFFu;
        b += w >> 32;
    }
    for (; n >= 2; n -= 2, src += 2, dst += 2) {
        uint16_t w = rdn16(src);
        memcpy(dst, &w, 2);
        a += w;
    }
    if (n) {
        dst[0] = src[0];
        a += src[0];
    }
    return a + b;
}

/* Fold with end-around carry: 0 stays 0, any other value lands in 1..0xFFFF (as checksum.fold). */
static inline uint32_t fold16(uint64_t s)
{
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return (uint32_t)s;
}

/* A little-endian-lane sum, folded and turned into the network-order sum. */
static inline uint32_t be_of(uint64_t le_sum)
{
    uint32_t x = fold16(le_sum);
    return (x & 0xFF) << 8 | x >> 8;
}

/* Network-order ones' complement sum of p[0:n], folded to 0..0xFFFF. */
static inline uint32_t sum_be(const uint8_t *p, size_t n) { return be_of(sum_le(p, n)); }

/* ------------------------------------------------------------------------------------------------------ */
/* argument helpers */

typedef struct {
    Py_buffer view;
    int held;
} buf_arg;

static int get_buf(PyObject *obj, buf_arg *b, int writable, const char *name)
{
    if (PyObject_GetBuffer(obj, &b->view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        /* A read-only or non-contiguous object is a wrong argument type, as for "w*" in PyArg_Parse. */
        if (PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s must be a %scontiguous buffer, not %.100s", name,
                         writable ? "writable " : "", Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    b->held = 1;
    return 0;
}

static void release_bufs(buf_arg *bufs, int n)
{
    for (int i = 0; i < n; i++)
        if (bufs[i].held)
            PyBuffer_Release(&bufs[i].view);
}

static int get_index(PyObject *obj, Py_ssize_t *out)
{
    Py_ssize_t v = PyNumber_AsSsize_t(obj, PyExc_OverflowError);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* Record packet `slot` as (offset, length) in an int32 layout table (bounds checked by the caller). */
static inline void put_entry(uint8_t *table, Py_ssize_t slot, Py_ssize_t off, Py_ssize_t len)
{
    wrn32(table + 8 * slot, (int32_t)off);
    wrn32(table + 8 * slot + 4, (int32_t)len);
}

/* Room for `count` packets ending at byte `end`: dst and the layout table must hold them, and every offset
 * must fit the int32 table.  Sets BufferError otherwise. */
static int check_room(Py_ssize_t end, Py_ssize_t dst_len, Py_ssize_t slot_end, Py_ssize_t table_bytes)
{
    if (end > dst_len || end > INT32_MAX) {
        PyErr_SetString(PyExc_BufferError, "no room in dst");
        return -1;
    }
    if (slot_end > table_bytes / 8) {
        PyErr_SetString(PyExc_BufferError, "no room in layout");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------------ */
/* GSO split (gso.split) */

typedef struct {
    Py_ssize_t t;        /* transport header offset */
    Py_ssize_t hlen;     /* IP + transport header length, copied in front of every segment */
    Py_ssize_t csum_at;  /* transport checksum field */
    Py_ssize_t payload;  /* bytes after hlen */
    Py_ssize_t count;    /* segments */
    Py_ssize_t out_len;  /* total bytes written */
    Py_ssize_t gso_size;
    int v4, tcp;
    uint32_t proto;
} gso_plan;

/* Validate a GSO packet exactly as gso.split does and plan the segments; returns an error reason or NULL. */
static const char *gso_check(const uint8_t *p, Py_ssize_t n, unsigned gso_type, unsigned gso_size,
                             unsigned csum_start, gso_plan *g)
{
    if (n < 28)
        return "GSO packet too short";
    gso_type &= ~(unsigned)GSO_ECN;
    int version = p[0] >> 4;
    if (gso_type == GSO_TCPV4) {
        if (version != 4)
            return "TCPV4 GSO on a non-IPv4 packet";
        g->tcp = 1;
    } else if (gso_type == GSO_TCPV6) {
        if (version != 6)
            return "TCPV6 GSO on a non-IPv6 packet";
        g->tcp = 1;
    } else if (gso_type == GSO_UDP_L4) {
        g->tcp = 0;
    } else {
        return "unsupported GSO type";
    }
    if (gso_size == 0)
        return "GSO size zero";

    Py_ssize_t t;
    if (version == 4) {
        t = (p[0] & 0x0F) * 4;
        if (t < 20 || (csum_start && csum_start != (unsigned)t))
            return "bad IPv4 header length";
    } else if (version == 6) {
        t = csum_start ? (Py_ssize_t)csum_start : 40;
        if (t < 40)
            return "bad IPv6 transport offset";
    } else {
        return "not an IP packet";
    }

    Py_ssize_t hlen;
    if (g->tcp) {
        if (n < t + 20)
            return "truncated TCP header";
        hlen = t + (p[t + 12] >> 4) * 4;
        if (hlen < t + 20 || hlen > n)
            return "bad TCP data offset";
        g->proto = IPPROTO_TCP_;
        g->csum_at = t + 16;
    } else {
        hlen = t + 8;
        if (hlen > n)
            return "truncated UDP header";
        g->proto = IPPROTO_UDP_;
        g->csum_at = t + 6;
    }
    if (version == 4 && p[9] != g->proto)
        return "IPv4 protocol does not match the GSO type";
    if (version == 6 && t == 40 && p[6] != g->proto)
        return "IPv6 next header does not match the GSO type";

    g->v4 = version == 4;
    g->t = t;
    g->hlen = hlen;
    g->gso_size = gso_size;
    g->payload = n - hlen;
    g->count = g->payload ? (g->payload + gso_size - 1) / gso_size : 1;
    g->out_len = g->count * hlen + g->payload;
    /* The first segment is the longest; its length fields must fit 16 bits (the Python packs them). */
    Py_ssize_t longest = hlen + (g->payload < (Py_ssize_t)gso_size ? g->payload : (Py_ssize_t)gso_size);
    if (g->v4 ? longest > 0xFFFF : longest - 40 > 0xFFFF)
        return "segment too long";
    return NULL;
}

/* Write the planned segments of packet p at out + off; segment k's (offset, length) goes to layout slot
 * first_slot + k.  Each segment: header copied from the packet, per-segment fields patched, payload copied
 * and summed in one pass, then the IPv4 header and transport checksums computed directly. */
static Py_ssize_t gso_write(const uint8_t *p, const gso_plan *g, uint8_t *out, Py_ssize_t off,
                            uint8_t *layout, Py_ssize_t first_slot)
{
    const Py_ssize_t t = g->t, hlen = g->hlen;
    const uint32_t ip_id = g->v4 ? rd16(p + 4) : 0;
    const uint32_t seq0 = g->tcp ? rd32(p + t + 4) : 0;
    const uint8_t flags0 = g->tcp ? p[t + 13] : 0;
    /* Pseudo-header addresses + protocol; the length is added per segment. */
    const uint32_t addr_sum = (g->v4 ? sum_be(p + 12, 8) : sum_be(p + 8, 32)) + g->proto;
    const uint8_t *payload = p + hlen;
    Py_ssize_t left = g->payload;

    for (Py_ssize_t i = 0; i < g->count; i++) {
        Py_ssize_t plen = left < g->gso_size ? left : g->gso_size;
        Py_ssize_t seg_len = hlen + plen, l4_len = seg_len - t;
        uint8_t *seg = out + off;

        memcpy(seg, p, (size_t)hlen);
        if (g->v4) {
            wr16(seg + 2, (uint32_t)seg_len);
            wr16(seg + 4, ip_id + (uint32_t)i);
            wr16(seg + 10, 0);
            wr16(seg + 10, ~fold16(sum_be(seg, (size_t)t)));
        } else {
            wr16(seg + 4, (uint32_t)(seg_len - 40));
        }
        if (g->tcp) {
            uint8_t flags = flags0;
            if (i != g->count - 1)
                flags &= (uint8_t)~(TCP_FIN | TCP_PSH);
            if (i != 0)
                flags &= (uint8_t)~TCP_CWR;
            wr32(seg + t + 4, seq0 + (uint32_t)(payload - (p + hlen)));
            seg[t + 13] = flags;
        } else {
            wr16(seg + t + 4, (uint32_t)l4_len);
        }
        wr16(seg + g->csum_at, 0);

        uint64_t s = (uint64_t)addr_sum + (uint64_t)l4_len + sum_be(seg + t, (size_t)(hlen - t));
        s += be_of(copy_sum_le(seg + hlen, payload, (size_t)plen));
        uint32_t csum = ~fold16(s) & 0xFFFF; /* s > 0 (protocol), so fold16 is never 0 here */
        if (!g->tcp && csum == 0)
            csum = 0xFFFF; /* UDP transmits a zero checksum as all ones */
        wr16(seg + g->csum_at, csum);

        put_entry(layout, first_slot + i, off, seg_len);
        off += seg_len;
        payload += plen;
        left -= plen;
    }
    return off;
}

/* NEEDS_CSUM without GSO (gso.finish_checksum): copy, then complete the checksum over [csum_start:]; the
 * field itself holds the pseudo-header sum and is part of the summed bytes. */
static const char *finish_check(Py_ssize_t n, unsigned csum_start, unsigned csum_offset)
{
    Py_ssize_t at = (Py_ssize_t)csum_start + csum_offset;
    if (at + 2 > n || (Py_ssize_t)csum_start >= n)
        return "checksum offsets beyond the packet";
    return NULL;
}

static void finish_write(uint8_t *out, const uint8_t *p, Py_ssize_t n, unsigned csum_start,
                         unsigned csum_offset)
{
    memcpy(out, p, csum_start);
    uint32_t csum = ~fold16(copy_sum_le(out + csum_start, p + csum_start, (size_t)(n - csum_start)));
    csum = be_of(csum & 0xFFFF); /* byte swap of the complement == complement of the swapped sum */
    if (csum == 0 && csum_offset == 6)
        csum = 0xFFFF; /* UDP transmits a zero checksum as all ones */
    wr16(out + csum_start + csum_offset, csum);
}

static PyObject *offload_ingest(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "ingest() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t frame_len, dst_off, idx;
    if (get_index(args[1], &frame_len) < 0 || get_index(args[3], &dst_off) < 0 ||
        get_index(args[5], &idx) < 0)
        return NULL;
    buf_arg b[3];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    if (get_buf(args[0], &b[0], 0, "frame") < 0 || get_buf(args[2], &b[1], 1, "dst") < 0 ||
        get_buf(args[4], &b[2], 1, "layout") < 0)
        goto done;
    const uint8_t *frame = b[0].view.buf;
    uint8_t *dst = b[1].view.buf, *layout = b[2].view.buf;
    const Py_ssize_t dst_len = b[1].view.len, table = b[2].view.len;

    if (frame_len < VNET_HDR_LEN || frame_len > b[0].view.len) {
        PyErr_SetString(PyExc_ValueError, frame_len < VNET_HDR_LEN ? "frame shorter than the virtio header"
                                                                  : "frame_len beyond the frame");
        goto done;
    }
    if (dst_off < 0 || idx < 0) {
        PyErr_SetString(PyExc_ValueError, "negative dst_off or idx");
        goto done;
    }
    /* Clamp before arithmetic so that huge arguments cannot overflow; check_room rejects them anyway. */
    if (dst_off > dst_len || idx > table / 8) {
        PyErr_SetString(PyExc_BufferError, dst_off > dst_len ? "no room in dst" : "no room in layout");
        goto done;
    }
    const unsigned flags = frame[0], gso_type = frame[1];
    const unsigned gso_size = rdn16(frame + 4), csum_start = rdn16(frame + 6), csum_offset = rdn16(frame + 8);
    const uint8_t *pkt = frame + VNET_HDR_LEN;
    const Py_ssize_t n = frame_len - VNET_HDR_LEN;
    const char *bad;
    Py_ssize_t count, end;

    if (gso_type != GSO_NONE) {
        gso_plan g;
        if ((bad = gso_check(pkt, n, gso_type, gso_size, csum_start, &g)) != NULL)
            goto malformed;
        if (check_room(dst_off + g.out_len, dst_len, idx + g.count, table) < 0)
            goto done;
        end = gso_write(pkt, &g, dst, dst_off, layout, idx);
        count = g.count;
    } else {
        if ((flags & NEEDS_CSUM) && (bad = finish_check(n, csum_start, csum_offset)) != NULL)
            goto malformed;
        if (check_room(dst_off + n, dst_len, idx + 1, table) < 0)
            goto done;
        if (flags & NEEDS_CSUM)
            finish_write(dst + dst_off, pkt, n, csum_start, csum_offset);
        else
            memcpy(dst + dst_off, pkt, (size_t)n);
        put_entry(layout, idx, dst_off, n);
        end = dst_off + n;
        count = 1;
    }
    result = Py_BuildValue("(nn)", count, end);
    goto done;
malformed:
    PyErr_SetString(PyExc_ValueError, bad);
done:
    release_bufs(b, 3);
    return result;
}

/* ------------------------------------------------------------------------------------------------------ */
/* GRO coalesce (gro.coalesce + gro.frame_iov) */

typedef struct {
    int32_t first, last;  /* member packet indices; members are linked through member_next[] */
    int32_t nseg;
    int32_t total;        /* bytes of the coalesced IP packet: hlen + all payloads */
    int32_t hlen, gso_size, t;
    uint32_t next_seq;    /* TCP: sequence number the next member must carry */
    uint64_t ipsig;       /* TOS+TTL (IPv4) or version/class/flow label + hop limit (IPv6) */
    uint8_t kind;         /* GSO_NONE for a lone packet */
    uint8_t psh;
} group_t;

/* One record per flow key seen in the call; `open` is the flow's open group (Python's open_tcp/open_udp
 * dict entry), -1 once closed.  Keys are addresses + ports: 12 bytes (IPv4) or 36 (IPv6). */
typedef struct {
    uint8_t key[36];
    uint8_t klen, proto;
    int32_t open;
    int32_t chain; /* next flow in the same hash slot */
} flow_t;

typedef struct {
    group_t *groups;
    int32_t ngroups;
    int32_t *member_next;
    flow_t *flows;
    int32_t nflows;
    int32_t *slots;
    uint32_t mask;
} gro_ctx;

static uint32_t key_hash(const uint8_t *key, int klen, uint8_t proto)
{
    uint32_t h = 2166136261u ^ proto; /* FNV-1a */
    for (int i = 0; i < klen; i++)
        h = (h ^ key[i]) * 16777619u;
    return h ^ (h >> 15);
}

/* The flow record for key, created if missing (at most one per packet, so ctx->flows never overflows). */
static flow_t *flow_get(gro_ctx *c, const uint8_t *key, int klen, uint8_t proto)
{
    uint32_t slot = key_hash(key, klen, proto) & c->mask;
    for (int32_t i = c->slots[slot]; i >= 0; i = c->flows[i].chain) {
        flow_t *f = &c->flows[i];
        if (f->klen == klen && f->proto == proto && memcmp(f->key, key, (size_t)klen) == 0)
            return f;
    }
    flow_t *f = &c->flows[c->nflows];
    memcpy(f->key, key, (size_t)klen);
    f->klen = (uint8_t)klen;
    f->proto = proto;
    f->open = -1;
    f->chain = c->slots[slot];
    c->slots[slot] = c->nflows++;
    return f;
}

static group_t *group_new(gro_ctx *c, int32_t k, uint8_t kind)
{
    group_t *g = &c->groups[c->ngroups++];
    memset(g, 0, sizeof(*g));
    g->first = g->last = k;
    g->nseg = 1;
    g->kind = kind;
    c->member_next[k] = -1;
    return g;
}

static void group_add(gro_ctx *c, group_t *g, int32_t k, int32_t plen)
{
    c->member_next[g->last] = k;
    c->member_next[k] = -1;
    g->last = k;
    g->nseg++;
    g->total += plen;
}

/* TCP "sig" of gro.py: ack, data offset, window, urgent pointer and options equal (flags and checksum are
 * not compared).  Same data offset byte implies the same header length. */
static int tcp_sig_equal(const uint8_t *a, const uint8_t *b, Py_ssize_t t, Py_ssize_t hlen)
{
    return memcmp(a + t + 8, b + t + 8, 5) == 0 && memcmp(a + t + 14, b + t + 14, 2) == 0 &&
           memcmp(a + t + 18, b + t + 18, (size_t)(hlen - t - 18)) == 0;
}

/* Decide the group of packet k (the body of gro.coalesce's loop). */
static void gro_place(gro_ctx *c, const uint8_t *src, const uint8_t *lay, int32_t k, int tcp_on, int udp_on)
{
    const uint8_t *pkt = src + rdn32(lay + 8 * k);
    const Py_ssize_t n = rdn32(lay + 8 * k + 4);
    if (n < 20) {
        group_new(c, k, GSO_NONE);
        return;
    }
    uint8_t key[36];
    int klen, joinable = 1;
    Py_ssize_t t;
    uint8_t proto, kind;
    uint64_t ipsig = 0;
    const int version = pkt[0] >> 4;
    if (version == 4) {
        t = (pkt[0] & 0x0F) * 4;
        proto = pkt[9];
        if ((proto != IPPROTO_TCP_ && proto != IPPROTO_UDP_) || n < t + 8 || t < 20) {
            group_new(c, k, GSO_NONE);
            return;
        }
        memcpy(key, pkt + 12, 8);
        memcpy(key + 8, pkt + t, 4);
        klen = 12;
        if (t != 20 || rd16(pkt + 2) != n || (pkt[6] & 0x3F) || pkt[7])
            joinable = 0; /* IPv4 options, fragments or a length mismatch */
        else
            ipsig = (uint64_t)(pkt[6] & 0x40) << 16 | (uint64_t)pkt[1] << 8 | pkt[8]; /* DF, TOS, TTL */
        kind = proto == IPPROTO_TCP_ ? GSO_TCPV4 : GSO_UDP_L4;
    } else if (version == 6) {
        t = 40;
        proto = pkt[6];
        if ((proto != IPPROTO_TCP_ && proto != IPPROTO_UDP_) || n < 48) {
            group_new(c, k, GSO_NONE);
            return;
        }
        memcpy(key, pkt + 8, 36);
        klen = 36;
        if (rd16(pkt + 4) != n - 40)
            joinable = 0;
        else
            ipsig = (uint64_t)rd32(pkt) << 8 | pkt[7];
        kind = proto == IPPROTO_TCP_ ? GSO_TCPV6 : GSO_UDP_L4;
    } else {
        group_new(c, k, GSO_NONE);
        return;
    }

    flow_t *f = flow_get(c, key, klen, proto);
    if (proto == IPPROTO_TCP_) {
        Py_ssize_t hlen = 0, plen = 0;
        uint8_t flags = 0;
        if (joinable && tcp_on && n >= t + 20) {
            hlen = t + (pkt[t + 12] >> 4) * 4;
            flags = pkt[t + 13];
            plen = n - hlen;
            joinable = hlen >= t + 20 && plen > 0 && (flags == TCP_ACK || flags == (TCP_ACK | TCP_PSH));
        } else {
            joinable = 0;
        }
        if (joinable) {
            const uint32_t seq = rd32(pkt + t + 4);
            const int psh = flags == (TCP_ACK | TCP_PSH);
            if (f->open >= 0) {
                group_t *g = &c->groups[f->open];
                const uint8_t *head = src + rdn32(lay + 8 * g->first);
                if (seq == g->next_seq && plen <= g->gso_size && g->ipsig == ipsig && g->hlen == hlen &&
                    tcp_sig_equal(head, pkt, t, hlen) && g->total + plen <= MAX_GROUP_BYTES &&
                    g->nseg < MAX_SEGMENTS) {
                    group_add(c, g, k, (int32_t)plen);
                    g->next_seq = seq + (uint32_t)plen;
                    if (plen < g->gso_size || psh) {
                        g->psh = (uint8_t)psh;
                        f->open = -1;
                    }
                    return;
                }
                f->open = -1;
            }
            group_t *g = group_new(c, k, kind);
            g->t = (int32_t)t;
            g->hlen = (int32_t)hlen;
            g->gso_size = (int32_t)plen;
            g->total = (int32_t)n;
            g->next_seq = seq + (uint32_t)plen;
            g->ipsig = ipsig;
            g->psh = (uint8_t)psh;
            f->open = psh ? -1 : c->ngroups - 1;
            return;
        }
    } else if (joinable && udp_on && rd16(pkt + t + 4) == n - t && n > t + 8) {
        const Py_ssize_t plen = n - t - 8;
        if (f->open >= 0) {
            group_t *g = &c->groups[f->open];
            if (plen <= g->gso_size && g->ipsig == ipsig && g->total + plen <= MAX_GROUP_BYTES &&
                g->nseg < MAX_SEGMENTS) {
                group_add(c, g, k, (int32_t)plen);
                if (plen < g->gso_size)
                    f->open = -1;
                return;
            }
            f->open = -1;
        }
        group_t *g = group_new(c, k, kind);
        g->t = (int32_t)t;
        g->hlen = (int32_t)(t + 8);
        g->gso_size = (int32_t)plen;
        g->total = (int32_t)n;
        g->ipsig = ipsig;
        f->open = c->ngroups - 1;
        return;
    }
    /* Not joinable: goes out alone, and its flow's open group must not grow past it. */
    f->open = -1;
    group_new(c, k, GSO_NONE);
}

/* Bytes of the frame for group g (virtio header included). */
static inline Py_ssize_t frame_len_of(const group_t *g, const uint8_t *lay)
{
    return VNET_HDR_LEN + (g->nseg == 1 ? rdn32(lay + 8 * g->first + 4) : g->total);
}

/* Write one frame (gro.frame_iov joined) at out; returns its length. */
static Py_ssize_t frame_write(const gro_ctx *c, const group_t *g, const uint8_t *src, const uint8_t *lay,
                              uint8_t *out)
{
    const uint8_t *head = src + rdn32(lay + 8 * g->first);
    if (g->nseg == 1) {
        Py_ssize_t n = rdn32(lay + 8 * g->first + 4);
        memset(out, 0, VNET_HDR_LEN);
        memcpy(out + VNET_HDR_LEN, head, (size_t)n);
        return VNET_HDR_LEN + n;
    }
    const Py_ssize_t t = g->t, hlen = g->hlen, l4_len = g->total - t;
    const int udp = g->kind == GSO_UDP_L4;
    const unsigned csum_offset = udp ? 6 : 16;
    uint8_t *vh = out, *hdr = out + VNET_HDR_LEN;

    vh[0] = NEEDS_CSUM;
    vh[1] = g->kind;
    wrn16(vh + 2, (uint16_t)hlen);
    wrn16(vh + 4, (uint16_t)g->gso_size);
    wrn16(vh + 6, (uint16_t)t);
    wrn16(vh + 8, (uint16_t)csum_offset);

    memcpy(hdr, head, (size_t)hlen);
    if (udp) {
        wr16(hdr + t + 4, (uint32_t)l4_len);
    } else if (g->psh) {
        hdr[t + 13] |= TCP_PSH;
    }
    wr16(hdr + t + csum_offset, 0);
    uint32_t addr_sum;
    if (t == 20 && hdr[0] >> 4 == 4) {
        wr16(hdr + 2, (uint32_t)g->total);
        wr16(hdr + 10, 0);
        wr16(hdr + 10, ~fold16(sum_be(hdr, 20)));
        addr_sum = sum_be(hdr + 12, 8);
    } else {
        wr16(hdr + 4, (uint32_t)(g->total - 40));
        addr_sum = sum_be(hdr + 8, 32);
    }
    /* NEEDS_CSUM: the field carries the folded (uncomplemented) pseudo-header sum. */
    wr16(hdr + t + csum_offset, fold16((uint64_t)addr_sum + (udp ? IPPROTO_UDP_ : IPPROTO_TCP_) + l4_len));

    uint8_t *w = hdr + hlen;
    for (int32_t k = g->first; k >= 0; k = c->member_next[k]) {
        Py_ssize_t n = rdn32(lay + 8 * k + 4) - hlen;
        memcpy(w, src + rdn32(lay + 8 * k) + hlen, (size_t)n);
        w += n;
    }
    return w - out;
}

/* Every (offset, length) pair must lie inside src. */
static int check_layout(const uint8_t *lay, Py_ssize_t count, Py_ssize_t src_len)
{
    for (Py_ssize_t k = 0; k < count; k++) {
        int32_t off = rdn32(lay + 8 * k), len = rdn32(lay + 8 * k + 4);
        if (off < 0 || len < 0 || (Py_ssize_t)off + len > src_len) {
            PyErr_Format(PyExc_ValueError, "packet %zd lies outside src", k);
            return -1;
        }
    }
    return 0;
}

static PyObject *offload_coalesce(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "coalesce() takes 7 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t count;
    if (get_index(args[2], &count) < 0)
        return NULL;
    const int tcp_on = PyObject_IsTrue(args[5]), udp_on = PyObject_IsTrue(args[6]);
    if (tcp_on < 0 || udp_on < 0)
        return NULL;
    buf_arg b[4];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    void *mem = NULL;
    if (get_buf(args[0], &b[0], 0, "src") < 0 || get_buf(args[1], &b[1], 0, "layout") < 0 ||
        get_buf(args[3], &b[2], 1, "dst") < 0 || get_buf(args[4], &b[3], 1, "frames") < 0)
        goto done;
    const uint8_t *src = b[0].view.buf, *lay = b[1].view.buf;
    uint8_t *dst = b[2].view.buf, *frames = b[3].view.buf;

    if (count < 0 || count > b[1].view.len / 8 || count > INT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, count < 0 ? "negative count" : "count beyond the layout");
        goto done;
    }
    if (check_layout(lay, count, b[0].view.len) < 0)
        goto done;
    if (count == 0) {
        result = PyLong_FromLong(0);
        goto done;
    }

    /* Per-call scratch: groups, member links, flow records and a power-of-two hash table (>= 2x count,
     * so chains stay short; reset every call). */
    gro_ctx c = {0};
    size_t nslots = 256;
    while (nslots < (size_t)count * 2 && nslots < ((size_t)1 << 20))
        nslots <<= 1;
    size_t bytes = (size_t)count * (sizeof(group_t) + sizeof(flow_t) + sizeof(int32_t)) +
                   nslots * sizeof(int32_t);
    mem = PyMem_Malloc(bytes);
    if (mem == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    c.groups = mem;
    c.flows = (flow_t *)(c.groups + count);
    c.member_next = (int32_t *)(c.flows + count);
    c.slots = c.member_next + count;
    c.mask = (uint32_t)(nslots - 1);
    memset(c.slots, 0xFF, nslots * sizeof(int32_t));

    for (int32_t k = 0; k < count; k++)
        gro_place(&c, src, lay, k, tcp_on, udp_on);

    Py_ssize_t need = 0;
    for (int32_t j = 0; j < c.ngroups; j++)
        need += frame_len_of(&c.groups[j], lay);
    if (need > b[2].view.len || need > INT32_MAX) {
        PyErr_SetString(PyExc_BufferError, "no room in dst");
        goto done;
    }
    if (c.ngroups > b[3].view.len / 8) {
        PyErr_SetString(PyExc_BufferError, "no room in frames");
        goto done;
    }
    Py_ssize_t off = 0;
    for (int32_t j = 0; j < c.ngroups; j++) {
        Py_ssize_t len = frame_write(&c, &c.groups[j], src, lay, dst + off);
        put_entry(frames, j, off, len);
        off += len;
    }
    result = PyLong_FromLong(c.ngroups);
done:
    PyMem_Free(mem);
    release_bufs(b, 4);
    return result;
}

/* ------------------------------------------------------------------------------------------------------ */

static PyMethodDef offload_methods[] = {
    {"ingest", (PyCFunction)(void (*)(void))offload_ingest, METH_FASTCALL,
     "ingest(frame, frame_len, dst, dst_off, layout, idx) -> (count, next_off)\n\n"
     "Split / checksum / copy one vnet-header TUN read into IP packets at dst[dst_off:]; packet k is\n"
     "recorded as (offset, length) in int32 layout slots 2*(idx+k), 2*(idx+k)+1."},
    {"coalesce", (PyCFunction)(void (*)(void))offload_coalesce, METH_FASTCALL,
     "coalesce(src, layout, count, dst, frames, tcp, udp) -> nframes\n\n"
     "GRO: merge the packets described by layout into vnet-header TUN frames written to dst; frame j is\n"
     "recorded as (offset, length) in int32 frames slots 2*j, 2*j+1."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef offload_module = {
    PyModuleDef_HEAD_INIT, "turbowg.tun._offload",
    "C versions of the TUN GSO split / GRO coalesce (see turbowg/tun/fast.py).", -1, offload_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__offload(void) { return PyModule_Create(&offload_module); }
