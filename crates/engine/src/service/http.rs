//! `serve`'s HTTP endpoint (axum): the status page, `/metrics`,
//! `/healthz`, `/readyz`, and the trigger `POST /syncs/{name}/runs` with
//! `GET /runs/{id}`. Read-only except the trigger; no secrets in any answer.

use super::{Service, TriggerError, metrics, page};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use sha2::Digest;
use std::sync::Arc;

type Shared = State<Arc<Service>>;

/// Serves the endpoint on `listener` until the process ends.
pub(super) fn spawn(service: Arc<Service>, listener: tokio::net::TcpListener) {
    let app = axum::Router::new()
        .route("/", get(index))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(export))
        .route("/syncs/{name}", get(sync_page))
        .route("/syncs/{name}/runs", post(trigger))
        .route("/runs/{id}", get(run))
        .with_state(service);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the HTTP endpoint stopped");
        }
    });
}

async fn index(State(service): Shared) -> Response {
    html(page::index(&service))
}

async fn sync_page(State(service): Shared, Path(name): Path<String>) -> Response {
    match page::sync(&service, &name) {
        Some(rendered) => html(rendered),
        None => {
            (StatusCode::NOT_FOUND, Html(format!("no sync `{}` is served here", page::escape(&name)))).into_response()
        }
    }
}

fn html(rendered: Result<String, minijinja::Error>) -> Response {
    match rendered {
        Ok(body) => Html(body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot render the status page");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot render the page; see the log\n").into_response()
        }
    }
}

async fn readyz(State(service): Shared) -> Response {
    match service.readiness() {
        Ok(()) => "ready\n".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response(),
    }
}

async fn export(State(service): Shared) -> Response {
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], service.metrics.encode()).into_response()
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

async fn trigger(State(service): Shared, Path(name): Path<String>, headers: HeaderMap) -> Response {
    let Some(token) = service.settings().trigger_token else {
        return refuse(StatusCode::FORBIDDEN, "triggers are off: set `serve.trigger_token` in backflow.yaml");
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Digests are compared, so the time taken says nothing about the token.
    let same = given.is_some_and(|g| sha2::Sha256::digest(g) == sha2::Sha256::digest(&token));
    if !same {
        let mut answer = refuse(StatusCode::UNAUTHORIZED, "give the trigger token as `Authorization: Bearer TOKEN`");
        answer.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return answer;
    }
    match service.trigger(&name) {
        Ok(run_id) => (
            StatusCode::ACCEPTED,
            Json(json!({"run_id": run_id, "sync": name, "status": "queued", "status_url": format!("/runs/{run_id}")})),
        )
            .into_response(),
        Err(e @ TriggerError::Unknown(_)) => refuse(StatusCode::NOT_FOUND, e.to_string()),
        Err(TriggerError::Busy { sync, run_id }) => (
            StatusCode::CONFLICT,
            Json(json!({"error": format!("sync `{sync}` already has a run in flight or queued"), "run_id": run_id})),
        )
            .into_response(),
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn run(State(service): Shared, Path(id): Path<String>) -> Response {
    match service.run_status(&id) {
        Some(entry) => Json(entry).into_response(),
        None => refuse(StatusCode::NOT_FOUND, format!("no run `{id}` is known here (the last 1000 runs are)")),
    }
}
