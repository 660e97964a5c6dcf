// {{name}}: a weir handler. Upper-cases each message's text and emits it to the topic named by
// the `output-topic` setting (default `shouted`); an empty message is rejected (dead-lettered).
// Replace `handle` with your own logic.
//
// jco's conventions: a `result` is { tag: "ok" } or { tag: "err", val }; the failure variant is
// { tag: "retry" | "reject", val }; u64 values are BigInts; byte lists are Uint8Arrays.

import { send } from "weir:stream/emit@0.1.0";
import { log } from "weir:stream/log@0.1.0";
import { get } from "weir:stream/config@0.1.0";

const decoder = new TextDecoder("utf-8", { fatal: true });
const encoder = new TextEncoder();

// One message: return for ok, throw the failure variant for an error.
function handle(msg) {
  let text;
  try {
    text = decoder.decode(msg.payload);
  } catch (e) {
    throw { tag: "reject", val: `not UTF-8 text: ${e.message}` };
  }
  if (text.length === 0) {
    throw { tag: "reject", val: "empty message" };
  }
  const topic = get("output-topic") ?? "shouted";
  try {
    send(topic, msg.key, encoder.encode(text.toUpperCase()), []);
  } catch (e) {
    throw { tag: "retry", val: { reason: String(e.payload ?? e), delayMs: undefined } };
  }
  log("debug", `shouted offset ${msg.offset}`);
}

// The batch entry point (world `batch-consumer`): a JavaScript call costs hundreds of µs, so
// weir hands over many messages per call. One result per message, in order; anything thrown
// that is not a failure traps the call (weir then isolates the message that caused it).
export const batchHandler = {
  handleBatch(msgs) {
    return msgs.map((msg) => {
      try {
        handle(msg);
        return { tag: "ok" };
      } catch (e) {
        if (e !== null && typeof e === "object" && (e.tag === "retry" || e.tag === "reject")) {
          return { tag: "err", val: e };
        }
        throw e;
      }
    });
  },
};
