/*
 * edgeft_run: run an edgeft bundle the way a native app would, with llama.cpp's C API.
 *
 *     edgeft_run BUNDLE [--threads N] [--verbose]
 *
 * It reads BUNDLE/manifest.json (schema edgeft.bundle/1), checks the size and SHA-256 of the
 * GGUF file named by model.path against its entry in files, loads it, feeds
 * golden.prompt_token_ids, generates greedily up to golden.max_new_tokens (stopping at an
 * end-of-generation token), prints the text, and compares the token ids with
 * golden.output_token_ids.
 *
 * Exit status: 0 the golden output was reproduced; 1 an error (arguments, manifest, a missing or
 * modified model file, llama.cpp); 2 the model ran but its output differs from the golden output.
 *
 * C11, libc and llama.h only. Build: see README.md beside this file.
 */

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

enum { EXIT_REPRODUCED = 0, EXIT_ERROR = 1, EXIT_MISMATCH = 2 };

#define BUNDLE_SCHEMA "edgeft.bundle/1"
#define MANIFEST_NAME "manifest.json"
#define MAX_MANIFEST_BYTES (16u << 20) /* manifests are a few KiB; refuse anything absurd */
#define MAX_JSON_DEPTH 64              /* the manifest nests 4 deep */
#define MAX_PATH_BYTES 4096
#define HASH_CHUNK_BYTES (1u << 20)
/* The context and batch that edgeft's own llama.cpp runtime used to record the golden output:
 * the model's trained context capped at 4096 tokens, batches of at most 512. */
#define MAX_DEFAULT_CTX 4096
#define MAX_BATCH 512
#define DEFAULT_THREADS 4 /* the big cores of most phones */

static void fail(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fputs("edgeft_run: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
}

/* ---- SHA-256 (FIPS 180-4), streamed -------------------------------------------------------- */

typedef struct {
    uint32_t state[8];
    uint64_t length;          /* bytes hashed so far */
    unsigned char block[64];  /* bytes waiting for a full block */
    size_t filled;
} Sha256;

static const uint32_t SHA256_K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void sha256_compress(uint32_t state[8], const unsigned char block[64]) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++) {
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16 |
               (uint32_t)block[4 * i + 2] << 8 | (uint32_t)block[4 * i + 3];
    }
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
    uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                      SHA256_K[i] + w[i];
        uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    state[0] += a;
    state[1] += b;
    state[2] += c;
    state[3] += d;
    state[4] += e;
    state[5] += f;
    state[6] += g;
    state[7] += h;
}

static void sha256_init(Sha256 *s) {
    static const uint32_t initial[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                        0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->state, initial, sizeof initial);
    s->length = 0;
    s->filled = 0;
}

static void sha256_update(Sha256 *s, const unsigned char *data, size_t n) {
    s->length += n;
    if (s->filled > 0) {
        size_t take = 64 - s->filled < n ? 64 - s->filled : n;
        memcpy(s->block + s->filled, data, take);
        s->filled += take;
        data += take;
        n -= take;
        if (s->filled < 64) {
            return;
        }
        sha256_compress(s->state, s->block);
        s->filled = 0;
    }
    for (; n >= 64; data += 64, n -= 64) {
        sha256_compress(s->state, data);
    }
    memcpy(s->block, data, n);
    s->filled = n;
}

static void sha256_hex(Sha256 *s, char hex[65]) {
    uint64_t bits = s->length * 8;
    s->block[s->filled++] = 0x80;
    if (s->filled > 56) {
        memset(s->block + s->filled, 0, 64 - s->filled);
        sha256_compress(s->state, s->block);
        s->filled = 0;
    }
    memset(s->block + s->filled, 0, 56 - s->filled);
    for (int i = 0; i < 8; i++) {
        s->block[56 + i] = (unsigned char)(bits >> (56 - 8 * i));
    }
    sha256_compress(s->state, s->block);
    for (int i = 0; i < 32; i++) {
        unsigned byte = (s->state[i / 4] >> (24 - 8 * (i % 4))) & 0xff;
        hex[2 * i] = "0123456789abcdef"[byte >> 4];
        hex[2 * i + 1] = "0123456789abcdef"[byte & 0xf];
    }
    hex[64] = '\0';
}

