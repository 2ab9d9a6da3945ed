//! Slot arithmetic for `serve`: when a sync is due next, how many slots a
//! long run missed, and how far repeated failures push the next attempt.
//! Pure functions of times, so they are tested without waiting.

use crate::config::Schedule;
use chrono::{DateTime, TimeDelta, Timelike, Utc};
use std::str::FromStr;
use std::time::Duration;

/// A time in UTC.
pub type Time = DateTime<Utc>;

/// The first slot of `schedule` strictly after `after`.
pub fn next_slot(schedule: &Schedule, after: Time) -> Option<Time> {
    if let Some(cron) = &schedule.cron {
        let cron = croner::Cron::from_str(cron).ok()?;
        // Cron slots fall on whole seconds (croner keeps the fraction it is given).
        return cron.find_next_occurrence(&after, false).ok().and_then(|at| at.with_nanosecond(0));
    }
    let every = TimeDelta::from_std(schedule.every?.get()).ok()?;
    Some(after + every)
}

/// The first slot when a scheduler starts at `now`, given when the sync's
/// last run started (from its run log):
/// - an interval sync that never ran, or whose interval since its last
///   start is over, is due at once (a run that started a little after its
///   slot does not push the next one a whole interval: a tenth of the
///   interval, at most a minute, counts as on time); otherwise it is due
///   one interval after its last start;
/// - a cron sync whose latest slot passed since its last start is due at
///   once; one that never ran is due at its next slot, or at once when
///   `never_run_is_due` (`--once`: a CronJob must run it some time).
pub fn first_slot(schedule: &Schedule, last_start: Option<Time>, now: Time, never_run_is_due: bool) -> Option<Time> {
    match (&schedule.every, last_start) {
        (Some(_), None) => Some(now),
        (Some(every), Some(last)) => {
            let next = next_slot(schedule, last)?;
            let tolerance = TimeDelta::from_std((every.get() / 10).min(Duration::from_secs(60))).ok()?;
            Some(if next <= now + tolerance { now } else { next })
        }
        (None, last) => {
            let next = next_slot(schedule, now)?;
            match (last, latest_slot(schedule, now)) {
                (Some(last), Some(latest)) if latest > last => Some(now),
                (None, Some(_)) if never_run_is_due => Some(now),
                _ => Some(next),
            }
        }
    }
}

/// The latest cron slot at or before `now`.
fn latest_slot(schedule: &Schedule, now: Time) -> Option<Time> {
    let cron = croner::Cron::from_str(schedule.cron.as_deref()?).ok()?;
    cron.find_previous_occurrence(&now, true).ok()
}

/// Slots of `schedule` after `slot` that passed by `now` while its run went
/// on: the next slot after them, and how many were skipped.
pub fn skip_missed(schedule: &Schedule, slot: Time, now: Time) -> (Option<Time>, u64) {
    let mut next = next_slot(schedule, slot);
    let mut missed = 0;
    while let Some(at) = next {
        if at > now {
            break;
        }
        missed += 1;
        // Past many slots at once (an interval of seconds, a run of hours):
        // jump to the first slot after now.
        if missed > 10_000 {
            next = next_slot(schedule, now);
            break;
        }
        next = next_slot(schedule, at);
    }
    (next, missed)
}

