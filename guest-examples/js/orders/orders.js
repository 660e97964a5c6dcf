// `orders` in JavaScript: the same handler as guest-examples/rust/orders.
//
// Reads an order as JSON, emits a confirmation to the output topic (config key `output-topic`,
// default `confirmations`), asks for a retry while a transient condition holds, and rejects what
// can never succeed. An order with `"trap": true` aborts the call, which the host sees as a trap.
//
// Build: npm install && npm run build (jco + componentize-js from npm; writes orders.wasm)
//
// jco's conventions: a `result` is { tag: "ok" } or { tag: "err", val }; the `failure` variant
// is { tag: "retry" | "reject", val }; u64 values are BigInts; byte lists are Uint8Arrays.

import { send } from "weir:stream/emit@0.1.0";
import { log } from "weir:stream/log@0.1.0";
import { get } from "weir:stream/config@0.1.0";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function reject(reason) {
  return { tag: "reject", val: reason };
}

function parseOrder(payload) {
  let order;
  try {
    order = JSON.parse(decoder.decode(payload));
  } catch (e) {
    throw reject(`not a valid order: ${e.message}`);
  }
  if (
    order === null ||
    typeof order !== "object" ||
    typeof order.id !== "string" ||
    typeof order.customer !== "string" ||
    !Number.isInteger(order.amount_cents) ||
    order.amount_cents < 0
  ) {
    throw reject("not a valid order: needs a string id and customer and a whole amount_cents");
  }
  return order;
}

// Settings do not change during an instance's life, and every call into the host costs tens of
// µs from JavaScript: read it once.
let topicSetting;
function outputTopic() {
  if (topicSetting === undefined) {
    topicSetting = get("output-topic") ?? "confirmations";
  }
  return topicSetting;
}

// One message; throws the failure variant for an error.
function handleOne(msg) {
  const order = parseOrder(msg.payload);
  if (order.amount_cents === 0) {
    throw reject(`order ${order.id} has no amount`);
  }
  if (order.trap === true) {
    // Thrown out of the call: the host drops this instance and retries on a fresh one.
    abortCall(`asked to trap at offset ${msg.offset}`);
  }
  if (order.transient === true && msg.attempt < 2) {
    throw {
      tag: "retry",
      val: { reason: `payment service busy for order ${order.id}`, delayMs: 10n },
    };
  }
  const confirmation = JSON.stringify({
    order_id: order.id,
    customer: order.customer,
    amount_cents: order.amount_cents,
    status: "confirmed",
  });
  const topic = outputTopic();
  try {
    send(topic, encoder.encode(order.id), encoder.encode(confirmation), [
      ["source-offset", encoder.encode(String(msg.offset))],
    ]);
  } catch (e) {
    throw { tag: "retry", val: { reason: String(e.payload ?? e), delayMs: undefined } };
  }
  // A request (`weir request`) gets the confirmation as its answer. A batch call cannot use
  // the `reply` import (no single message to answer): it emits to the request's reply-to topic
  // with its correlation-id, which is what `reply` does for one message.
  const header = (name) => msg.headers.findLast(([n]) => n === name)?.[1];
  const replyTo = header("reply-to");
  if (replyTo !== undefined && replyTo.length > 0) {
    const id = header("correlation-id");
    try {
      send(new TextDecoder().decode(replyTo), id, encoder.encode(confirmation),
        id === undefined ? [] : [["correlation-id", id]]);
    } catch (e) {
      throw reject(`cannot answer: ${String(e.payload ?? e)}`);
    }
  }
  log("debug", `confirmed order ${order.id}`);
}

// weir's batch entry point (world `batch-consumer`): a JavaScript call costs hundreds of µs, so
// the host hands over up to --batch-size messages per call. One result per message, in order;
// a thrown failure becomes that message's `err`, anything else thrown traps the call.
export const batchHandler = {
  handleBatch(msgs) {
    return msgs.map((msg) => {
      try {
        handleOne(msg);
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

function abortCall(reason) {
  // An Error escapes handleBatch: jco turns an uncaught exception into a trap, as a Rust
  // guest's panic is one.
  throw new Error(reason);
}
