/* edge_frame.c: see edge_frame.h. No allocation, no globals, no recursion. */
#include "edge_frame.h"

#include <string.h>

uint32_t ef_crc32(uint32_t crc, const uint8_t *data, size_t len) {
    crc = ~crc;
    while (len--) {
        crc ^= *data++;
        for (int bit = 0; bit < 8; bit++) {
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
        }
    }
    return ~crc;
}

/* Streaming COBS encoder: the frame is encoded from its pieces without a copy. */
typedef struct {
    uint8_t *out;
    size_t cap;
    size_t pos;
    size_t code_pos;
    uint8_t code;
    uint8_t after_full; /* the open block follows a full 254-byte block, not a zero */
    uint8_t overflow;
} cobs_enc;

static void cobs_open(cobs_enc *e, uint8_t after_full) {
    e->code_pos = e->pos++;
    e->code = 1;
    e->after_full = after_full;
    if (e->code_pos >= e->cap) e->overflow = 1;
}

static void cobs_put(cobs_enc *e, uint8_t byte) {
    if (e->overflow) return;
    if (byte == 0) {
        e->out[e->code_pos] = e->code;
        cobs_open(e, 0);
        return;
    }
    if (e->pos >= e->cap) {
        e->overflow = 1;
        return;
    }
    e->out[e->pos++] = byte;
    if (++e->code == 0xFF) {
        e->out[e->code_pos] = e->code;
        cobs_open(e, 1);
    }
}

static void cobs_put_all(cobs_enc *e, const uint8_t *data, size_t len) {
    for (size_t i = 0; i < len; i++) cobs_put(e, data[i]);
}

static void le32(uint8_t *out, uint32_t v) {
    out[0] = (uint8_t)v;
    out[1] = (uint8_t)(v >> 8);
    out[2] = (uint8_t)(v >> 16);
    out[3] = (uint8_t)(v >> 24);
}

static uint32_t rd32(const uint8_t *in) {
    return (uint32_t)in[0] | ((uint32_t)in[1] << 8) | ((uint32_t)in[2] << 16) |
           ((uint32_t)in[3] << 24);
}

size_t ef_encode(const ef_frame *frame, uint8_t *out, size_t out_cap) {
    if (frame->payload_len > EF_MAX_PAYLOAD || out_cap == 0) return 0;
    uint8_t head[EF_HEADER_LEN];
    head[0] = frame->version;
    head[1] = frame->type;
    head[2] = frame->flags;
    le32(head + 3, frame->boot_id);
    le32(head + 7, frame->seq);
    uint8_t crc[EF_CRC_LEN];
    uint32_t sum = ef_crc32(0, head, sizeof head);
    sum = ef_crc32(sum, frame->payload, frame->payload_len);
    le32(crc, sum);

    cobs_enc e = {out, out_cap - 1, 0, 0, 0, 0, 0}; /* keep one byte for the delimiter */
    cobs_open(&e, 0);
    cobs_put_all(&e, head, sizeof head);
    cobs_put_all(&e, frame->payload, frame->payload_len);
    cobs_put_all(&e, crc, sizeof crc);
    if (e.overflow) return 0;
    if (e.code == 1 && e.after_full) {
        e.pos = e.code_pos; /* a full block at the very end needs no empty block after it */
    } else {
        out[e.code_pos] = e.code;
    }
    out[e.pos++] = 0;
    return e.pos;
}

void ef_decoder_init(ef_decoder *dec) { memset(dec, 0, sizeof *dec); }

static ef_status drop(ef_decoder *dec, ef_status why) {
    dec->drops[-why - 1]++;
    return why;
}

/* Decode COBS in place (the output never overtakes the input). Returns length or -1. */
static long cobs_decode_in_place(uint8_t *buf, size_t len) {
    size_t read = 0, write = 0;
    while (read < len) {
        uint8_t code = buf[read++];
        if (code == 0 || read + code - 1 > len) return -1;
        for (uint8_t i = 1; i < code; i++) buf[write++] = buf[read++];
        if (code != 0xFF && read < len) buf[write++] = 0;
    }
    return (long)write;
}