/// How long to wait after `failures` failed runs in a row: `base`, doubled
/// for each further failure, at most `max`.
pub fn backoff(failures: u32, base: Duration, max: Duration) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32.checked_shl(failures.saturating_sub(1).min(30)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

/// The first slot of `schedule` at or after `earliest`, after `slot`.
pub fn slot_at_or_after(schedule: &Schedule, slot: Time, earliest: Time) -> Option<Time> {
    if schedule.every.is_some() {
        let (next, _) = skip_missed(schedule, slot, earliest - TimeDelta::nanoseconds(1));
        return next;
    }
    let cron = croner::Cron::from_str(schedule.cron.as_deref()?).ok()?;
    let at = cron.find_next_occurrence(&earliest, true).ok()?.with_nanosecond(0)?;
    // Inclusive of `earliest` only when it is a whole second.
    if at < earliest { next_slot(schedule, earliest) } else { Some(at) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> Time {
        Utc.with_ymd_and_hms(2026, 11, 23, h, m, s).unwrap()
    }
    fn cron(c: &str) -> Schedule {
        Schedule { cron: Some(c.into()), every: None }
    }
    fn every(d: &str) -> Schedule {
        Schedule { cron: None, every: Some(d.parse().unwrap()) }
    }

    #[test]
    fn cron_and_interval_schedules_give_the_next_slot() {
        assert_eq!(next_slot(&cron("*/15 * * * *"), at(10, 7, 0)), Some(at(10, 15, 0)));
        assert_eq!(next_slot(&every("90s"), at(10, 7, 0)), Some(at(10, 8, 30)));
    }

    #[test]
    fn a_run_past_three_slots_skips_them_once() {
        let (next, missed) = skip_missed(&every("1m"), at(10, 0, 0), at(10, 3, 30));
        assert_eq!((next, missed), (Some(at(10, 4, 0)), 3));
        let (next, missed) = skip_missed(&cron("*/15 * * * *"), at(10, 0, 0), at(10, 31, 0));
        assert_eq!((next, missed), (Some(at(10, 45, 0)), 2));
        assert_eq!(skip_missed(&every("1m"), at(10, 0, 0), at(10, 0, 20)), (Some(at(10, 1, 0)), 0));
    }

    #[test]
    fn failures_in_a_row_double_the_wait_up_to_the_maximum() {
        let (base, max) = (Duration::from_secs(60), Duration::from_secs(3600));
        let waits: Vec<u64> = (0..9).map(|n| backoff(n, base, max).as_secs()).collect();
        assert_eq!(waits, [0, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(backoff(u32::MAX, base, max), max);
    }

    #[test]
    fn the_next_attempt_after_a_backoff_keeps_to_the_schedule() {
        assert_eq!(slot_at_or_after(&every("1m"), at(10, 0, 0), at(10, 2, 30)), Some(at(10, 3, 0)));
        assert_eq!(slot_at_or_after(&every("1m"), at(10, 0, 0), at(10, 2, 0)), Some(at(10, 2, 0)));
        assert_eq!(slot_at_or_after(&cron("0 * * * *"), at(10, 0, 0), at(10, 30, 0)), Some(at(11, 0, 0)));
    }

    #[test]
    fn on_start_a_sync_is_due_when_a_slot_passed_since_its_last_run() {
        let now = at(10, 7, 0);
        assert_eq!(first_slot(&every("15m"), None, now, false), Some(now));
        assert_eq!(first_slot(&every("15m"), Some(at(10, 0, 0)), now, false), Some(at(10, 15, 0)));
        assert_eq!(first_slot(&every("15m"), Some(at(9, 0, 0)), now, false), Some(now));
        // Started 5 s after its slot: on time for the next one.
        assert_eq!(first_slot(&every("15m"), Some(at(9, 52, 5)), now, false), Some(now));
        // Cron: the 10:00 slot passed after a run at 09:50: due now.
        assert_eq!(first_slot(&cron("*/15 * * * *"), Some(at(9, 50, 0)), now, false), Some(now));
        assert_eq!(first_slot(&cron("*/15 * * * *"), Some(at(10, 1, 0)), now, false), Some(at(10, 15, 0)));
        // Never run: the next slot (a new cron sync does not run at start),
        // but `--once` runs it.
        assert_eq!(first_slot(&cron("*/15 * * * *"), None, now, false), Some(at(10, 15, 0)));
        assert_eq!(first_slot(&cron("*/15 * * * *"), None, now, true), Some(now));
        assert_eq!(latest_slot(&cron("*/15 * * * *"), now), Some(at(10, 0, 0)));
        assert_eq!(latest_slot(&cron("0 3 * * 1"), at(10, 7, 0)), Some(at(3, 0, 0)));
    }
}
