/*
 * A reference posgate terminal in C, for embedded firmware: MQTT over mutual TLS (libmosquitto),
 * Ed25519 and strict base64url (libsodium), JSON (jansson), the terminal's own key and its
 * certificate request (OpenSSL's libcrypto, which libmosquitto links already).
 *
 *   posgate-terminal --bundle bundle.json --state state.json [--mqtt HOST:PORT] [--key key.pem]
 *   posgate-terminal --new-key key.pem > request.csr
 *   posgate-terminal --check-vectors proto/testdata/confirmation-vectors.json
 *
 * Build (Debian: libmosquitto-dev libsodium-dev libjansson-dev libssl-dev pkg-config):
 *   cc -std=c11 -Wall -Wextra -O2 -o posgate-terminal posgate_terminal.c \
 *      $(pkg-config --cflags --libs libmosquitto libsodium jansson libcrypto)
 *
 * A terminal whose key must never leave it makes the key itself: --new-key writes a new P-256 key
 * (PKCS#8 PEM, mode 0600, never over an existing file) and prints a certificate request (PKCS#10)
 * for it. The operator provisions the terminal with that request (`csr_pem` in `POST
 * /v1/terminals`, or `POST /v1/terminals/{id}/certificate` to renew), and the bundle then has no
 * `key_pem`: the terminal runs with --key. Firmware with a secure element makes the key and signs
 * the request there instead; the rest is the same.
 *
 * The bundle is what `POST /v1/terminals` on posgate's admin API answered. For every message on
 * its payments topic the terminal: verifies it (verify() below, the rules of docs/interfaces.md),
 * shows a seq above the last one shown, writes that seq to the state file (fsync) before acking,
 * and acks every genuine confirmation, repeats included (the gateway sends the next one only after
 * this one is acked). A message that fails verification is never shown and never acked.
 *
 * Output, one line per event on stdout (the same as clients/python):
 *   READY pos-01 | SHOW PAID seq=3 intent=pi_… amount=4.40 usd | REPEAT seq=3 intent=pi_…
 *   ACKED seq=3 intent=pi_… | REFUSED BadSignature topic=…: …
 *
 * Limits a firmware port should know: jansson reads integers as signed 64-bit, so a seq above
 * 2^63 - 1 is refused (BadPayload) rather than accepted; posgate starts at 1 and counts up.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <mosquitto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <signal.h>
#include <sodium.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define KEEPALIVE_SECS 30
#define OFFLINE "{\"state\":\"offline\"}"
#define ONLINE "{\"state\":\"online\"}"

/* ==== verification ========================================================================== */

/* The refusals, named as posgate's verifier names them (proto/src/confirmation.rs). */
enum verdict { OK, MALFORMED, BAD_ALG, BAD_SIGNATURE, BAD_PAYLOAD, WRONG_TERMINAL, OLD_SEQ };
static const char *const VERDICT[] = {"ok", "Malformed", "BadAlg", "BadSignature",
                                      "BadPayload", "WrongTerminal", "OldSeq"};

/* What verify() returns on OK. `payload` owns the strings; json_decref() it when done. */
struct confirmation {
    json_t *payload;
    const char *intent_id, *status, *context, *amount, *currency, *order_id;
    uint64_t seq;
};

/* Strict base64url without padding, as JWS requires: libsodium refuses '=', '+', '/' and
 * non-zero unused bits. Returns a malloc'd buffer (NUL-terminated, for JSON) or NULL. */
static unsigned char *b64url_decode(const char *b64, size_t len, size_t *out_len) {
    unsigned char *out = malloc(len * 3 / 4 + 1);
    if (!out) return NULL;
    if (sodium_base642bin(out, len * 3 / 4 + 1, b64, len, NULL, out_len, NULL,
                          sodium_base64_VARIANT_URLSAFE_NO_PADDING) != 0) {
        free(out);
        return NULL;
    }
    out[*out_len] = '\0';
    return out;
}

/* A JSON integer in [0, max]. JSON true or 7.0 is not one. */
static bool uint_in(json_t *v, uint64_t max, uint64_t *out) {
    if (!json_is_integer(v) || json_integer_value(v) < 0) return false;
    *out = (uint64_t)json_integer_value(v);
    return *out <= max;
}

