/*
 * edge_frame: the serial firmware protocol of the in-store edge agent, for firmware.
 *
 * Allocation-free, C99, no dependencies beyond <stddef.h>/<stdint.h>/<string.h>.
 * Drop edge_frame.h and edge_frame.c into an Arduino sketch or a Zephyr module.
 * The wire format is specified in firmware_bridge/PROTOCOL.md; vectors.json holds the
 * test vectors shared with the agent's Python codec.
 *
 *   wire  = COBS(header | payload | crc32_le) 0x00
 *   header = version u8 | type u8 | flags u8 | boot_id u32le | seq u32le   (11 bytes)
 *   crc32 = CRC-32/ISO-HDLC (zlib, Ethernet; Zephyr crc32_ieee) over header | payload
 *
 * Sending:   ef_frame f = {...}; n = ef_encode(&f, buf, sizeof buf); uart_write(buf, n);
 * Receiving: call ef_decoder_push() for every received byte; it returns EF_FRAME when a
 *            frame is complete (out->payload points into the decoder until the next push).
 */
#ifndef EDGE_FRAME_H
#define EDGE_FRAME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EF_PROTOCOL_VERSION 1
#define EF_HEADER_LEN 11
#define EF_CRC_LEN 4
#define EF_MAX_FRAME 512 /* decoded: header + payload + crc */
#define EF_MAX_PAYLOAD (EF_MAX_FRAME - EF_HEADER_LEN - EF_CRC_LEN)
#define EF_MAX_ENCODED (EF_MAX_FRAME + EF_MAX_FRAME / 254 + 1) /* COBS, no delimiter */
#define EF_MAX_WIRE (EF_MAX_ENCODED + 1)                        /* with the delimiter */

enum ef_type {
    EF_HELLO = 0x01,
    EF_EVENT = 0x02,
    EF_TELEMETRY = 0x03,
    EF_ACK = 0x04,
    EF_NACK = 0x05,
    EF_COMMAND = 0x06,
    EF_RESULT = 0x07,
    EF_PING = 0x08,
    EF_PONG = 0x09
};

enum ef_flag { EF_FLAG_RETRANSMIT = 0x01, EF_FLAG_HELLO_REQUEST = 0x02 };

enum ef_capability {
    EF_CAP_DISPLAY = 0x01,
    EF_CAP_LED = 0x02,
    EF_CAP_PARAMS = 0x04,
    EF_CAP_TELEMETRY = 0x08,
    EF_CAP_PERSISTENT_QUEUE = 0x10
};

enum ef_command_kind { EF_CMD_SHOW_SUGGESTION = 1, EF_CMD_SET_LED = 2, EF_CMD_SET_PARAM = 3 };
enum ef_result_status { EF_OK = 0, EF_UNSUPPORTED = 1, EF_BAD_ARGS = 2, EF_FAILED = 3, EF_BUSY = 4 };
enum ef_nack_reason { EF_NACK_QUARANTINED = 1, EF_NACK_VERSION_UNSUPPORTED = 2 };

typedef struct {
    uint8_t version;
    uint8_t type;
    uint8_t flags;
    uint32_t boot_id;
    uint32_t seq;
    const uint8_t *payload;
    size_t payload_len;
} ef_frame;

/* CRC-32/ISO-HDLC, bitwise (no table). Start with crc = 0; chain calls over pieces. */
uint32_t ef_crc32(uint32_t crc, const uint8_t *data, size_t len);

/* Encode one frame with its 0x00 delimiter into out. Returns the bytes written, or 0 when
 * the payload exceeds EF_MAX_PAYLOAD or out_cap is too small (EF_MAX_WIRE always fits). */
size_t ef_encode(const ef_frame *frame, uint8_t *out, size_t out_cap);

typedef enum {
    EF_NONE = 0,            /* byte consumed, no frame yet */
    EF_FRAME = 1,           /* *out holds a frame whose CRC checked */
    EF_DROP_BAD_COBS = -1,  /* a chunk that is not valid COBS was dropped */
    EF_DROP_TOO_SHORT = -2, /* shorter than header + CRC */
    EF_DROP_BAD_CRC = -3,
    EF_DROP_TOO_LARGE = -4 /* longer than EF_MAX_ENCODED: skipped up to the next 0x00 */
} ef_status;