/* Hex SHA-256 and size of a file, read in 1 MiB chunks (a model does not fit in memory twice). */
static bool hash_file(const char *path, char hex[65], unsigned long long *size) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fail("%s: cannot open the model file (%s)", path, strerror(errno));
        return false;
    }
    unsigned char *chunk = malloc(HASH_CHUNK_BYTES);
    if (chunk == NULL) {
        fail("out of memory");
        fclose(f);
        return false;
    }
    Sha256 s;
    sha256_init(&s);
    size_t n;
    while ((n = fread(chunk, 1, HASH_CHUNK_BYTES, f)) > 0) {
        sha256_update(&s, chunk, n);
    }
    bool ok = !ferror(f);
    if (!ok) {
        fail("%s: read error", path);
    }
    free(chunk);
    fclose(f); /* read-only: nothing to lose if close fails */
    if (ok) {
        *size = s.length;
        sha256_hex(&s, hex);
    }
    return ok;
}

/* ---- a small JSON reader for manifest.json ------------------------------------------------- */
/* Enough JSON to walk to a member and read a string, an integer or an array of integers, in any
 * key order and with any whitespace. Every function is given the end of the buffer and returns
 * NULL (or false) instead of reading past it, and nesting is bounded, so a truncated or malformed
 * manifest fails with a message instead of crashing. */

static const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) {
        p++;
    }
    return p;
}

/* p at the opening quote; returns the position after the closing quote. */
static const char *skip_string(const char *p, const char *end) {
    if (p >= end || *p != '"') {
        return NULL;
    }
    for (p++; p < end; p++) {
        if (*p == '\\') {
            p++; /* the escaped character; \uXXXX digits are plain characters */
        } else if (*p == '"') {
            return p + 1;
        } else if ((unsigned char)*p < 0x20) {
            return NULL;
        }
    }
    return NULL;
}

static const char *skip_value(const char *p, const char *end, int depth) {
    p = skip_ws(p, end);
    if (p >= end || depth > MAX_JSON_DEPTH) {
        return NULL;
    }
    if (*p == '"') {
        return skip_string(p, end);
    }
    if (*p == '{' || *p == '[') {
        bool object = *p == '{';
        char close = object ? '}' : ']';
        p = skip_ws(p + 1, end);
        if (p < end && *p == close) {
            return p + 1;
        }
        for (;;) {
            if (object) {
                p = skip_string(p, end);
                p = p ? skip_ws(p, end) : NULL;
                if (p == NULL || p >= end || *p != ':') {
                    return NULL;
                }
                p++;
            }
            p = skip_value(p, end, depth + 1);
            p = p ? skip_ws(p, end) : NULL;
            if (p == NULL || p >= end) {
                return NULL;
            }
            if (*p == close) {
                return p + 1;
            }
            if (*p != ',') {
                return NULL;
            }
            p = skip_ws(p + 1, end);
        }
    }
    const char *start = p; /* a number, true, false or null */
    while (p < end && (isalnum((unsigned char)*p) || *p == '-' || *p == '+' || *p == '.')) {
        p++;
    }
    return p > start ? p : NULL;
}

/* The value of member `key` of the object at p, or NULL: not an object, no such member, or
 * malformed before it. Keys are compared as written (the manifest's keys have no escapes). */
static const char *object_get(const char *p, const char *end, const char *key) {
    size_t key_len = strlen(key);
    p = p ? skip_ws(p, end) : NULL;
    if (p == NULL || p >= end || *p != '{') {
        return NULL;
    }
    p = skip_ws(p + 1, end);
    while (p < end && *p == '"') {
        const char *name = p + 1;
        const char *after = skip_string(p, end);
        if (after == NULL) {
            return NULL;
        }
        bool match = (size_t)(after - 1 - name) == key_len && memcmp(name, key, key_len) == 0;
        p = skip_ws(after, end);
        if (p >= end || *p != ':') {
            return NULL;
        }
        p = skip_ws(p + 1, end);
        if (match) {
            return p;
        }
        p = skip_value(p, end, 1);
        p = p ? skip_ws(p, end) : NULL;
        if (p == NULL || p >= end || *p != ',') {
            return NULL; /* '}' (no such member) or malformed */
        }
        p = skip_ws(p + 1, end);
    }
    return NULL;
}