/* A string member: required, or optional (absent or null gives NULL). */
static bool str_member(json_t *obj, const char *name, bool required, const char **out) {
    json_t *v = json_object_get(obj, name);
    *out = NULL;
    if (!v || json_is_null(v)) return !required;
    if (!json_is_string(v)) return false;
    *out = json_string_value(v);
    return true;
}

static bool one_of(const char *s, const char *const *list) {
    for (; *list; list++)
        if (strcmp(s, *list) == 0) return true;
    return false;
}

/* Checks the payload's members and types; fills c. */
static bool read_payload(json_t *p, struct confirmation *c) {
    static const char *const statuses[] = {"confirmed", "expired", "cancelled", "unresolved", 0};
    static const char *const contexts[] = {"late", "underpaid", "overpaid", "multiple", 0};
    const char *terminal_id, *issued_at, *tx_hash;
    uint64_t v, micros;
    return json_is_object(p) && uint_in(json_object_get(p, "v"), UINT32_MAX, &v) && v == 1 &&
           str_member(p, "terminal_id", true, &terminal_id) &&
           str_member(p, "intent_id", true, &c->intent_id) &&
           uint_in(json_object_get(p, "seq"), UINT64_MAX, &c->seq) &&
           str_member(p, "status", true, &c->status) && one_of(c->status, statuses) &&
           str_member(p, "context", false, &c->context) &&
           (!c->context || one_of(c->context, contexts)) &&
           str_member(p, "amount", true, &c->amount) &&
           uint_in(json_object_get(p, "amount_micros"), UINT64_MAX, &micros) &&
           str_member(p, "currency", true, &c->currency) &&
           str_member(p, "order_id", false, &c->order_id) &&
           str_member(p, "tx_hash", false, &tx_hash) &&
           str_member(p, "issued_at", true, &issued_at);
}

/*
 * Verifies a confirmation (a compact JWS) for terminal_id with the gateway's 32-byte Ed25519 key,
 * in the order of posgate_proto::confirmation::verify; nothing of the payload is trusted before the
 * signature checks out. A seq below min_seq is a replay (OLD_SEQ). On OK, c->payload must be freed.
 */
static enum verdict verify(const char *jws, const unsigned char key[32], const char *terminal_id,
                           uint64_t min_seq, struct confirmation *c) {
    enum verdict result = MALFORMED;
    unsigned char *header_raw = NULL, *payload_raw = NULL, *sig = NULL;
    json_t *header = NULL, *payload = NULL;
    size_t header_len, payload_len, sig_len;
    memset(c, 0, sizeof *c);

    const char *dot1 = strchr(jws, '.');
    const char *dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
    if (!dot2 || strchr(dot2 + 1, '.')) goto out; /* exactly three parts */
    const char *sig_b64 = dot2 + 1;

    header_raw = b64url_decode(jws, (size_t)(dot1 - jws), &header_len);
    if (!header_raw) goto out;
    header = json_loadb((const char *)header_raw, header_len, JSON_REJECT_DUPLICATES, NULL);
    json_t *alg = json_object_get(header, "alg");
    if (!json_is_object(header) || !json_is_string(alg)) goto out;
    /* Only EdDSA, decided before the key is used; `crit` names extensions we must understand,
     * and we understand none. */
    result = BAD_ALG;
    if (strcmp(json_string_value(alg), "EdDSA") != 0 || json_object_get(header, "crit")) goto out;

    result = MALFORMED;
    payload_raw = b64url_decode(dot1 + 1, (size_t)(dot2 - dot1 - 1), &payload_len);
    sig = b64url_decode(sig_b64, strlen(sig_b64), &sig_len);
    if (!payload_raw || !sig) goto out;

    /* The signing input is the first two parts exactly as received. libsodium refuses an S not
     * below the group order and small-order points, as strict verification requires. */
    result = BAD_SIGNATURE;
    if (sig_len != crypto_sign_BYTES ||
        crypto_sign_verify_detached(sig, (const unsigned char *)jws, (size_t)(dot2 - jws), key) != 0)
        goto out;

    result = BAD_PAYLOAD;
    payload = json_loadb((const char *)payload_raw, payload_len, JSON_REJECT_DUPLICATES, NULL);
    if (!read_payload(payload, c)) goto out;
    result = WRONG_TERMINAL;
    if (strcmp(json_string_value(json_object_get(payload, "terminal_id")), terminal_id) != 0)
        goto out;
    result = OLD_SEQ;
    if (c->seq < min_seq) goto out;

    result = OK;
    c->payload = payload;
    payload = NULL;
out:
    free(header_raw);
    free(payload_raw);
    free(sig);
    json_decref(header);
    json_decref(payload);
    return result;
}

