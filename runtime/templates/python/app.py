"""{{name}}: a weir handler. Upper-cases each message's text and emits it to the topic named by
the `output-topic` setting (default `shouted`); an empty message is rejected (dead-lettered).
Replace `handle` with your own logic."""

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import config, emit, log, types


class Handler(exports.Handler):
    def handle(self, msg: types.Message) -> None:
        try:
            text = msg.payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Err(types.Failure_Reject(f"not UTF-8 text: {e}"))
        if not text:
            raise Err(types.Failure_Reject("empty message"))
        topic = config.get("output-topic") or "shouted"
        try:
            emit.send(topic, msg.key, text.upper().encode(), [])
        except Err as e:
            raise Err(types.Failure_Retry(types.RetryRequest(reason=str(e.value), delay_ms=None)))
        log.log(log.Level.DEBUG, f"shouted offset {msg.offset}")
