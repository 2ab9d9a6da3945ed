//! Alerts and run events of `serve`: a sync's health after each run
//! (ok, failed, partial, degraded), one alert per change of it, and
//! `run.started` / `run.completed` / `run.failed` messages. Messages go out
//! on their own tasks: one that cannot be sent is logged, never fails a run.

use super::RunEntry;
use crate::config::{DegradedWhen, Notifier, NotifyFormat};
use serde_json::{Value, json};

/// A sync's health after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Everything delivered, within the thresholds.
    Ok,
    /// The run failed.
    Failed,
    /// Records were rejected or left pending.
    Partial,
    /// Delivered, but past a `degraded_when` threshold.
    Degraded,
}

impl Health {
    fn name(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Failed => "failed",
            Health::Partial => "partial",
            Health::Degraded => "degraded",
        }
    }

    /// The health a recorded run status implies (thresholds unknown).
    pub fn of_status(status: &str) -> Option<Health> {
        match status {
            "succeeded" => Some(Health::Ok),
            "failed" => Some(Health::Failed),
            "partial" => Some(Health::Partial),
            _ => None,
        }
    }
}

/// The health a finished run gives its sync, and why (None: the run says
/// nothing of it, e.g. skipped).
pub fn judge(entry: &RunEntry, when: Option<&DegradedWhen>) -> Option<(Health, Vec<String>)> {
    let health = Health::of_status(&entry.status)?;
    let mut reasons = Vec::new();
    match health {
        Health::Failed => reasons.push(entry.message.clone().unwrap_or_else(|| "the run failed".into())),
        Health::Partial => {
            reasons.push(format!("{} rejected, {} pending", entry.rejected, entry.pending));
            reasons.extend(entry.message.clone());
        }
        _ => {}
    }
    if health != Health::Ok {
        return Some((health, reasons));
    }
    let Some(when) = when else { return Some((Health::Ok, reasons)) };
    let sent = entry.delivered + entry.rejected + entry.pending;
    if let Some(share) = when.rejected_share_above
        && sent > 0
        && entry.rejected as f64 / sent as f64 > share
    {
        reasons.push(format!("{} of {sent} records rejected (above {share})", entry.rejected));
    }
    if let (Some(limit), Some(seconds)) = (when.duration_above, entry.seconds)
        && seconds > limit.get().as_secs_f64()
    {
        reasons.push(format!("the run took {seconds:.1}s (above {limit})"));
    }
    if let Some(least) = when.rows_below
        && entry.rows < least
    {
        reasons.push(format!("{} rows read (below {least})", entry.rows));
    }
    if let Some(most) = when.pending_above
        && entry.pending > most
    {
        reasons.push(format!("{} records pending (above {most})", entry.pending));
    }
    Some((if reasons.is_empty() { Health::Ok } else { Health::Degraded }, reasons))
}

/// The alert for a change of health from `before` to `now` (None: no
/// change worth one).
pub fn alert(entry: &RunEntry, before: Health, now: Health, reasons: &[String]) -> Option<Value> {
    if before == now {
        return None;
    }
    let event = if now == Health::Ok { "sync.recovered".to_string() } else { format!("sync.{}", now.name()) };
    Some(json!({
        "type": "alert",
        "event": event,
        "sync": entry.sync,
        "run_id": entry.run_id,
        "health": now.name(),
        "previous": before.name(),
        "reasons": reasons,
        "run": counts(entry),
        "at": backflow_diff::now(),
    }))
}

fn counts(entry: &RunEntry) -> Value {
    json!({
        "status": entry.status,
        "started_at": entry.started_at,
        "ended_at": entry.ended_at,
        "seconds": entry.seconds,
        "rows": entry.rows,
        "added": entry.added,
        "changed": entry.changed,
        "removed": entry.removed,
        "delivered": entry.delivered,
        "rejected": entry.rejected,
        "pending": entry.pending,
    })
}

/// A run event: `run.started`, or `run.completed` / `run.failed` at its end.
pub fn event(entry: &RunEntry) -> Value {
    let kind = match entry.status.as_str() {
        "running" => "run.started",
        "failed" => "run.failed",
        "skipped" => "run.skipped",
        _ => "run.completed",
    };
    json!({
        "type": kind,
        "sync": entry.sync,
        "run_id": entry.run_id,
        "trigger": entry.trigger,
        "run": counts(entry),
        "message": entry.message,
        "at": backflow_diff::now(),
    })
}