/* The gateway's public key from a JWK {"kty":"OKP","crv":"Ed25519","x":…}. */
static bool jwk_key(json_t *jwk, unsigned char key[32]) {
    const char *kty = json_string_value(json_object_get(jwk, "kty"));
    const char *crv = json_string_value(json_object_get(jwk, "crv"));
    const char *x = json_string_value(json_object_get(jwk, "x"));
    size_t len;
    if (!kty || !crv || !x || strcmp(kty, "OKP") != 0 || strcmp(crv, "Ed25519") != 0) return false;
    unsigned char *raw = b64url_decode(x, strlen(x), &len);
    bool ok = raw && len == 32;
    if (ok) memcpy(key, raw, 32);
    free(raw);
    return ok;
}

/* What the cashier sees. */
static const char *headline(const struct confirmation *c) {
    if (strcmp(c->status, "confirmed") == 0) return "PAID";
    if (strcmp(c->status, "expired") == 0) return "EXPIRED";
    if (strcmp(c->status, "cancelled") == 0) return "CANCELLED";
    if (!c->context) return "UNRESOLVED";
    if (strcmp(c->context, "underpaid") == 0) return "UNDERPAID";
    if (strcmp(c->context, "overpaid") == 0) return "OVERPAID";
    if (strcmp(c->context, "late") == 0) return "PAID_LATE";
    return "PAID_MORE_THAN_ONCE";
}

/* ==== test vectors ========================================================================== */

/* Runs every case of proto/testdata/confirmation-vectors.json; 0 when all pass. */
static int check_vectors(const char *path) {
    json_error_t err;
    json_t *file = json_load_file(path, 0, &err);
    unsigned char key[32];
    if (!file || !jwk_key(json_object_get(json_object_get(file, "key"), "jwk"), key)) {
        fprintf(stderr, "%s: %s\n", path, file ? "no key.jwk" : err.text);
        return 2;
    }
    json_t *cases = json_object_get(file, "cases"), *tc;
    size_t i, failed = 0;
    json_array_foreach(cases, i, tc) {
        const char *name = json_string_value(json_object_get(tc, "name"));
        const char *expect = json_string_value(json_object_get(tc, "expect"));
        struct confirmation c;
        enum verdict v = verify(json_string_value(json_object_get(tc, "jws")), key,
                                json_string_value(json_object_get(tc, "terminal_id")),
                                (uint64_t)json_integer_value(json_object_get(tc, "min_seq")), &c);
        /* A valid case must also give exactly the stated payload (unknown members dropped). */
        bool same = true;
        if (v == OK) {
            static const char *const known[] = {
                "v", "terminal_id", "intent_id", "seq", "status", "context", "amount",
                "amount_micros", "currency", "order_id", "tx_hash", "issued_at"};
            json_t *want = json_object_get(tc, "payload"), *got = json_object();
            for (size_t k = 0; k < sizeof known / sizeof *known; k++) {
                json_t *value = json_object_get(c.payload, known[k]);
                if (value && !json_is_null(value)) json_object_set(got, known[k], value);
            }
            same = want && json_equal(want, got);
            json_decref(got);
            json_decref(c.payload);
        }
        if (strcmp(VERDICT[v], expect) == 0 && same) {
            printf("pass %s (%s)\n", name, expect);
        } else {
            failed++;
            printf("FAIL %s: expected %s, got %s%s\n", name, expect, VERDICT[v],
                   same ? "" : " with another payload");
        }
    }
    printf("%zu passed, %zu failed\n", json_array_size(cases) - failed, failed);
    json_decref(file);
    return failed ? 1 : 0;
}

/* ==== the state file ======================================================================== */

/* Durably: a temporary file, fsync'd, renamed over the old one, then the directory fsync'd. A
 * power cut leaves the old file or the new one, never half of one. */
