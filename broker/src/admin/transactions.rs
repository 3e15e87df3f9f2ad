//! Transactions: list the unsettled ones (open, ending, committed and
//! being moved), and end one as an operator (`resolve`): the way out for a
//! transaction whose producer is gone.
//!
//! An operator's COMMIT or ROLLBACK is the same durable outcome record a
//! producer's TXN_END writes, answered once durable; the transaction's
//! handle must be named, so a resolve never reaches a later transaction
//! that reuses the id.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use dmq_dispatcher::{TxnKey, TxnOutcome};
use serde::Deserialize;

use super::{parse_json, ApiError, ApiResult};
use crate::services::Services;

pub(super) fn routes() -> Router<Services> {
    Router::new()
        .route("/api/transactions", get(list))
        .route("/api/transactions/{group}/{id}/{action}", post(resolve))
}

async fn list(State(services): State<Services>) -> ApiResult<Json<serde_json::Value>> {
    let listed = services
        .engine
        .call(|dispatcher, _| dispatcher.transactions())
        .await?;
    let transactions: Vec<serde_json::Value> = listed
        .into_iter()
        .map(|t| {
            serde_json::json!({
                "producer_group": t.group,
                "transaction_id": t.id,
                "handle": t.handle,
                "opened_ms": t.opened_ms,
                "stage": t.stage,
                "records": t.records,
                "acks": t.acks,
                "overdue": t.overdue,
                "checks": t.checks,
                "unresolved": t.unresolved,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "transactions": transactions })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveRequest {
    handle: u64,
}

async fn resolve(
    State(services): State<Services>,
    Path((group, id, action)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let outcome = match action.as_str() {
        "commit" => TxnOutcome::Commit,
        "rollback" => TxnOutcome::Rollback,
        _ => {
            return Err(ApiError::not_found(format!(
                "no action {}: commit or rollback",
                super::shown(&action)
            )))
        }
    };
    let request: ResolveRequest = parse_json(&body)?;
    let key = TxnKey::new(group, id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let handle = request.handle;
    let (reply, answer) = tokio::sync::oneshot::channel();
    services
        .engine
        .call(move |dispatcher, _| {
            tracing::warn!(%key, handle, outcome = outcome.name(), "transaction resolved by an operator");
            dispatcher.txn_end(
                key,
                handle,
                outcome,
                Box::new(move |result| {
                    let _ = reply.send(result);
                }),
            )
        })
        .await?;
    let ended = answer
        .await
        .map_err(|_| ApiError::internal("the broker is stopping"))?
        .map_err(|error| ApiError::from(crate::convert::dispatch_error(&error)))?;
    Ok(Json(serde_json::json!({ "outcome": ended.name() })))
}
