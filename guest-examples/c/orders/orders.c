// `orders` in C: the same handler as guest-examples/rust/orders.
//
// Reads an order as JSON, emits a confirmation to the output topic (config key `output-topic`,
// default `confirmations`), asks for a retry while a transient condition holds, and rejects
// what can never succeed. An order with `"trap": true` executes `unreachable` (a trap).
//
// Build: ./build.sh (Debian's clang for wasm32-wasi, wasi-libc, wit-bindgen's C generator and
// `wasm-tools component new` with the WASI preview 1 adapter).
//
// Ownership, as wit-bindgen's C generator has it: the handler owns `msg` and frees it; strings
// put into `err` are malloc'd and freed by the generated post-return function.

#include "consumer.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---- a small JSON reader: one flat object, strings decoded, other values skipped ----

typedef struct {
  const uint8_t *p, *end;
} cursor_t;

typedef struct {
  char *data;
  size_t len, cap;
} buf_t;

static void buf_push(buf_t *b, const char *s, size_t n) {
  if (b->len + n + 1 > b->cap) {
    b->cap = (b->len + n + 1) * 2;
    b->data = realloc(b->data, b->cap);
    if (!b->data) abort();
  }
  memcpy(b->data + b->len, s, n);
  b->len += n;
  b->data[b->len] = 0;
}

static void ws(cursor_t *c) {
  while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

static int hex4(cursor_t *c, uint32_t *out) {
  if (c->end - c->p < 4) return 0;
  uint32_t v = 0;
  for (int i = 0; i < 4; i++) {
    uint8_t h = *c->p++;
    v <<= 4;
    if (h >= '0' && h <= '9') v |= h - '0';
    else if (h >= 'a' && h <= 'f') v |= h - 'a' + 10;
    else if (h >= 'A' && h <= 'F') v |= h - 'A' + 10;
    else return 0;
  }
  *out = v;
  return 1;
}

static void utf8(buf_t *b, uint32_t cp) {
  char s[4];
  size_t n;
  if (cp < 0x80) { s[0] = (char)cp; n = 1; }
  else if (cp < 0x800) { s[0] = (char)(0xC0 | (cp >> 6)); s[1] = (char)(0x80 | (cp & 0x3F)); n = 2; }
  else if (cp < 0x10000) { s[0] = (char)(0xE0 | (cp >> 12)); s[1] = (char)(0x80 | ((cp >> 6) & 0x3F)); s[2] = (char)(0x80 | (cp & 0x3F)); n = 3; }
  else { s[0] = (char)(0xF0 | (cp >> 18)); s[1] = (char)(0x80 | ((cp >> 12) & 0x3F)); s[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); s[3] = (char)(0x80 | (cp & 0x3F)); n = 4; }
  buf_push(b, s, n);
}

// Reads a string (the cursor is on its opening quote); `out` may be NULL to skip it.
static int string(cursor_t *c, buf_t *out) {
  buf_t skip = {0};
  buf_t *b = out ? out : &skip;
  if (c->p >= c->end || *c->p != '"') return 0;
  c->p++;
  buf_push(b, "", 0);
  while (c->p < c->end) {
    uint8_t ch = *c->p++;
    if (ch == '"') { free(skip.data); return 1; }
    if (ch < 0x20) break;
    if (ch != '\\') { buf_push(b, (const char *)&ch, 1); continue; }
    if (c->p >= c->end) break;
    uint8_t e = *c->p++;
    const char *simple = NULL;
    switch (e) {
      case '"': simple = "\""; break;
      case '\\': simple = "\\"; break;
      case '/': simple = "/"; break;
      case 'b': simple = "\b"; break;
      case 'f': simple = "\f"; break;
      case 'n': simple = "\n"; break;
      case 'r': simple = "\r"; break;
      case 't': simple = "\t"; break;
      case 'u': {
        uint32_t cp;
        if (!hex4(c, &cp)) goto fail;
        if (cp >= 0xD800 && cp < 0xDC00) {
          uint32_t lo;
          if (c->end - c->p < 6 || c->p[0] != '\\' || c->p[1] != 'u') goto fail;
          c->p += 2;
          if (!hex4(c, &lo) || lo < 0xDC00 || lo > 0xDFFF) goto fail;
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        } else if (cp >= 0xDC00 && cp < 0xE000) {
          goto fail;
        }
        utf8(b, cp);
        continue;
      }
      default: goto fail;
    }
    buf_push(b, simple, 1);
  }
fail:
  free(skip.data);
  return 0;
}

static int value(cursor_t *c, int depth);

static int literal(cursor_t *c, const char *word) {
  size_t n = strlen(word);
  if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0) return 0;
  c->p += n;
  return 1;
}