typedef struct {
    uint8_t buf[EF_MAX_ENCODED];
    size_t len;
    uint8_t skipping;
    uint32_t drops[4]; /* indexed by -status - 1: bad_cobs, too_short, bad_crc, too_large */
} ef_decoder;

void ef_decoder_init(ef_decoder *dec);
/* Feed one received byte. Version and type are left to the caller to check. */
ef_status ef_decoder_push(ef_decoder *dec, uint8_t byte, ef_frame *out);

/* Payload writer: fields are little-endian; str8 is a length byte then UTF-8 bytes. */
typedef struct {
    uint8_t *buf;
    size_t cap;
    size_t len;
    uint8_t overflow; /* set when a put did not fit; the payload must not be sent */
} ef_writer;

void ef_writer_init(ef_writer *w, uint8_t *buf, size_t cap);
void ef_put_u8(ef_writer *w, uint8_t v);
void ef_put_u16(ef_writer *w, uint16_t v);
void ef_put_u32(ef_writer *w, uint32_t v);
void ef_put_u64(ef_writer *w, uint64_t v);
void ef_put_str8(ef_writer *w, const char *s); /* NUL-terminated, at most 255 bytes */
void ef_put_bytes(ef_writer *w, const void *data, size_t len);
/* For snprintf of the JSON body straight into the buffer: free space, then advance. */
char *ef_writer_tail(ef_writer *w, size_t *room);
void ef_writer_advance(ef_writer *w, size_t used);

/* Payload reader; strings are (pointer, length) into the payload, not NUL-terminated. */
typedef struct {
    const uint8_t *buf;
    size_t len;
    size_t pos;
    uint8_t error; /* set by any read past the end */
} ef_reader;

typedef struct {
    const char *ptr;
    uint8_t len;
} ef_str;

void ef_reader_init(ef_reader *r, const uint8_t *buf, size_t len);
uint8_t ef_get_u8(ef_reader *r);
uint16_t ef_get_u16(ef_reader *r);
uint32_t ef_get_u32(ef_reader *r);
uint64_t ef_get_u64(ef_reader *r);
ef_str ef_get_str8(ef_reader *r);

/* Message payloads (PROTOCOL.md, "Payloads"). */
void ef_hello(ef_writer *w, uint8_t proto_min, uint8_t proto_max, uint16_t caps,
              const char *device_id, const char *firmware);
/* The EVENT prefix; append the JSON object of data (via ef_writer_tail) afterwards.
 * customer_id may be NULL or "" for none; ts_ms 0 when the device has no clock. */
void ef_event_prefix(ef_writer *w, const char *type, const char *customer_id, uint64_t ts_ms);
void ef_telemetry_prefix(ef_writer *w, uint64_t ts_ms); /* then the JSON object of values */
void ef_result(ef_writer *w, uint32_t command_boot_id, uint32_t command_seq, uint8_t status,
               const char *detail);

typedef struct {
    uint32_t boot_id;
    uint32_t seq;
    uint8_t reason; /* NACK only */
    ef_str text;    /* NACK only */
} ef_ack;

/* Parse an ACK (is_nack = 0) or a NACK (is_nack = 1) payload. Returns 0 on success. */
int ef_parse_ack(const uint8_t *payload, size_t len, int is_nack, ef_ack *out);

#define EF_MAX_ITEMS 8
typedef struct {
    uint8_t kind;
    union {
        struct {
            uint16_t display_s;
            ef_str suggestion_id;
            ef_str customer_id;
            uint8_t count; /* items beyond EF_MAX_ITEMS are skipped */
            ef_str sku[EF_MAX_ITEMS];
            uint16_t score_permille[EF_MAX_ITEMS];
        } show;
        struct {
            uint8_t led, r, g, b, mode;
            uint16_t duration_ms;
        } led;
        struct {
            ef_str name;
            ef_str value;
        } param;
    } u;
} ef_command;

/* Parse a COMMAND payload. Returns 0, or EF_BAD_ARGS / EF_UNSUPPORTED for the RESULT. */
int ef_parse_command(const uint8_t *payload, size_t len, ef_command *out);

#ifdef __cplusplus
}
#endif

#endif /* EDGE_FRAME_H */