static ef_status finish_chunk(ef_decoder *dec, ef_frame *out) {
    long n = cobs_decode_in_place(dec->buf, dec->len);
    if (n < 0) return drop(dec, EF_DROP_BAD_COBS);
    size_t size = (size_t)n;
    if (size < EF_HEADER_LEN + EF_CRC_LEN) return drop(dec, EF_DROP_TOO_SHORT);
    if (ef_crc32(0, dec->buf, size - EF_CRC_LEN) != rd32(dec->buf + size - EF_CRC_LEN)) {
        return drop(dec, EF_DROP_BAD_CRC);
    }
    out->version = dec->buf[0];
    out->type = dec->buf[1];
    out->flags = dec->buf[2];
    out->boot_id = rd32(dec->buf + 3);
    out->seq = rd32(dec->buf + 7);
    out->payload = dec->buf + EF_HEADER_LEN;
    out->payload_len = size - EF_HEADER_LEN - EF_CRC_LEN;
    return EF_FRAME;
}

ef_status ef_decoder_push(ef_decoder *dec, uint8_t byte, ef_frame *out) {
    if (byte != 0) {
        if (dec->skipping) return EF_NONE;
        if (dec->len >= EF_MAX_ENCODED) {
            dec->skipping = 1;
            dec->len = 0;
            return drop(dec, EF_DROP_TOO_LARGE);
        }
        dec->buf[dec->len++] = byte;
        return EF_NONE;
    }
    size_t len = dec->len;
    uint8_t was_skipping = dec->skipping;
    dec->len = 0;
    dec->skipping = 0;
    if (was_skipping || len == 0) return EF_NONE; /* an empty chunk is idle, not a drop */
    dec->len = len;
    ef_status status = finish_chunk(dec, out);
    dec->len = 0;
    return status;
}

/* ---- payload writer and reader ------------------------------------------------------ */

void ef_writer_init(ef_writer *w, uint8_t *buf, size_t cap) {
    w->buf = buf;
    w->cap = cap;
    w->len = 0;
    w->overflow = 0;
}

void ef_put_bytes(ef_writer *w, const void *data, size_t len) {
    if (w->overflow || w->cap - w->len < len) {
        w->overflow = 1;
        return;
    }
    memcpy(w->buf + w->len, data, len);
    w->len += len;
}

void ef_put_u8(ef_writer *w, uint8_t v) { ef_put_bytes(w, &v, 1); }

void ef_put_u16(ef_writer *w, uint16_t v) {
    uint8_t b[2] = {(uint8_t)v, (uint8_t)(v >> 8)};
    ef_put_bytes(w, b, 2);
}

void ef_put_u32(ef_writer *w, uint32_t v) {
    uint8_t b[4];
    le32(b, v);
    ef_put_bytes(w, b, 4);
}

void ef_put_u64(ef_writer *w, uint64_t v) {
    ef_put_u32(w, (uint32_t)v);
    ef_put_u32(w, (uint32_t)(v >> 32));
}

void ef_put_str8(ef_writer *w, const char *s) {
    size_t len = s ? strlen(s) : 0;
    if (len > 255) {
        w->overflow = 1;
        return;
    }
    ef_put_u8(w, (uint8_t)len);
    ef_put_bytes(w, s, len);
}

char *ef_writer_tail(ef_writer *w, size_t *room) {
    *room = w->overflow ? 0 : w->cap - w->len;
    return (char *)w->buf + w->len;
}

void ef_writer_advance(ef_writer *w, size_t used) {
    if (w->overflow || used > w->cap - w->len) {
        w->overflow = 1; /* snprintf truncated: the JSON would be cut, don't send it */
        return;
    }
    w->len += used;
}

void ef_reader_init(ef_reader *r, const uint8_t *buf, size_t len) {
    r->buf = buf;
    r->len = len;
    r->pos = 0;
    r->error = 0;
}

static const uint8_t *take(ef_reader *r, size_t n) {
    if (r->error || r->len - r->pos < n) {
        r->error = 1;
        return NULL;
    }
    const uint8_t *p = r->buf + r->pos;
    r->pos += n;
    return p;
}

uint8_t ef_get_u8(ef_reader *r) {
    const uint8_t *p = take(r, 1);
    return p ? p[0] : 0;
}

