//! `mock-kafka`: librdkafka's in-process mock cluster as a process of its own, for scripts that
//! run several weir processes against one cluster (`scripts/soak.sh`).
//!
//! ```text
//! mock-kafka [--faults] TOPIC:PARTITIONS...
//! ```
//! Creates the topics, prints `BOOTSTRAP=host:port` once it serves, and runs until killed. With
//! `--faults` it injects a burst of 1-3 retriable broker errors (not leader, request timed out,
//! coordinator not available) on produce, fetch or offset commit every 10-30 s, and prints a
//! line `fault API ERROR xN` for each burst.

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::io::Write;
use std::time::Duration;

fn main() {
    let mut faults = false;
    let mut topics = Vec::new();
    for arg in std::env::args().skip(1) {
        if arg == "--faults" {
            faults = true;
        } else if let Some((name, n)) = arg.rsplit_once(':')
            && let Ok(n) = n.parse::<i32>()
        {
            topics.push((name.to_string(), n));
        } else {
            eprintln!("mock-kafka: `{arg}` is not TOPIC:PARTITIONS or --faults");
            std::process::exit(2);
        }
    }
    let cluster = MockCluster::new(1).expect("start a mock Kafka cluster");
    for (name, n) in &topics {
        cluster
            .create_topic(name, *n, 1)
            .unwrap_or_else(|e| panic!("create topic {name}: {e}"));
    }
    println!("BOOTSTRAP={}", cluster.bootstrap_servers());
    std::io::stdout().flush().expect("write to stdout");
    use RDKafkaApiKey as A;
    use RDKafkaRespErr as E;
    let apis = [A::Produce, A::Fetch, A::OffsetCommit];
    let errors = [
        E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        E::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
    ];
    loop {
        // The pause between bursts is the schedule of the faults, not a wait for an event. The
        // cluster keeps injected errors until requests of their kind take them, so bursts are
        // small and far apart: more would pile up while no member fetches or commits.
        std::thread::sleep(Duration::from_millis(
            10_000 + rand::random::<u64>() % 20_000,
        ));
        if !faults {
            continue;
        }
        let api = apis[rand::random::<u32>() as usize % apis.len()];
        let error = errors[rand::random::<u32>() as usize % errors.len()];
        let n = 1 + rand::random::<u32>() as usize % 3;
        cluster.request_errors(api, &vec![error; n]);
        println!("fault {api:?} {error:?} x{n}");
        std::io::stdout().flush().expect("write to stdout");
    }
}
