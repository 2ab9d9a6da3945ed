//! The status page: server-rendered HTML (minijinja templates compiled into
//! the binary; no JavaScript, no assets from the network).

use super::{RunEntry, Service, Slot, parse_time};
use minijinja::value::Serde;
use minijinja::{Environment, context};
use serde::Serialize;
use std::sync::LazyLock;

static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    // Names ending in `.html` are auto-escaped.
    for (name, text) in [
        ("base.html", include_str!("templates/base.html")),
        ("index.html", include_str!("templates/index.html")),
        ("sync.html", include_str!("templates/sync.html")),
    ] {
        env.add_template(name, text).expect("the status page's templates parse");
    }
    env
});

/// One sync as the pages show it.
#[derive(Serialize)]
struct View {
    name: String,
    mode: String,
    tags: Vec<String>,
    schedule: String,
    next: String,
    running: bool,
    failures: u32,
    backing_off: Option<String>,
    destination: String,
    last: Option<RunEntry>,
    last_when: String,
    bars: Vec<Bar>,
    runs: Vec<RunEntry>,
}

#[derive(Serialize)]
struct Bar {
    status: String,
    height: u64,
    title: String,
}

/// `when` against now: `in 4m 10s`, `12s ago`.
fn relative(when: chrono::DateTime<chrono::Utc>) -> String {
    let now = chrono::Utc::now();
    let (delta, future) = if when >= now { (when - now, true) } else { (now - when, false) };
    let secs = delta.num_seconds().max(0) as u64;
    let text = match secs {
        0 => return if future { "now".into() } else { "just now".into() },
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    };
    if future { format!("in {text}") } else { format!("{text} ago") }
}

fn view(service: &Service, name: &str, slot: &Slot) -> View {
    let engine = service.engine();
    let sync = engine.project.sync(name).ok();
    let schedule = match &slot.schedule {
        Some(s) => match (&s.cron, &s.every) {
            (Some(c), _) => format!("cron {c}"),
            (_, Some(e)) => format!("every {e}"),
            _ => "—".into(),
        },
        None => "manual (trigger or run)".into(),
    };
    let next = match slot.next {
        Some(at) => format!("{} ({})", relative(at), at.format("%Y-%m-%d %H:%M:%S UTC")),
        None => "—".into(),
    };
    let oldest_first: Vec<&RunEntry> = slot.recent.iter().rev().collect();
    let most = oldest_first.iter().map(|r| r.delivered + r.rejected + r.pending).max().unwrap_or(0).max(1);
    let bars = oldest_first
        .iter()
        .map(|r| {
            let moved = r.delivered + r.rejected + r.pending;
            Bar {
                status: r.status.clone(),
                height: 6 + 22 * moved / most,
                title: format!(
                    "{} {} — delivered {}, rejected {}, pending {}",
                    r.started_at.as_deref().unwrap_or(""),
                    r.status,
                    r.delivered,
                    r.rejected,
                    r.pending
                ),
            }
        })
        .collect();
    let last = slot.recent.iter().find(|r| r.status != "queued" && r.status != "running").cloned();
    let last_when = last
        .as_ref()
        .and_then(|r| r.ended_at.as_deref().or(r.started_at.as_deref()))
        .and_then(parse_time)
        .map(relative)
        .unwrap_or_default();
    View {
        name: name.to_string(),
        mode: sync.map(|s| s.spec.mode.to_string()).unwrap_or_default(),
        tags: sync.map(|s| s.spec.tags.clone()).unwrap_or_default(),
        schedule,
        next,
        running: slot.current.is_some(),
        failures: slot.failures,
        backing_off: slot.backing_off.clone(),
        destination: sync.map(|s| backflow_sink::send::redact_url(&s.spec.destination.url)).unwrap_or_default(),
        last,
        last_when,
        bars,
        runs: slot.recent.iter().cloned().collect(),
    }
}

fn project(service: &Service) -> String {
    service.dir.canonicalize().unwrap_or_else(|_| service.dir.clone()).display().to_string()
}

/// The page listing every served sync.
pub(super) fn index(service: &Service) -> Result<String, minijinja::Error> {
    let views: Vec<View> = {
        let board = service.board();
        board.syncs.iter().map(|(name, slot)| view(service, name, slot)).collect()
    };
    TEMPLATES.get_template("index.html")?.render(context! {
        syncs => Serde(&views),
        project => project(service),
        started_at => service.started_at.as_str(),
    })
}

/// One sync's page (None: not served).
pub(super) fn sync(service: &Service, name: &str) -> Option<Result<String, minijinja::Error>> {
    let view = {
        let board = service.board();
        view(service, name, board.syncs.get(name)?)
    };
    Some(TEMPLATES.get_template("sync.html").and_then(|t| {
        t.render(context! { s => Serde(&view), project => project(service), started_at => service.started_at.as_str() })
    }))
}

/// `text` safe inside HTML.
pub(super) fn escape(text: &str) -> String {
    minijinja::HtmlEscape(text).to_string()
}