static bool save_state(const char *path, const char *terminal_id, uint64_t seq) {
    char tmp[4096], dir[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) return false;
    json_t *state = json_pack("{s:s, s:I}", "terminal_id", terminal_id, "last_shown_seq",
                              (json_int_t)seq);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    bool ok = state && fd >= 0 && json_dumpfd(state, fd, 0) == 0 && fsync(fd) == 0;
    if (fd >= 0) ok = close(fd) == 0 && ok;
    json_decref(state);
    ok = ok && rename(tmp, path) == 0;
    /* The directory entry too, or the rename may be lost. */
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = '\0'; else snprintf(dir, sizeof dir, ".");
    int dfd = open(dir, O_RDONLY);
    ok = ok && dfd >= 0 && fsync(dfd) == 0;
    if (dfd >= 0) close(dfd);
    return ok;
}

/* The last shown seq: 0 when there is no file yet; false when the file is unusable (starting
 * from 0 would show every queued confirmation as new again). */
static bool load_state(const char *path, const char *terminal_id, uint64_t *seq) {
    json_error_t err;
    *seq = 0;
    if (access(path, F_OK) != 0 && errno == ENOENT) return true;
    json_t *state = json_load_file(path, 0, &err);
    const char *owner = json_string_value(json_object_get(state, "terminal_id"));
    bool ok = owner && strcmp(owner, terminal_id) == 0 &&
              uint_in(json_object_get(state, "last_shown_seq"), INT64_MAX, seq);
    if (!ok)
        fprintf(stderr, "state file %s: unreadable or not terminal %s's (%s); fix or remove it\n",
                path, terminal_id, state ? "wrong content" : err.text);
    json_decref(state);
    return ok;
}

/* ==== the terminal ========================================================================== */

struct terminal {
    const char *terminal_id, *state_path;
    const char *payments, *acks, *status; /* topics from the bundle */
    unsigned char key[32];
    uint64_t last_shown_seq;
    unsigned backoff_secs; /* before the next reconnect: 1, doubling up to 30 */
    struct { int mid; uint64_t seq; char intent_id[80]; } acks_in_flight[16];
};

static volatile sig_atomic_t stopping;
static void on_signal(int sig) { (void)sig; stopping = 1; }

static void on_connect(struct mosquitto *mosq, void *obj, int rc) {
    struct terminal *t = obj;
    if (rc != 0) {
        fprintf(stderr, "connect refused: %s\n", mosquitto_connack_string(rc));
        return;
    }
    t->backoff_secs = 1;
    /* Clean session: subscribe again after every (re)connect. Unacked confirmations are
     * retained and arrive right after the SUBACK. */
    mosquitto_subscribe(mosq, NULL, t->payments, 1);
    mosquitto_publish(mosq, NULL, t->status, (int)strlen(ONLINE), ONLINE, 1, true);
}

static void on_subscribe(struct mosquitto *mosq, void *obj, int mid, int n, const int *granted) {
    struct terminal *t = obj;
    (void)mosq, (void)mid;
    if (n < 1 || granted[0] > 2) {
        /* Not a state to stay in: connected but deaf. A broker may refuse for a while (NATS does
         * while it elects a leader after a node's loss): disconnect, and the loop in main()
         * connects and subscribes again after its backoff. */
        fprintf(stderr, "subscription refused; reconnecting\n");
        mosquitto_publish(mosq, NULL, t->status, (int)strlen(OFFLINE), OFFLINE, 1, true);
        mosquitto_disconnect(mosq);
        return;
    }
    printf("READY %s\n", t->terminal_id);
}