// A number; `whole` receives it when it is a non-negative integer that fits (else -1 stays).
static int number(cursor_t *c, int64_t *whole) {
  const uint8_t *start = c->p;
  int negative = 0, fraction = 0;
  if (c->p < c->end && *c->p == '-') { negative = 1; c->p++; }
  uint64_t v = 0;
  int digits = 0, overflow = 0;
  while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
    if (v > (UINT64_MAX - 9) / 10) overflow = 1;
    v = v * 10 + (*c->p - '0');
    c->p++;
    digits++;
  }
  if (!digits) return 0;
  if (c->p < c->end && *c->p == '.') {
    fraction = 1;
    c->p++;
    if (c->p >= c->end || *c->p < '0' || *c->p > '9') return 0;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') c->p++;
  }
  if (c->p < c->end && (*c->p == 'e' || *c->p == 'E')) {
    fraction = 1;
    c->p++;
    if (c->p < c->end && (*c->p == '+' || *c->p == '-')) c->p++;
    if (c->p >= c->end || *c->p < '0' || *c->p > '9') return 0;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') c->p++;
  }
  if (whole) *whole = (negative || fraction || overflow || v > INT64_MAX) ? -1 : (int64_t)v;
  (void)start;
  return 1;
}

static int container(cursor_t *c, int depth, uint8_t close) {
  c->p++;
  ws(c);
  if (c->p < c->end && *c->p == close) { c->p++; return 1; }
  for (;;) {
    if (close == '}') {
      if (!string(c, NULL)) return 0;
      ws(c);
      if (c->p >= c->end || *c->p != ':') return 0;
      c->p++;
    }
    if (!value(c, depth + 1)) return 0;
    ws(c);
    if (c->p < c->end && *c->p == ',') { c->p++; ws(c); continue; }
    if (c->p < c->end && *c->p == close) { c->p++; return 1; }
    return 0;
  }
}

static int value(cursor_t *c, int depth) {
  if (depth > 64) return 0;
  ws(c);
  if (c->p >= c->end) return 0;
  switch (*c->p) {
    case '"': return string(c, NULL);
    case '{': return container(c, depth, '}');
    case '[': return container(c, depth, ']');
    case 't': return literal(c, "true");
    case 'f': return literal(c, "false");
    case 'n': return literal(c, "null");
    default: return number(c, NULL);
  }
}

typedef struct {
  buf_t id, customer;
  int has_id, has_customer, has_amount;
  int64_t amount_cents;
  int transient, trap;
} order_t;

static void order_free(order_t *o) {
  free(o->id.data);
  free(o->customer.data);
}

// Returns NULL on success, else what is wrong (a static string).
static const char *parse_order(const uint8_t *p, size_t len, order_t *o) {
  cursor_t c = {p, p + len};
  memset(o, 0, sizeof *o);
  ws(&c);
  if (c.p >= c.end || *c.p != '{') return "expected a JSON object";
  c.p++;
  ws(&c);
  if (c.p < c.end && *c.p == '}') { c.p++; goto done; }
  for (;;) {
    buf_t name = {0};
    if (!string(&c, &name)) { free(name.data); return "expected a field name"; }
    ws(&c);
    if (c.p >= c.end || *c.p != ':') { free(name.data); return "expected `:`"; }
    c.p++;
    ws(&c);
    const char *field = name.data ? name.data : "";
    int ok;
    if (!strcmp(field, "id") || !strcmp(field, "customer")) {
      int is_id = !strcmp(field, "id");
      buf_t *into = is_id ? &o->id : &o->customer;
      if (is_id ? o->has_id : o->has_customer) { free(name.data); return "a field appears twice"; }
      ok = string(&c, into);
      if (!ok) { free(name.data); return is_id ? "`id` must be a string" : "`customer` must be a string"; }
      if (is_id) o->has_id = 1; else o->has_customer = 1;
    } else if (!strcmp(field, "amount_cents")) {
      int64_t v = -1;
      if (c.p >= c.end || !((*c.p >= '0' && *c.p <= '9') || *c.p == '-') || !number(&c, &v) || v < 0) {
        free(name.data);
        return "`amount_cents` must be a whole number of cents";
      }
      o->amount_cents = v;
      o->has_amount = 1;
      ok = 1;
    } else if (!strcmp(field, "transient") || !strcmp(field, "trap")) {
      int *flag = !strcmp(field, "trap") ? &o->trap : &o->transient;
      if (literal(&c, "true")) { *flag = 1; ok = 1; }
      else if (literal(&c, "false")) { *flag = 0; ok = 1; }
      else { free(name.data); return "`transient` and `trap` must be true or false"; }
    } else {
      ok = value(&c, 1);
    }
    free(name.data);
    if (!ok) return "malformed JSON";
    ws(&c);
    if (c.p < c.end && *c.p == ',') { c.p++; ws(&c); continue; }
    if (c.p < c.end && *c.p == '}') { c.p++; break; }
    return "expected `,` or `}`";
  }
done:
  ws(&c);
  if (c.p != c.end) return "trailing characters after the object";
  if (!o->has_id) return "missing field `id`";
  if (!o->has_customer) return "missing field `customer`";
  if (!o->has_amount) return "missing field `amount_cents`";
  return NULL;
}

