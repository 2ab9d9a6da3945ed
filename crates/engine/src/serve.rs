//! `serve`: runs each scheduled sync when its cron expression or interval
//! comes due, one run at a time, until stopped.

use crate::config::Schedule;
use crate::{Engine, EngineError, Progress, RunReport};
use std::str::FromStr;
use std::time::Duration;

/// When a sync runs next, in UTC.
fn next_due(schedule: &Schedule, after: chrono::DateTime<chrono::Utc>) -> Option<chrono::DateTime<chrono::Utc>> {
    if let Some(cron) = &schedule.cron {
        let cron = croner::Cron::from_str(cron).ok()?;
        return cron.find_next_occurrence(&after, false).ok();
    }
    let every = chrono::TimeDelta::from_std(schedule.every?.get()).ok()?;
    Some(after + every)
}

impl Engine {
    /// Runs scheduled syncs forever (or until `stop` resolves: a run in
    /// flight is drained first, see [`Engine::stop`]), calling `report`
    /// after every run. A sync that is already running elsewhere
    /// is skipped until its next slot. Errors of one run do not stop the
    /// scheduler.
    pub async fn serve(
        &self,
        progress: &dyn Progress,
        report: &mut dyn FnMut(&str, Result<&RunReport, &EngineError>),
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), EngineError> {
        let now = chrono::Utc::now();
        let mut due: Vec<(String, Schedule, chrono::DateTime<chrono::Utc>)> = self
            .project
            .syncs
            .iter()
            .filter_map(|s| {
                let schedule = s.spec.schedule.clone()?;
                let first = if schedule.every.is_some() { now } else { next_due(&schedule, now)? };
                Some((s.name.clone(), schedule, first))
            })
            .collect();
        if due.is_empty() {
            return Err(EngineError::Usage(
                "no sync has a `schedule`; add e.g. `schedule: {every: 15m}` or `schedule: {cron: \"*/15 * * * *\"}`"
                    .into(),
            ));
        }
        tokio::pin!(stop);
        loop {
            let (index, at) = due
                .iter()
                .enumerate()
                .min_by_key(|(_, d)| d.2)
                .map(|(i, d)| (i, d.2))
                .expect("at least one scheduled sync");
            let wait = (at - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
            let name = due[index].0.clone();
            let run = self.run(&name, false, progress);
            tokio::pin!(run);
            let (result, stopped) = tokio::select! {
                result = &mut run => (result, false),
                _ = &mut stop => {
                    // Drained: requests in flight end, their acknowledgements
                    // are committed, the rest stays pending.
                    self.stop();
                    (run.await, true)
                }
            };
            match result {
                Ok(r) => report(&name, Ok(&r)),
                Err(e) => report(&name, Err(&e)),
            }
            if stopped {
                return Ok(());
            }
            let after = chrono::Utc::now().max(at);
            due[index].2 = next_due(&due[index].1, after).unwrap_or(after + chrono::TimeDelta::days(365));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn cron_and_interval_schedules_give_the_next_slot() {
        let at = chrono::Utc.with_ymd_and_hms(2026, 11, 23, 10, 7, 0).unwrap();
        let cron = Schedule { cron: Some("*/15 * * * *".into()), every: None };
        assert_eq!(next_due(&cron, at), Some(chrono::Utc.with_ymd_and_hms(2026, 11, 23, 10, 15, 0).unwrap()));
        let every = Schedule { cron: None, every: Some("90s".parse().unwrap()) };
        assert_eq!(next_due(&every, at), Some(at + chrono::TimeDelta::seconds(90)));
    }
}
