//! The admin server's writes: ingest (`POST /topics/{topic}/messages`) and hot reload
//! (`POST /module`). Both take input from the network, so both bound it before they use it.

use super::{Admin, Answer};
use serde::Deserialize;
use serde_json::json;
use std::path::{Path, PathBuf};

/// The records of an ingest body, or the answer that refuses it.
fn parse(body: &[u8]) -> Result<Vec<crate::source::Record>, Answer> {
    weir_core::ingest::parse(body).map_err(|e| Answer::error(e.status, e.message))
}

pub(super) async fn ingest(admin: &Admin, topic: String, body: &[u8]) -> Answer {
    let Some(log) = admin.log.clone() else {
        return Answer::error(
            404,
            "ingest is served on the embedded log only; on Kafka, produce to the brokers",
        );
    };
    let records = match parse(body) {
        Ok(r) => r,
        Err(answer) => return answer,
    };
    let limit = admin.max_depth.clone();
    let placed = tokio::task::spawn_blocking(move || {
        if let Some(limit) = &limit
            && let Some(depth) = limit.over(&log, &topic)?
        {
            return Ok(Err(depth));
        }
        log.append(&topic, records).map(Ok)
    })
    .await;
    match placed {
        Ok(Ok(Ok(placed))) => Answer::json(200, json!({ "placed": placed })),
        Ok(Ok(Err(depth))) => Answer::error(
            429,
            format!(
                "slow down: the topic holds {depth} unconsumed messages, over --max-depth {}",
                admin
                    .max_depth
                    .as_ref()
                    .and_then(|l| l.max_depth)
                    .unwrap_or(0)
            ),
        )
        .retry_after(1),
        Ok(Err(e)) if e.is_bad_input() => Answer::error(400, e),
        Ok(Err(e)) => Answer::error(503, e),
        Err(e) => Answer::error(503, e),
    }
}

#[derive(Deserialize)]
struct ReloadBody {
    path: PathBuf,
}

/// The module `requested` names, if the operator allows reloads from there: a regular file in
/// `dir` (after resolving links and `..`), of at most [`crate::host::MAX_COMPONENT_BYTES`].
pub(super) fn allowed_module(dir: &Path, requested: &Path) -> Result<PathBuf, Answer> {
    let shown = requested.display();
    let path = std::fs::canonicalize(requested)
        .map_err(|e| Answer::error(400, format!("cannot read {shown}: {e}")))?;
    let dir = std::fs::canonicalize(dir).map_err(|e| {
        Answer::error(
            503,
            format!("the reload directory {} cannot be read: {e}", dir.display()),
        )
    })?;
    if !path.starts_with(&dir) {
        return Err(Answer::error(
            403,
            format!(
                "{shown} is outside the reload directory {}; copy the module there, or start weir with --reload-dir",
                dir.display()
            ),
        ));
    }
    let meta = std::fs::metadata(&path)
        .map_err(|e| Answer::error(400, format!("cannot read {shown}: {e}")))?;
    if !meta.is_file() {
        return Err(Answer::error(400, format!("{shown} is not a regular file")));
    }
    if meta.len() > crate::host::MAX_COMPONENT_BYTES {
        return Err(Answer::error(
            400,
            format!(
                "{shown} is {} bytes; a module may have at most {} bytes",
                meta.len(),
                crate::host::MAX_COMPONENT_BYTES
            ),
        ));
    }
    Ok(path)
}

/// `POST /module` with `{"path": "/path/to/handler.wasm"}` (a file in the reload directory):
/// load it and make it the handler for new work; in-flight calls finish on the old one.
pub(super) async fn reload(admin: &Admin, body: &[u8]) -> Answer {
    let Some(reload) = admin.reload.clone() else {
        return Answer::error(404, "this run does not reload modules");
    };
    let requested = match serde_json::from_slice::<ReloadBody>(body) {
        Ok(b) => b.path,
        Err(e) => {
            return Answer::error(
                400,
                format!("the body is {{\"path\": \"/path/to/handler.wasm\"}}: {e}"),
            );
        }
    };
    let dir = admin.reload_dir.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let path = allowed_module(&dir, &requested)?;
        reload(&path).map_err(|why| Answer::error(400, why))
    })
    .await;
    match loaded {
        Ok(Ok((name, digest))) => Answer::json(
            200,
            json!({ "module": name, "digest": format!("sha256:{digest}") }),
        ),
        Ok(Err(answer)) => answer,
        Err(e) => Answer::error(503, e),
    }
}