static void on_message(struct mosquitto *mosq, void *obj, const struct mosquitto_message *m) {
    struct terminal *t = obj;
    struct confirmation c;
    /* The gateway clears an acked confirmation with an empty retained publish. */
    if (m->payloadlen == 0) return;
    char *jws = strndup(m->payload, (size_t)m->payloadlen);
    if (!jws || strlen(jws) != (size_t)m->payloadlen) {
        printf("REFUSED Malformed topic=%s: NUL in message\n", m->topic);
        free(jws);
        return;
    }
    bool new = true;
    enum verdict v = verify(jws, t->key, t->terminal_id, t->last_shown_seq + 1, &c);
    if (v == OLD_SEQ) {
        /* Signature and terminal_id checked out (they come before seq): a confirmation already
         * shown, sent again. Ack it, do not show it. */
        new = false;
        v = verify(jws, t->key, t->terminal_id, 0, &c);
    }
    free(jws);
    if (v != OK) {
        printf("REFUSED %s topic=%s\n", VERDICT[v], m->topic);
        return;
    }
    if (new) {
        printf("SHOW %s seq=%" PRIu64 " intent=%s amount=%s %s%s%s\n", headline(&c), c.seq,
               c.intent_id, c.amount, c.currency, c.order_id ? " order=" : "",
               c.order_id ? c.order_id : "");
        /* Saved before the ack: after a power cut the gateway sends it again, and the state
         * file says it was shown. */
        if (!save_state(t->state_path, t->terminal_id, c.seq)) {
            perror("saving the state file; not acking");
            json_decref(c.payload);
            return;
        }
        t->last_shown_seq = c.seq;
    } else {
        printf("REPEAT seq=%" PRIu64 " intent=%s\n", c.seq, c.intent_id);
    }
    json_t *ack_json = json_pack("{s:s, s:I}", "intent_id", c.intent_id, "seq", (json_int_t)c.seq);
    char *ack = json_dumps(ack_json, JSON_COMPACT);
    int mid = 0;
    if (ack && mosquitto_publish(mosq, &mid, t->acks, (int)strlen(ack), ack, 1, false) == 0) {
        /* Remember which confirmation this message id acks, to say so at its PUBACK. */
        int slot = (unsigned)mid % 16;
        t->acks_in_flight[slot].mid = mid;
        t->acks_in_flight[slot].seq = c.seq;
        snprintf(t->acks_in_flight[slot].intent_id, sizeof t->acks_in_flight[slot].intent_id,
                 "%s", c.intent_id);
    }
    free(ack);
    json_decref(ack_json);
    json_decref(c.payload);
}

static void on_publish(struct mosquitto *mosq, void *obj, int mid) {
    struct terminal *t = obj;
    int slot = (unsigned)mid % 16;
    (void)mosq;
    if (t->acks_in_flight[slot].mid == mid && mid != 0) {
        printf("ACKED seq=%" PRIu64 " intent=%s\n", t->acks_in_flight[slot].seq,
               t->acks_in_flight[slot].intent_id);
        t->acks_in_flight[slot].mid = 0;
    }
}

/* Writes pem to dir/name, readable by us only; the path goes to out. */
static bool write_pem(const char *dir, const char *name, const char *pem, char *out, size_t n) {
    snprintf(out, n, "%s/%s", dir, name);
    int fd = open(out, O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0) return false;
    bool ok = pem && write(fd, pem, strlen(pem)) == (ssize_t)strlen(pem);
    return close(fd) == 0 && ok;
}

/* ==== the terminal's own key ================================================================ */

/* What OpenSSL last said, on stderr, after what we were doing. */
static int openssl_failed(const char *doing) {
    unsigned long e = ERR_get_error();
    fprintf(stderr, "%s: %s\n", doing, e ? ERR_reason_error_string(e) : "failed");
    return 1;
}

/*
 * Writes a new P-256 key to path (0600, never over an existing file: a key in use must not be
 * lost to a typo) and prints a certificate request for it on stdout. The gateway takes only the
 * public key from the request and names the certificate itself, so the subject is a placeholder.
 */
static int new_key(const char *path) {
    EVP_PKEY *key = EVP_EC_gen("P-256");
    if (!key) return openssl_failed("generating a P-256 key");
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0) {
        fprintf(stderr, "%s: %s (not replaced)\n", path, strerror(errno));
        EVP_PKEY_free(key);
        return 1;
    }
    FILE *f = fdopen(fd, "w");
    bool written = f && PEM_write_PKCS8PrivateKey(f, key, NULL, NULL, 0, NULL, NULL) == 1 &&
                   fflush(f) == 0 && fsync(fd) == 0;
    if (f ? fclose(f) != 0 : close(fd) != 0) written = false;
    if (!written) {
        unlink(path);
        EVP_PKEY_free(key);
        return openssl_failed("writing the key");
    }
    X509_REQ *req = X509_REQ_new();
    X509_NAME *name = req ? X509_REQ_get_subject_name(req) : NULL;
    bool ok = name && X509_REQ_set_version(req, 0) == 1 &&
              X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                         (const unsigned char *)"posgate-terminal", -1, -1,
                                         0) == 1 &&
              X509_REQ_set_pubkey(req, key) == 1 && X509_REQ_sign(req, key, EVP_sha256()) > 0 &&
              PEM_write_X509_REQ(stdout, req) == 1;
    X509_REQ_free(req);
    EVP_PKEY_free(key);
    return ok ? 0 : openssl_failed("making the certificate request");
}