/* Element `index` of the array at p, or NULL: not an array, too short, or malformed. */
static const char *array_item(const char *p, const char *end, size_t index) {
    p = p ? skip_ws(p, end) : NULL;
    if (p == NULL || p >= end || *p != '[') {
        return NULL;
    }
    p = skip_ws(p + 1, end);
    if (p < end && *p == ']') {
        return NULL;
    }
    for (size_t i = 0; p < end; i++) {
        if (i == index) {
            return p;
        }
        p = skip_value(p, end, 1);
        p = p ? skip_ws(p, end) : NULL;
        if (p == NULL || p >= end || *p != ',') {
            return NULL;
        }
        p = skip_ws(p + 1, end);
    }
    return NULL;
}

/* A JSON integer (no fraction or exponent) that fits a long long. */
static bool read_int(const char *p, const char *end, long long *out) {
    p = p ? skip_ws(p, end) : NULL;
    if (p == NULL) {
        return false;
    }
    bool negative = p < end && *p == '-';
    if (negative) {
        p++;
    }
    if (p >= end || !isdigit((unsigned char)*p)) {
        return false;
    }
    long long value = 0;
    for (; p < end && isdigit((unsigned char)*p); p++) {
        int digit = *p - '0';
        if (value > (LLONG_MAX - digit) / 10) {
            return false;
        }
        value = value * 10 + digit;
    }
    if (p < end && (*p == '.' || *p == 'e' || *p == 'E')) {
        return false;
    }
    *out = negative ? -value : value;
    return true;
}

static bool read_hex4(const char **p, const char *end, unsigned long *out) {
    if (end - *p < 4) {
        return false;
    }
    unsigned long value = 0;
    for (int i = 0; i < 4; i++) {
        char c = (*p)[i];
        int digit = isdigit((unsigned char)c)   ? c - '0'
                    : c >= 'a' && c <= 'f' ? c - 'a' + 10
                    : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                           : -1;
        if (digit < 0) {
            return false;
        }
        value = value * 16 + (unsigned long)digit;
    }
    *p += 4;
    *out = value;
    return true;
}

