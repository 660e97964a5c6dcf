"""`orders` in Python: the same handler as guest-examples/rust/orders.

Reads an order as JSON, emits a confirmation to the output topic (config key `output-topic`,
default `confirmations`), asks for a retry while a transient condition holds, and rejects what
can never succeed. An order with `"trap": true` raises an uncaught exception, which the host
sees as a trap (to show what it does then: a fresh instance and a retry, then the DLQ).

Build: ./build.sh (componentize-py from PyPI; writes orders.wasm)
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import config, emit, log, reply, types


class Handler(exports.Handler):
    def handle(self, msg: types.Message) -> None:
        try:
            order = json.loads(msg.payload)
            order_id = order["id"]
            customer = order["customer"]
            amount = order["amount_cents"]
            if not isinstance(order_id, str) or not isinstance(customer, str):
                raise ValueError("id and customer must be strings")
            if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
                raise ValueError("amount_cents must be a whole number")
        except (ValueError, KeyError, TypeError) as e:
            raise Err(types.Failure_Reject(f"not a valid order: {e}"))
        if amount == 0:
            raise Err(types.Failure_Reject(f"order {order_id} has no amount"))
        if order.get("trap") is True:
            raise RuntimeError(f"asked to trap at offset {msg.offset}")
        if order.get("transient") is True and msg.attempt < 2:
            raise Err(
                types.Failure_Retry(
                    types.RetryRequest(
                        reason=f"payment service busy for order {order_id}", delay_ms=10
                    )
                )
            )
        confirmation = json.dumps(
            {
                "order_id": order_id,
                "customer": customer,
                "amount_cents": amount,
                "status": "confirmed",
            },
            separators=(",", ":"),
        ).encode()
        topic = config.get("output-topic") or "confirmations"
        try:
            emit.send(
                topic,
                order_id.encode(),
                confirmation,
                [("source-offset", str(msg.offset).encode())],
            )
        except Err as e:
            raise Err(types.Failure_Retry(types.RetryRequest(reason=str(e.value), delay_ms=None)))
        # A request (`weir request`, `reply-to` header) gets the confirmation as its answer.
        if any(name == "reply-to" for name, _ in msg.headers):
            try:
                reply.send(confirmation, [])
            except Err as e:
                raise Err(types.Failure_Reject(f"cannot answer: {e.value}"))
        log.log(log.Level.DEBUG, f"confirmed order {order_id}")
