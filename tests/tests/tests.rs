//! weir's end-to-end tests: the real `weir` binary, real guest components, the real embedded
//! log. One test binary; each module opens with its purpose.

mod admin;
mod admin_plane;
mod bad_input;
mod bench;
mod conformance;
mod conformance_links;
mod crash;
mod dedupe;
mod embedded;
mod failures;
mod faults;
mod hardening;
mod http;
mod kafka;
mod languages;
mod lifecycle;
mod nats;
mod patterns;
mod priority;
mod rabbitmq;
mod rabbitmq_commits;
mod rabbitmq_timeout;
mod redis;
mod reload;
mod request_reply;
mod retention;
mod scaling;
mod shared_dedupe;
mod sqs;
mod storage_faults;
mod tls;