static size_t utf8_encode(unsigned long cp, char out[4]) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | cp >> 12);
        out[1] = (char)(0x80 | (cp >> 6 & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | cp >> 18);
    out[1] = (char)(0x80 | (cp >> 12 & 0x3f));
    out[2] = (char)(0x80 | (cp >> 6 & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* The JSON string at p, unescaped into out as UTF-8 (Python's json writes non-ASCII as \uXXXX).
 * False if it is not a string, does not fit in cap bytes with its NUL, or contains a NUL. */
static bool read_string(const char *p, const char *end, char *out, size_t cap) {
    p = p ? skip_ws(p, end) : NULL;
    if (p == NULL || p >= end || *p != '"' || cap == 0) {
        return false;
    }
    size_t n = 0;
    for (p++; p < end && *p != '"';) {
        if ((unsigned char)*p < 0x20) {
            return false;
        }
        if (*p != '\\') {
            if (n + 1 >= cap) {
                return false;
            }
            out[n++] = *p++;
            continue;
        }
        if (end - p < 2) {
            return false;
        }
        char escape = p[1];
        unsigned long cp;
        p += 2;
        switch (escape) {
        case '"': cp = '"'; break;
        case '\\': cp = '\\'; break;
        case '/': cp = '/'; break;
        case 'b': cp = '\b'; break;
        case 'f': cp = '\f'; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'u':
            if (!read_hex4(&p, end, &cp)) {
                return false;
            }
            if (cp >= 0xd800 && cp <= 0xdbff) { /* a surrogate pair: \ud83c\udf5a */
                unsigned long low;
                if (end - p < 2 || p[0] != '\\' || p[1] != 'u') {
                    return false;
                }
                p += 2;
                if (!read_hex4(&p, end, &low) || low < 0xdc00 || low > 0xdfff) {
                    return false;
                }
                cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
            } else if (cp >= 0xdc00 && cp <= 0xdfff) {
                return false;
            }
            break;
        default:
            return false;
        }
        char bytes[4];
        size_t len = utf8_encode(cp, bytes);
        if (cp == 0 || n + len >= cap) {
            return false;
        }
        memcpy(out + n, bytes, len);
        n += len;
    }
    if (p >= end) {
        return false;
    }
    out[n] = '\0';
    return true;
}

/* An array of token ids into a new buffer (NULL when empty) that the caller frees. */
static bool read_token_array(const char *p, const char *end, llama_token **out, size_t *n_out) {
    p = p ? skip_ws(p, end) : NULL;
    if (p == NULL || p >= end || *p != '[') {
        return false;
    }
    llama_token *ids = NULL;
    size_t n = 0, cap = 0;
    p = skip_ws(p + 1, end);
    if (p < end && *p == ']') {
        *out = NULL;
        *n_out = 0;
        return true;
    }
    for (;;) {
        long long value;
        if (!read_int(p, end, &value) || value < 0 || value > INT32_MAX) {
            break;
        }
        if (n == cap) {
            size_t grown_cap = cap ? 2 * cap : 64;
            llama_token *grown = realloc(ids, grown_cap * sizeof *ids);
            if (grown == NULL) {
                break;
            }
            ids = grown;
            cap = grown_cap;
        }
        ids[n++] = (llama_token)value;
        p = skip_value(p, end, 1);
        p = p ? skip_ws(p, end) : NULL;
        if (p == NULL || p >= end) {
            break;
        }
        if (*p == ']') {
            *out = ids;
            *n_out = n;
            return true;
        }
        if (*p != ',') {
            break;
        }
        p = skip_ws(p + 1, end);
    }
    free(ids);
    return false;
}

/* ---- the manifest ----------------------------------------------------------------------- */

typedef struct {
    char model_path[MAX_PATH_BYTES]; /* relative to the bundle, '/'-separated */
    char sha256[65];
    long long size;
    llama_token *prompt;
    size_t n_prompt;
    llama_token *expected;
    size_t n_expected;
    long long max_new_tokens;
} Manifest;

static void manifest_free(Manifest *m) {
    free(m->prompt);
    free(m->expected);
    m->prompt = m->expected = NULL;
}

/* The manifest's bytes in a new buffer; it is small, so a size cap guards against a wrong file. */
static char *read_text(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fail("%s: cannot open (%s); is this an edgeft bundle folder?", path, strerror(errno));
        return NULL;
    }
    char *text = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            if (cap >= MAX_MANIFEST_BYTES) {
                fail("%s: larger than %u bytes; not an edgeft manifest", path, MAX_MANIFEST_BYTES);
                goto error;
            }
            cap = cap ? 2 * cap : 1u << 16;
            char *grown = realloc(text, cap);
            if (grown == NULL) {
                fail("out of memory");
                goto error;
            }
            text = grown;
        }
        size_t got = fread(text + n, 1, cap - n, f);
        if (got == 0) {
            break;
        }
        n += got;
    }
    if (ferror(f)) {
        fail("%s: read error", path);
        goto error;
    }
    fclose(f);
    *len = n;
    return text;
error:
    free(text);
    fclose(f);
    return NULL;
}

/* model.path must stay inside the bundle: relative, '/'-separated, no ".." component. */
static bool inside_bundle(const char *path) {
    if (path[0] == '\0' || path[0] == '/' || strchr(path, '\\') != NULL) {
        return false;
    }
    for (const char *part = path; *part != '\0';) {
        size_t len = strcspn(part, "/");
        if (len == 2 && part[0] == '.' && part[1] == '.') {
            return false;
        }
        part += len;
        if (*part == '/') {
            part++;
        }
    }
    return true;
}

/* True for 64 hex digits, which it lowercases to compare with sha256_hex. */
static bool is_sha256_hex(char *s) {
    size_t n = 0;
    for (; s[n] != '\0'; n++) {
        if (!isxdigit((unsigned char)s[n])) {
            return false;
        }
        s[n] = (char)tolower((unsigned char)s[n]);
    }
    return n == 64;
}

static bool missing(const char *field, const char *expected) {
    fail(MANIFEST_NAME ": %s is missing or not %s", field, expected);
    return false;
}

static bool parse_manifest(const char *text, size_t len, Manifest *m) {
    const char *end = text + len;
    char value[64];

    const char *after = skip_value(text, end, 0);
    if (after == NULL || skip_ws(after, end) != end) {
        fail(MANIFEST_NAME ": not valid JSON (truncated or damaged)");
        return false;
    }
    if (!read_string(object_get(text, end, "schema"), end, value, sizeof value) ||
        strcmp(value, BUNDLE_SCHEMA) != 0) {
        return missing("schema", "\"" BUNDLE_SCHEMA "\"");
    }
    const char *model = object_get(text, end, "model");
    if (!read_string(object_get(model, end, "format"), end, value, sizeof value)) {
        return missing("model.format", "a string");
    }
    if (strcmp(value, "gguf") != 0) {
        fail(MANIFEST_NAME ": model.format is \"%s\"; this program runs GGUF bundles", value);
        return false;
    }
    if (!read_string(object_get(model, end, "path"), end, m->model_path, sizeof m->model_path)) {
        return missing("model.path", "a string");
    }
    if (!inside_bundle(m->model_path)) {
        fail(MANIFEST_NAME ": model.path \"%s\" is not a path inside the bundle; refusing it",
             m->model_path);
        return false;
    }

    const char *files = object_get(text, end, "files");
    const char *entry = NULL;
    for (size_t i = 0; (entry = array_item(files, end, i)) != NULL; i++) {
        char path[MAX_PATH_BYTES];
        if (!read_string(object_get(entry, end, "path"), end, path, sizeof path)) {
            fail(MANIFEST_NAME ": files[%zu].path is missing, not a string or too long", i);
            return false;
        }
        if (strcmp(path, m->model_path) == 0) {
            break;
        }
    }
    if (entry == NULL) {
        fail(MANIFEST_NAME ": no entry in files for model.path \"%s\", so nothing to check it "
             "against", m->model_path);
        return false;
    }
    if (!read_string(object_get(entry, end, "sha256"), end, m->sha256, sizeof m->sha256) ||
        !is_sha256_hex(m->sha256)) {
        return missing("the model's files[].sha256", "64 hex digits");
    }
    if (!read_int(object_get(entry, end, "size"), end, &m->size) || m->size < 0) {
        return missing("the model's files[].size", "a byte count");
    }

    const char *golden = object_get(text, end, "golden");
    if (!read_token_array(object_get(golden, end, "prompt_token_ids"), end, &m->prompt,
                          &m->n_prompt) ||
        m->n_prompt == 0) {
        return missing("golden.prompt_token_ids", "a non-empty array of token ids");
    }
    if (!read_token_array(object_get(golden, end, "output_token_ids"), end, &m->expected,
                          &m->n_expected)) {
        return missing("golden.output_token_ids", "an array of token ids");
    }
    if (!read_int(object_get(golden, end, "max_new_tokens"), end, &m->max_new_tokens) ||
        m->max_new_tokens < 0 || m->max_new_tokens > INT32_MAX) {
        return missing("golden.max_new_tokens", "a token count");
    }
    return true;
}

/* ---- llama.cpp -------------------------------------------------------------------------- */

/* llama.cpp logs every load step to stderr; keep its errors (and their continuation lines). */
static void log_errors_only(enum ggml_log_level level, const char *text, void *user_data) {
    static enum ggml_log_level current = GGML_LOG_LEVEL_NONE;
    (void)user_data;
    if (level != GGML_LOG_LEVEL_CONT) {
        current = level;
    }
    if (current == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

/* Writes a token's text (special tokens write nothing, as edgeft's detokenize skips them). */
static bool write_piece(const struct llama_vocab *vocab, llama_token token, FILE *out) {
    char small[128];
    int32_t n = llama_token_to_piece(vocab, token, small, (int32_t)sizeof small, 0, false);
    if (n >= 0) {
        return fwrite(small, 1, (size_t)n, out) == (size_t)n;
    }
    char *big = malloc((size_t)-n); /* -n is the size it needs */
    if (big == NULL) {
        return false;
    }
    int32_t written = llama_token_to_piece(vocab, token, big, -n, 0, false);
    bool ok = written >= 0 && fwrite(big, 1, (size_t)written, out) == (size_t)written;
    free(big);
    return ok;
}

/* Id and text of the token at `index` of ids, or "(end)" past the end. */
static void describe_token(const struct llama_vocab *vocab, const llama_token *ids, size_t n,
                           size_t index) {
    if (index >= n) {
        fputs("(end)", stdout);
        return;
    }
    printf("%d \"", (int)ids[index]);
    if (ids[index] >= 0 && ids[index] < llama_vocab_n_tokens(vocab)) {
        write_piece(vocab, ids[index], stdout);
    }
    fputc('"', stdout);
}

/* Greedy next token from the logits of batch position i; the first maximum wins, as with
 * numpy.argmax in edgeft's runtimes. */
static bool argmax(struct llama_context *ctx, int32_t i, int32_t n_vocab, llama_token *out) {
    const float *logits = llama_get_logits_ith(ctx, i);
    if (logits == NULL) {
        fail("llama_get_logits_ith(%d) returned no logits", (int)i);
        return false;
    }
    llama_token best = 0;
    for (llama_token t = 1; t < n_vocab; t++) {
        if (logits[t] > logits[best]) {
            best = t;
        }
    }
    *out = best;
    return true;
}

/* Puts tokens at positions pos.. of sequence 0 in the batch; only the last one asks for logits. */
static void fill_batch(llama_batch *batch, const llama_token *tokens, int32_t n, llama_pos pos) {
    batch->n_tokens = n;
    for (int32_t i = 0; i < n; i++) {
        batch->token[i] = tokens[i];
        batch->pos[i] = pos + i;
        batch->n_seq_id[i] = 1;
        batch->seq_id[i][0] = 0;
        batch->logits[i] = i == n - 1;
    }
}

static bool decode(struct llama_context *ctx, llama_batch *batch) {
    int32_t status = llama_decode(ctx, *batch);
    if (status != 0) {
        fail("llama_decode failed with status %d", (int)status);
        return false;
    }
    return true;
}

/* Greedy generation of at most max_new tokens after the prompt, stopping before an
 * end-of-generation token; prints each token's text as it comes. out holds max_new tokens. */
static bool generate(struct llama_context *ctx, const struct llama_vocab *vocab,
                     const llama_token *prompt, size_t n_prompt, size_t max_new,
                     llama_token *out, size_t *n_out) {
    int32_t n_batch = (int32_t)llama_n_batch(ctx);
    int32_t n_vocab = llama_vocab_n_tokens(vocab);
    llama_batch batch = llama_batch_init(n_batch, 0, 1);
    if (batch.token == NULL || batch.pos == NULL || batch.seq_id == NULL || batch.logits == NULL) {
        fail("out of memory for a %d-token batch", (int)n_batch);
        llama_batch_free(batch);
        return false;
    }
    bool ok = false;
    llama_pos pos = 0;
    llama_token next = 0;
    *n_out = 0;
    for (size_t start = 0; start < n_prompt; start += (size_t)n_batch) {
        size_t left = n_prompt - start;
        int32_t n = left < (size_t)n_batch ? (int32_t)left : n_batch;
        fill_batch(&batch, prompt + start, n, pos);
        if (!decode(ctx, &batch) || !argmax(ctx, n - 1, n_vocab, &next)) {
            goto done;
        }
        pos += n;
    }
    while (*n_out < max_new && !llama_vocab_is_eog(vocab, next)) {
        out[(*n_out)++] = next;
        if (!write_piece(vocab, next, stdout) || fflush(stdout) != 0) {
            fail("cannot write to stdout");
            goto done;
        }
        if (*n_out == max_new) {
            break; /* the token after the last one is never used */
        }
        fill_batch(&batch, &next, 1, pos++);
        if (!decode(ctx, &batch) || !argmax(ctx, 0, n_vocab, &next)) {
            goto done;
        }
    }
    ok = true;
done:
    llama_batch_free(batch);
    return ok;
}

/* ---- main --------------------------------------------------------------------------------- */

typedef struct {
    const char *bundle;
    int threads;
    bool verbose;
} Options;

static void usage(FILE *out) {
    fputs("usage: edgeft_run BUNDLE [--threads N] [--verbose]\n"
          "Check an edgeft bundle's GGUF model against its manifest, run the golden prompt\n"
          "greedily in llama.cpp and compare the output with the manifest's golden output.\n"
          "Exit status: 0 reproduced, 1 error, 2 output differs.\n",
          out);
}

/* Returns -1 to go on, or the exit status to stop with. */
static int parse_args(int argc, char **argv, Options *opt) {
    opt->bundle = NULL;
    opt->threads = DEFAULT_THREADS;
    opt->verbose = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return EXIT_REPRODUCED;
        } else if (strcmp(argv[i], "--verbose") == 0) {
            opt->verbose = true;
        } else if (strcmp(argv[i], "--threads") == 0) {
            char *rest = NULL;
            long n = i + 1 < argc ? strtol(argv[i + 1], &rest, 10) : 0;
            if (i + 1 >= argc || rest == argv[i + 1] || *rest != '\0' || n < 1 || n > 1024) {
                fail("--threads needs a number of threads from 1 to 1024");
                return EXIT_ERROR;
            }
            opt->threads = (int)n;
            i++;
        } else if (argv[i][0] == '-') {
            fail("unknown option %s", argv[i]);
            usage(stderr);
            return EXIT_ERROR;
        } else if (opt->bundle == NULL) {
            opt->bundle = argv[i];
        } else {
            fail("one bundle at a time (got %s and %s)", opt->bundle, argv[i]);
            return EXIT_ERROR;
        }
    }
    if (opt->bundle == NULL) {
        usage(stderr);
        return EXIT_ERROR;
    }
    return -1;
}

int main(int argc, char **argv) {
    Options opt;
    int status = parse_args(argc, argv, &opt);
    if (status >= 0) {
        return status;
    }
    status = EXIT_ERROR;

    char *text = NULL;
    Manifest m = {0};
    char path[MAX_PATH_BYTES];
    struct llama_model *model = NULL;
    struct llama_context *ctx = NULL;
    llama_token *output = NULL;
    size_t n_output = 0;
    bool backend_ready = false;

    /* 1. The manifest. */
    int written = snprintf(path, sizeof path, "%s/" MANIFEST_NAME, opt.bundle);
    if (written < 0 || (size_t)written >= sizeof path) {
        fail("bundle path too long");
        goto done;
    }
    size_t len = 0;
    text = read_text(path, &len);
    if (text == NULL || !parse_manifest(text, len, &m)) {
        goto done;
    }

    /* 2. The model file is the one the manifest describes, byte for byte. */
    written = snprintf(path, sizeof path, "%s/%s", opt.bundle, m.model_path);
    if (written < 0 || (size_t)written >= sizeof path) {
        fail("model path too long");
        goto done;
    }
    char actual[65];
    unsigned long long size = 0;
    if (!hash_file(path, actual, &size)) {
        goto done;
    }
    if (size != (unsigned long long)m.size) {
        fail("%s: %llu bytes, the manifest says %lld (truncated or replaced); refusing to load it",
             m.model_path, size, m.size);
        goto done;
    }
    if (strcmp(actual, m.sha256) != 0) {
        fail("%s: sha256 mismatch: the file hashes to %s, the manifest says %s (modified); "
             "refusing to load it",
             m.model_path, actual, m.sha256);
        goto done;
    }
    printf("%s: %llu bytes, sha256 matches the manifest\n", m.model_path, size);

    /* 3. Load it in llama.cpp. */
    if (!opt.verbose) {
        llama_log_set(log_errors_only, NULL);
    }
    llama_backend_init();
    backend_ready = true;
    struct llama_model_params model_params = llama_model_default_params();
    /* The golden output was recorded on the CPU; other backends sum in another order and can
     * flip a near-tie in a greedy choice. */
    model_params.n_gpu_layers = 0;
    model = llama_model_load_from_file(path, model_params);
    if (model == NULL) {
        fail("llama.cpp cannot load %s (see its error above)", m.model_path);
        goto done;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int32_t n_vocab = llama_vocab_n_tokens(vocab);
    for (size_t i = 0; i < m.n_prompt; i++) {
        if (m.prompt[i] >= n_vocab) {
            fail(MANIFEST_NAME ": golden.prompt_token_ids[%zu] = %d is not a token of this model "
                 "(%d tokens)", i, (int)m.prompt[i], (int)n_vocab);
            goto done;
        }
    }

    int32_t n_ctx_train = llama_model_n_ctx_train(model);
    uint32_t n_ctx = n_ctx_train > 0 && n_ctx_train < MAX_DEFAULT_CTX ? (uint32_t)n_ctx_train
                                                                      : MAX_DEFAULT_CTX;
    size_t needed = m.n_prompt + (size_t)m.max_new_tokens;
    if (needed > n_ctx) {
        fail("the golden run needs %zu positions; the model's context holds %u", needed,
             (unsigned)n_ctx);
        goto done;
    }
    struct llama_context_params ctx_params = llama_context_default_params();
    ctx_params.n_ctx = n_ctx;
    ctx_params.n_batch = n_ctx < MAX_BATCH ? n_ctx : MAX_BATCH;
    ctx_params.n_ubatch = ctx_params.n_batch;
    ctx_params.n_threads = opt.threads;
    ctx_params.n_threads_batch = opt.threads;
    /* edgeft records golden outputs without flash attention (a different summation order). */
    ctx_params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    ctx_params.no_perf = true;
    ctx = llama_init_from_model(model, ctx_params);
    if (ctx == NULL) {
        fail("llama.cpp cannot create a %u-token context for %s", (unsigned)n_ctx, m.model_path);
        goto done;
    }

    /* 4. Generate and compare. */
    output = malloc(((size_t)m.max_new_tokens + 1) * sizeof *output);
    if (output == NULL) {
        fail("out of memory");
        goto done;
    }
    printf("golden prompt: %zu tokens; generating up to %lld\n", m.n_prompt, m.max_new_tokens);
    if (!generate(ctx, vocab, m.prompt, m.n_prompt, (size_t)m.max_new_tokens, output,
                  &n_output)) {
        goto done;
    }
    putchar('\n');
    size_t at = 0;
    while (at < n_output && at < m.n_expected && output[at] == m.expected[at]) {
        at++;
    }
    if (at == n_output && at == m.n_expected) {
        printf("golden output reproduced (%zu tokens)\n", n_output);
        status = EXIT_REPRODUCED;
    } else {
        printf("golden output differs at token %zu: got ", at);
        describe_token(vocab, output, n_output, at);
        fputs(", the manifest has ", stdout);
        describe_token(vocab, m.expected, m.n_expected, at);
        putchar('\n');
        status = EXIT_MISMATCH;
    }

done:
    free(output);
    if (ctx != NULL) {
        llama_free(ctx);
    }
    if (model != NULL) {
        llama_model_free(model);
    }
    if (backend_ready) {
        llama_backend_free();
    }
    manifest_free(&m);
    free(text);
    if (fflush(stdout) != 0 && status == EXIT_REPRODUCED) {
        status = EXIT_ERROR;
    }
    return status;
}