/// `message` as `format` writes it.
fn body(format: NotifyFormat, message: &Value) -> Value {
    match format {
        NotifyFormat::Backflow => message.clone(),
        NotifyFormat::Slack => {
            let sync = message["sync"].as_str().unwrap_or_default();
            let run = &message["run"];
            let text = match message["type"].as_str() {
                Some("alert") => {
                    let (icon, what) = match message["health"].as_str() {
                        Some("ok") => (":large_green_circle:", "recovered".to_string()),
                        Some(h) => (":red_circle:", h.to_string()),
                        None => (":grey_question:", "changed".to_string()),
                    };
                    let reasons: Vec<&str> =
                        message["reasons"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                    format!(
                        "{icon} Backflow sync `{sync}` {what}{}\nrun {}: delivered {}, rejected {}, pending {}",
                        if reasons.is_empty() { String::new() } else { format!(": {}", reasons.join("; ")) },
                        message["run_id"].as_str().unwrap_or_default(),
                        run["delivered"],
                        run["rejected"],
                        run["pending"]
                    )
                }
                Some(kind) => format!(
                    "Backflow {kind}: sync `{sync}`, run {} ({})",
                    message["run_id"].as_str().unwrap_or_default(),
                    run["status"].as_str().unwrap_or_default()
                ),
                None => message.to_string(),
            };
            json!({"text": text})
        }
    }
}

/// Sends `message` about `sync` to each notifier concerned, each on its
/// own task (returned, so that a service can let them finish before it
/// exits).
pub fn send(
    notifiers: &[Notifier],
    sync: &str,
    message: &Value,
    redact: &backflow_core::env::Env,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for n in notifiers {
        if n.syncs.as_ref().is_some_and(|s| !s.iter().any(|x| x == sync)) {
            continue;
        }
        let id = format!("{}-{}", message["type"].as_str().unwrap_or("message"), uuid::Uuid::now_v7());
        let text = redact.redact(&body(n.format, message).to_string());
        let request = match n.destination.message(&id, text.into_bytes()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(notifier = %n.place, error = %redact.redact(&e), "cannot build the message");
                continue;
            }
        };
        let (sender, place, sync, env) = (n.sender.clone(), n.place.clone(), sync.to_string(), redact.clone());
        tasks.push(tokio::spawn(async move {
            match sender.send(&request).await {
                backflow_sink::Outcome::Delivered { .. } => {
                    tracing::debug!(notifier = %place, sync, "message sent")
                }
                backflow_sink::Outcome::Failed { reason, .. } => {
                    // The reason may quote the URL, whose path can be the secret.
                    let reason = env.redact(&reason);
                    tracing::warn!(notifier = %place, sync, reason = %reason, "cannot send the message")
                }
            }
        }));
    }
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(status: &str, rows: u64, delivered: u64, rejected: u64) -> RunEntry {
        let mut e = RunEntry::new("s", "r1".into(), "schedule");
        e.status = status.into();
        e.rows = rows;
        e.delivered = delivered;
        e.rejected = rejected;
        e.seconds = Some(2.0);
        e
    }

    #[test]
    fn thresholds_make_a_delivered_run_degraded() {
        let when = DegradedWhen { rejected_share_above: Some(0.1), rows_below: Some(1), ..Default::default() };
        assert_eq!(judge(&entry("succeeded", 10, 10, 0), Some(&when)).unwrap().0, Health::Ok);
        let (h, why) = judge(&entry("succeeded", 0, 0, 0), Some(&when)).unwrap();
        assert_eq!((h, why), (Health::Degraded, vec!["0 rows read (below 1)".to_string()]));
        assert_eq!(judge(&entry("partial", 10, 8, 2), Some(&when)).unwrap().0, Health::Partial);
        assert_eq!(judge(&entry("skipped", 0, 0, 0), Some(&when)), None);
    }

    #[test]
    fn one_alert_per_change_of_health() {
        let e = entry("failed", 0, 0, 0);
        assert!(alert(&e, Health::Failed, Health::Failed, &[]).is_none());
        assert_eq!(alert(&e, Health::Ok, Health::Failed, &[]).unwrap()["event"], "sync.failed");
        assert_eq!(alert(&e, Health::Failed, Health::Ok, &[]).unwrap()["event"], "sync.recovered");
        let slack = body(NotifyFormat::Slack, &alert(&e, Health::Ok, Health::Failed, &["boom".into()]).unwrap());
        assert!(slack["text"].as_str().unwrap().contains("`s` failed: boom"), "{slack}");
    }
}