static void json_string(buf_t *b, const buf_t *s) {
  buf_push(b, "\"", 1);
  for (size_t i = 0; i < s->len; i++) {
    unsigned char ch = (unsigned char)s->data[i];
    char esc[8];
    if (ch == '"') buf_push(b, "\\\"", 2);
    else if (ch == '\\') buf_push(b, "\\\\", 2);
    else if (ch < 0x20) { snprintf(esc, sizeof esc, "\\u%04x", ch); buf_push(b, esc, 6); }
    else buf_push(b, (const char *)&ch, 1);
  }
  buf_push(b, "\"", 1);
}

// ---- the handler ----

static void set_reject(exports_weir_stream_handler_failure_t *err, const char *reason) {
  err->tag = WEIR_STREAM_TYPES_FAILURE_REJECT;
  consumer_string_dup(&err->val.reject, reason);
}

static void set_retry(exports_weir_stream_handler_failure_t *err, const char *reason, size_t n,
                      int has_delay, uint64_t delay_ms) {
  err->tag = WEIR_STREAM_TYPES_FAILURE_RETRY;
  consumer_string_dup_n(&err->val.retry.reason, reason, n);
  err->val.retry.delay_ms.is_some = has_delay;
  err->val.retry.delay_ms.val = delay_ms;
}

bool exports_weir_stream_handler_handle(exports_weir_stream_handler_message_t *msg,
                                        exports_weir_stream_handler_failure_t *err) {
  order_t o;
  char reason[256];
  bool ok = false;
  const char *bad = parse_order(msg->payload.ptr, msg->payload.len, &o);
  if (bad) {
    snprintf(reason, sizeof reason, "not a valid order: %s", bad);
    set_reject(err, reason);
    goto out;
  }
  if (o.amount_cents == 0) {
    snprintf(reason, sizeof reason, "order %s has no amount", o.id.data);
    set_reject(err, reason);
    goto out;
  }
  if (o.trap) {
    fprintf(stderr, "asked to trap at offset %" PRIu64 "\n", msg->offset);
    __builtin_trap();
  }
  if (o.transient && msg->attempt < 2) {
    int n = snprintf(reason, sizeof reason, "payment service busy for order %s", o.id.data);
    set_retry(err, reason, n < 0 ? 0 : ((size_t)n < sizeof reason ? (size_t)n : sizeof reason - 1), 1, 10);
    goto out;
  }

  buf_t out = {0};
  char amount[32];
  buf_push(&out, "{\"order_id\":", 12);
  json_string(&out, &o.id);
  buf_push(&out, ",\"customer\":", 12);
  json_string(&out, &o.customer);
  int an = snprintf(amount, sizeof amount, ",\"amount_cents\":%" PRId64, o.amount_cents);
  buf_push(&out, amount, (size_t)an);
  buf_push(&out, ",\"status\":\"confirmed\"}", 22);

  consumer_string_t key_name, topic, emit_err;
  consumer_option_string_t configured = {0};
  consumer_string_set(&key_name, "output-topic");
  if (weir_stream_config_get(&key_name, &configured.val)) {
    topic = configured.val;
  } else {
    consumer_string_set(&topic, "confirmations");
  }
  char offset[24];
  int on = snprintf(offset, sizeof offset, "%" PRIu64, msg->offset);
  consumer_tuple2_string_list_u8_t header;
  consumer_string_set(&header.f0, "source-offset");
  header.f1.ptr = (uint8_t *)offset;
  header.f1.len = (size_t)on;
  weir_stream_emit_headers_t headers = {&header, 1};
  consumer_option_list_u8_t key = {true, {(uint8_t *)o.id.data, o.id.len}};
  consumer_list_u8_t payload = {(uint8_t *)out.data, out.len};
  if (weir_stream_emit_send(&topic, &key.val, &payload, &headers, &emit_err)) {
    consumer_string_t line;
    char text[200];
    snprintf(text, sizeof text, "confirmed order %s", o.id.data);
    consumer_string_set(&line, text);
    weir_stream_log_log(WEIR_STREAM_LOG_LEVEL_DEBUG, &line);
    ok = true;
    // A request (`weir request`, a `reply-to` header) gets the confirmation as its answer.
    bool asked = false;
    for (size_t i = 0; i < msg->headers.len; i++) {
      consumer_string_t *name = &msg->headers.ptr[i].f0;
      if (name->len == 8 && memcmp(name->ptr, "reply-to", 8) == 0) asked = true;
    }
    if (asked) {
      weir_stream_reply_headers_t none = {NULL, 0};
      consumer_string_t reply_err;
      if (!weir_stream_reply_send(&payload, &none, &reply_err)) {
        set_reject(err, "cannot answer the request");
        consumer_string_free(&reply_err);
        ok = false;
      }
    }
  } else {
    set_retry(err, (const char *)emit_err.ptr, emit_err.len, 0, 0);
    consumer_string_free(&emit_err);
  }
  if (configured.val.ptr) consumer_string_free(&configured.val);
  free(out.data);
out:
  order_free(&o);
  exports_weir_stream_handler_message_free(msg);
  return ok;
}