uint16_t ef_get_u16(ef_reader *r) {
    const uint8_t *p = take(r, 2);
    if (!p) return 0;
    return (uint16_t)(p[0] | (p[1] << 8));
}

uint32_t ef_get_u32(ef_reader *r) {
    const uint8_t *p = take(r, 4);
    return p ? rd32(p) : 0;
}

uint64_t ef_get_u64(ef_reader *r) {
    uint64_t low = ef_get_u32(r);
    return low | ((uint64_t)ef_get_u32(r) << 32);
}

ef_str ef_get_str8(ef_reader *r) {
    ef_str s = {NULL, 0};
    uint8_t len = ef_get_u8(r);
    const uint8_t *p = take(r, len);
    if (p) {
        s.ptr = (const char *)p;
        s.len = len;
    }
    return s;
}

/* ---- message payloads ---------------------------------------------------------------- */

void ef_hello(ef_writer *w, uint8_t proto_min, uint8_t proto_max, uint16_t caps,
              const char *device_id, const char *firmware) {
    ef_put_u8(w, proto_min);
    ef_put_u8(w, proto_max);
    ef_put_u16(w, caps);
    ef_put_str8(w, device_id);
    ef_put_str8(w, firmware);
}

void ef_event_prefix(ef_writer *w, const char *type, const char *customer_id, uint64_t ts_ms) {
    ef_put_str8(w, type);
    ef_put_str8(w, customer_id);
    ef_put_u64(w, ts_ms);
}

void ef_telemetry_prefix(ef_writer *w, uint64_t ts_ms) { ef_put_u64(w, ts_ms); }

void ef_result(ef_writer *w, uint32_t command_boot_id, uint32_t command_seq, uint8_t status,
               const char *detail) {
    ef_put_u32(w, command_boot_id);
    ef_put_u32(w, command_seq);
    ef_put_u8(w, status);
    ef_put_str8(w, detail);
}

int ef_parse_ack(const uint8_t *payload, size_t len, int is_nack, ef_ack *out) {
    ef_reader r;
    ef_reader_init(&r, payload, len);
    out->boot_id = ef_get_u32(&r);
    out->seq = ef_get_u32(&r);
    out->reason = 0;
    out->text.ptr = NULL;
    out->text.len = 0;
    if (is_nack) {
        out->reason = ef_get_u8(&r);
        out->text = ef_get_str8(&r);
    }
    return (r.error || r.pos != r.len) ? -1 : 0;
}

int ef_parse_command(const uint8_t *payload, size_t len, ef_command *out) {
    ef_reader r;
    ef_reader_init(&r, payload, len);
    memset(out, 0, sizeof *out);
    out->kind = ef_get_u8(&r);
    switch (out->kind) {
    case EF_CMD_SHOW_SUGGESTION: {
        out->u.show.display_s = ef_get_u16(&r);
        out->u.show.suggestion_id = ef_get_str8(&r);
        out->u.show.customer_id = ef_get_str8(&r);
        uint8_t count = ef_get_u8(&r);
        for (uint8_t i = 0; i < count; i++) {
            ef_str sku = ef_get_str8(&r);
            uint16_t score = ef_get_u16(&r);
            if (i < EF_MAX_ITEMS) {
                out->u.show.sku[i] = sku;
                out->u.show.score_permille[i] = score;
            }
        }
        out->u.show.count = count < EF_MAX_ITEMS ? count : EF_MAX_ITEMS;
        break;
    }
    case EF_CMD_SET_LED:
        out->u.led.led = ef_get_u8(&r);
        out->u.led.r = ef_get_u8(&r);
        out->u.led.g = ef_get_u8(&r);
        out->u.led.b = ef_get_u8(&r);
        out->u.led.mode = ef_get_u8(&r);
        out->u.led.duration_ms = ef_get_u16(&r);
        break;
    case EF_CMD_SET_PARAM:
        out->u.param.name = ef_get_str8(&r);
        out->u.param.value = ef_get_str8(&r);
        break;
    default:
        return r.error ? EF_BAD_ARGS : EF_UNSUPPORTED;
    }
    return (r.error || r.pos != r.len) ? EF_BAD_ARGS : 0;
}
