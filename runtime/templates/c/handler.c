// {{name}}: a weir handler. Upper-cases each message's text and emits it to the topic named by
// the `output-topic` setting (default `shouted`); an empty message is rejected (dead-lettered).
// Replace the body of exports_weir_stream_handler_handle with your own logic.
//
// Ownership, as wit-bindgen's C generator has it: the handler owns `msg` and frees it; strings
// put into `err` must be malloc'd (consumer_string_dup), the host side frees them.

#include "consumer.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

bool exports_weir_stream_handler_handle(exports_weir_stream_handler_message_t *msg,
                                        exports_weir_stream_handler_failure_t *err) {
  bool ok = false;
  if (msg->payload.len == 0) {
    err->tag = WEIR_STREAM_TYPES_FAILURE_REJECT;
    consumer_string_dup(&err->val.reject, "empty message");
    goto out;
  }
  uint8_t *upper = malloc(msg->payload.len);
  if (!upper) abort();
  for (size_t i = 0; i < msg->payload.len; i++) {
    uint8_t c = msg->payload.ptr[i];
    upper[i] = (c >= 'a' && c <= 'z') ? (uint8_t)(c - 'a' + 'A') : c;
  }
  consumer_string_t setting, topic, emit_err;
  consumer_string_set(&setting, "output-topic");
  bool configured = weir_stream_config_get(&setting, &topic);
  if (!configured) consumer_string_set(&topic, "shouted");
  consumer_list_u8_t payload = {upper, msg->payload.len};
  weir_stream_emit_headers_t no_headers = {NULL, 0};
  consumer_list_u8_t *key = msg->key.is_some ? &msg->key.val : NULL;
  if (weir_stream_emit_send(&topic, key, &payload, &no_headers, &emit_err)) {
    char text[64];
    snprintf(text, sizeof text, "shouted offset %" PRIu64, msg->offset);
    consumer_string_t line;
    consumer_string_set(&line, text);
    weir_stream_log_log(WEIR_STREAM_LOG_LEVEL_DEBUG, &line);
    ok = true;
  } else {
    // The host refused the output (unknown topic, too large): try again later.
    err->tag = WEIR_STREAM_TYPES_FAILURE_RETRY;
    err->val.retry.reason = emit_err;  // handed over: freed after the call returns
    err->val.retry.delay_ms.is_some = false;
  }
  if (configured) consumer_string_free(&topic);
  free(upper);
out:
  exports_weir_stream_handler_message_free(msg);
  return ok;
}
