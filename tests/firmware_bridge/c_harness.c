/* Test harness: drives edge_frame.c from line commands on stdin, answers on stdout.
 *
 *   E version type flags boot seq payload_hex|-   -> wire hex (or "ERR")
 *   D wire_hex                                    -> "F version type flags boot seq payload_hex|-"
 *                                                    per frame, then "X bad_cobs too_short
 *                                                    bad_crc too_large"
 *   HELLO min max caps device_id fw               -> payload hex
 *   EVENT type customer_id|- ts_ms json            -> payload hex
 *   RESULT boot seq status detail|-               -> payload hex
 *   ACK hex | NACK hex                            -> "boot seq [reason text]"
 *   CMD hex                                       -> "SHOW ...", "LED ...", "PARAM ...", "ERR n"
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edge_frame.h"

static size_t unhex(const char *hex, uint8_t *out, size_t cap) {
    if (strcmp(hex, "-") == 0) return 0;
    size_t n = strlen(hex) / 2;
    if (n > cap) n = cap;
    for (size_t i = 0; i < n; i++) {
        unsigned int byte;
        sscanf(hex + 2 * i, "%2x", &byte);
        out[i] = (uint8_t)byte;
    }
    return n;
}

static void put_hex(const uint8_t *data, size_t len) {
    if (len == 0) fputs("-", stdout);
    for (size_t i = 0; i < len; i++) printf("%02x", data[i]);
}

static void put_str(ef_str s) { printf("%.*s", (int)s.len, s.ptr ? s.ptr : ""); }

static const char *dash(const char *s) { return strcmp(s, "-") == 0 ? "" : s; }

static char line[1 << 16];
static uint8_t bytes[1 << 15];
static uint8_t wire[EF_MAX_WIRE];

int main(void) {
    char cmd[16], a[300], b[300], json[1024];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        sscanf(line, "%15s", cmd);
        const char *args = line + strlen(cmd) + 1;
        ef_writer w;
        ef_writer_init(&w, bytes, EF_MAX_PAYLOAD);
        if (strcmp(cmd, "E") == 0) {
            unsigned v, t, f;
            uint32_t boot, seq;
            static char hex[1 << 12];
            sscanf(args, "%u %u %u %" SCNu32 " %" SCNu32 " %4095s", &v, &t, &f, &boot, &seq, hex);
            ef_frame fr = {(uint8_t)v, (uint8_t)t, (uint8_t)f, boot, seq, bytes, 0};
            fr.payload_len = unhex(hex, bytes, sizeof bytes);
            size_t n = ef_encode(&fr, wire, sizeof wire);
            if (n == 0) fputs("ERR", stdout);
            put_hex(wire, n);
        } else if (strcmp(cmd, "D") == 0) {
            size_t n = unhex(args, bytes, sizeof bytes);
            static ef_decoder dec;
            ef_decoder_init(&dec);
            for (size_t i = 0; i < n; i++) {
                ef_frame fr;
                if (ef_decoder_push(&dec, bytes[i], &fr) == EF_FRAME) {
                    printf("F %u %u %u %" PRIu32 " %" PRIu32 " ", fr.version, fr.type, fr.flags,
                           fr.boot_id, fr.seq);
                    put_hex(fr.payload, fr.payload_len);
                    putchar('\n');
                }
            }
            printf("X %" PRIu32 " %" PRIu32 " %" PRIu32 " %" PRIu32, dec.drops[0], dec.drops[1],
                   dec.drops[2], dec.drops[3]);
        } else if (strcmp(cmd, "HELLO") == 0) {
            unsigned lo, hi, caps;
            sscanf(args, "%u %u %u %299s %299s", &lo, &hi, &caps, a, b);
            ef_hello(&w, (uint8_t)lo, (uint8_t)hi, (uint16_t)caps, a, b);
            put_hex(w.buf, w.len);
        } else if (strcmp(cmd, "EVENT") == 0) {
            uint64_t ts;
            sscanf(args, "%299s %299s %" SCNu64 " %1023s", a, b, &ts, json);
            ef_event_prefix(&w, a, dash(b), ts);
            size_t room;
            char *tail = ef_writer_tail(&w, &room);
            ef_writer_advance(&w, (size_t)snprintf(tail, room, "%s", json));
            put_hex(w.buf, w.len);
        } else if (strcmp(cmd, "RESULT") == 0) {
            uint32_t boot, seq;
            unsigned status;
            sscanf(args, "%" SCNu32 " %" SCNu32 " %u %299s", &boot, &seq, &status, a);
            ef_result(&w, boot, seq, (uint8_t)status, dash(a));
            put_hex(w.buf, w.len);
        } else if (strcmp(cmd, "ACK") == 0 || strcmp(cmd, "NACK") == 0) {
            int is_nack = cmd[0] == 'N';
            size_t n = unhex(args, bytes, sizeof bytes);
            ef_ack ack;
            if (ef_parse_ack(bytes, n, is_nack, &ack) != 0) {
                fputs("ERR", stdout);
            } else {
                printf("%" PRIu32 " %" PRIu32, ack.boot_id, ack.seq);
                if (is_nack) {
                    printf(" %u ", ack.reason);
                    put_str(ack.text);
                }
            }
        } else if (strcmp(cmd, "CMD") == 0) {
            size_t n = unhex(args, bytes, sizeof bytes);
            ef_command c;
            int rc = ef_parse_command(bytes, n, &c);
            if (rc != 0) {
                printf("ERR %d", rc);
            } else if (c.kind == EF_CMD_SHOW_SUGGESTION) {
                printf("SHOW %u ", c.u.show.display_s);
                put_str(c.u.show.suggestion_id);
                putchar(' ');
                put_str(c.u.show.customer_id);
                printf(" %u", c.u.show.count);
                for (unsigned i = 0; i < c.u.show.count; i++) {
                    putchar(' ');
                    put_str(c.u.show.sku[i]);
                    printf(" %u", c.u.show.score_permille[i]);
                }
            } else if (c.kind == EF_CMD_SET_LED) {
                printf("LED %u %u %u %u %u %u", c.u.led.led, c.u.led.r, c.u.led.g, c.u.led.b,
                       c.u.led.mode, c.u.led.duration_ms);
            } else {
                fputs("PARAM ", stdout);
                put_str(c.u.param.name);
                putchar(' ');
                put_str(c.u.param.value);
            }
        } else {
            fputs("ERR unknown", stdout);
        }
        putchar('\n');
        fflush(stdout);
    }
    return 0;
}