/* True when key_path holds the private key of the certificate cert_pem: checked at start, so a
 * wrong key file is said at once rather than as a TLS failure on every reconnect. */
static bool key_matches(const char *cert_pem, const char *key_path) {
    BIO *bio = cert_pem ? BIO_new_mem_buf(cert_pem, -1) : NULL;
    X509 *cert = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    FILE *f = fopen(key_path, "r");
    EVP_PKEY *key = f ? PEM_read_PrivateKey(f, NULL, NULL, NULL) : NULL;
    bool ok = cert && key && X509_check_private_key(cert, key) == 1;
    if (!f)
        fprintf(stderr, "%s: %s\n", key_path, strerror(errno));
    else if (!key)
        openssl_failed("reading the key");
    else if (!ok)
        fprintf(stderr, "%s is not the key of the bundle's certificate\n", key_path);
    if (f) fclose(f);
    EVP_PKEY_free(key);
    X509_free(cert);
    BIO_free(bio);
    return ok;
}

static int run(const char *bundle_path, const char *state_path, const char *mqtt_override,
               const char *key_path) {
    json_error_t err;
    json_t *bundle = json_load_file(bundle_path, 0, &err);
    json_t *topics = json_object_get(bundle, "topics");
    struct terminal t = {
        .terminal_id = json_string_value(json_object_get(bundle, "terminal_id")),
        .state_path = state_path,
        .payments = json_string_value(json_object_get(topics, "payments")),
        .acks = json_string_value(json_object_get(topics, "acks")),
        .status = json_string_value(json_object_get(topics, "status")),
        .backoff_secs = 1,
    };
    const char *client_id = json_string_value(json_object_get(bundle, "client_id"));
    const char *url = json_string_value(json_object_get(bundle, "mqtt_url"));
    if (!bundle || !t.terminal_id || !t.payments || !t.acks || !t.status || !client_id || !url ||
        !jwk_key(json_object_get(bundle, "gateway_jwk"), t.key)) {
        fprintf(stderr, "%s: not a provisioning bundle (%s)\n", bundle_path,
                bundle ? "a member is missing" : err.text);
        return 2;
    }
    if (!load_state(state_path, t.terminal_id, &t.last_shown_seq)) return 2;
    /* The bundle's key, or for a terminal provisioned from its own request (no key_pem), the
     * key it made itself. */
    const char *key_pem = json_string_value(json_object_get(bundle, "key_pem"));
    if (!key_path && !key_pem) {
        fprintf(stderr, "the bundle has no key_pem (provisioned from a CSR): pass --key\n");
        return 2;
    }
    if (key_path &&
        !key_matches(json_string_value(json_object_get(bundle, "cert_pem")), key_path))
        return 2;

    /* host:port from --mqtt or from the bundle's mqtts://host:port */
    char host[256];
    int port = 8883;
    const char *hostport = mqtt_override ? mqtt_override : url + strlen("mqtts://");
    if (!mqtt_override && strncmp(url, "mqtts://", 8) != 0) {
        fprintf(stderr, "mqtt_url %s is not mqtts://\n", url);
        return 2;
    }
    snprintf(host, sizeof host, "%s", hostport);
    char *colon = strrchr(host, ':');
    if (colon) {
        *colon = '\0';
        port = atoi(colon + 1);
    }

    /* libmosquitto loads the CA, certificate and key from files: a private directory under
     * $TMPDIR, removed at exit (firmware keeps them in its own secure storage instead). */
    const char *tmpdir = getenv("TMPDIR");
    char dir[4096], ca[4200], cert[4200], key[4200] = "";
    snprintf(dir, sizeof dir, "%s/posgate-terminal-XXXXXX", tmpdir && *tmpdir ? tmpdir : "/tmp");
    if (!mkdtemp(dir)) return perror("mkdtemp"), 2;
    bool pems = write_pem(dir, "ca.pem", json_string_value(json_object_get(bundle, "ca_pem")), ca,
                          sizeof ca) &&
                write_pem(dir, "cert.pem",
                          json_string_value(json_object_get(bundle, "cert_pem")), cert,
                          sizeof cert) &&
                (key_path || write_pem(dir, "key.pem", key_pem, key, sizeof key));

    mosquitto_lib_init();
    /* The broker requires client id = certificate CN = terminal id (the bundle's client_id). */
    struct mosquitto *mosq = mosquitto_new(client_id, true, &t);
    int rc = pems && mosq ? MOSQ_ERR_SUCCESS : MOSQ_ERR_INVAL;
    if (rc == MOSQ_ERR_SUCCESS) {
        mosquitto_int_option(mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
        /* Nagle off: the PUBACK and the ack are two small writes; with Nagle the ack waits for
         * the broker's delayed TCP ACK (up to 40 ms on Linux). */
        mosquitto_int_option(mosq, MOSQ_OPT_TCP_NODELAY, 1);
        mosquitto_connect_callback_set(mosq, on_connect);
        mosquitto_subscribe_callback_set(mosq, on_subscribe);
        mosquitto_message_callback_set(mosq, on_message);
        mosquitto_publish_callback_set(mosq, on_publish);
        /* Retained, QoS 1, on the terminal's own status topic: anything else is refused. */
        rc = mosquitto_will_set(mosq, t.status, (int)strlen(OFFLINE), OFFLINE, 1, true);
    }
    if (rc == MOSQ_ERR_SUCCESS)
        rc = mosquitto_tls_set(mosq, ca, NULL, cert, key_path ? key_path : key, NULL);
    if (rc != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "setting up MQTT/TLS: %s\n", mosquitto_strerror(rc));
    } else {
        signal(SIGTERM, on_signal);
        signal(SIGINT, on_signal);
        rc = mosquitto_connect(mosq, host, port, KEEPALIVE_SECS);
        while (!stopping) {
            if (rc != MOSQ_ERR_SUCCESS) {
                fprintf(stderr, "disconnected: %s; reconnecting in %u s\n",
                        mosquitto_strerror(rc), t.backoff_secs);
                sleep(t.backoff_secs);
                t.backoff_secs = t.backoff_secs >= 15 ? 30 : t.backoff_secs * 2;
                rc = mosquitto_reconnect(mosq);
                continue;
            }
            rc = mosquitto_loop(mosq, 1000, 1);
            if (rc == MOSQ_ERR_ERRNO && errno == EINTR) rc = MOSQ_ERR_SUCCESS;
        }
        /* A clean DISCONNECT suppresses the last will: say offline ourselves first. */
        mosquitto_publish(mosq, NULL, t.status, (int)strlen(OFFLINE), OFFLINE, 1, true);
        mosquitto_loop(mosq, 100, 1);
        mosquitto_disconnect(mosq);
        rc = MOSQ_ERR_SUCCESS;
    }
    mosquitto_destroy(mosq);
    mosquitto_lib_cleanup();
    unlink(ca), unlink(cert);
    if (*key) unlink(key);
    rmdir(dir);
    json_decref(bundle);
    return rc == MOSQ_ERR_SUCCESS ? 0 : 1;
}

static int usage(void) {
    fprintf(stderr, "usage: posgate-terminal --bundle FILE --state FILE [--mqtt HOST:PORT] "
                    "[--key FILE]\n"
                    "       posgate-terminal --new-key FILE > request.csr\n"
                    "       posgate-terminal --check-vectors FILE\n");
    return 64;
}

int main(int argc, char **argv) {
    const char *bundle = NULL, *state = NULL, *mqtt = NULL, *vectors = NULL, *key = NULL,
               *new_key_path = NULL;
    for (int i = 1; i < argc; i++) {
        const char **slot = strcmp(argv[i], "--bundle") == 0          ? &bundle
                            : strcmp(argv[i], "--state") == 0         ? &state
                            : strcmp(argv[i], "--mqtt") == 0          ? &mqtt
                            : strcmp(argv[i], "--check-vectors") == 0 ? &vectors
                            : strcmp(argv[i], "--key") == 0           ? &key
                            : strcmp(argv[i], "--new-key") == 0       ? &new_key_path
                                                                      : NULL;
        if (!slot || ++i == argc) return usage();
        *slot = argv[i];
    }
    setvbuf(stdout, NULL, _IOLBF, 0); /* one line per event, at once, even into a pipe */
    if (sodium_init() < 0) return fprintf(stderr, "libsodium did not initialise\n"), 1;
    if (vectors) return check_vectors(vectors);
    if (new_key_path) return new_key(new_key_path);
    if (!bundle || !state) return usage();
    return run(bundle, state, mqtt, key);
}
