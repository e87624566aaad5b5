//! Snapshot (and later backup) schedules: five-field cron expressions in UTC, the dialect of Kubernetes
//! CronJobs (`minute hour day-of-month month day-of-week`, plus macros such as `@daily`). Seconds and
//! years are refused so a schedule means the same here as in a CronJob.

use croner::{
    Cron,
    parser::{CronParser, Seconds, Year},
};
use thiserror::Error;

/// Why a schedule cannot be used.
#[derive(Debug, Error)]
#[error(
    "'{schedule}' is not a five-field cron schedule ({reason}): write minute hour day-of-month month day-of-week, e.g. '0 3 * * *' for 03:00 UTC daily, or a macro such as @daily"
)]
pub struct ScheduleError {
    /// The schedule as given.
    pub schedule: String,
    /// What the cron parser said.
    pub reason: String,
}

/// Parses a schedule.
pub fn parse_schedule(schedule: &str) -> Result<Cron, ScheduleError> {
    let error = |reason: String| ScheduleError {
        schedule: schedule.to_owned(),
        reason,
    };
    let fields = schedule.split_whitespace().count();
    if !schedule.trim_start().starts_with('@') && fields != 5 {
        return Err(error(format!("it has {fields} fields")));
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(schedule)
        .map_err(|parse_error| error(parse_error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_cronjob_schedules() {
        for schedule in [
            "0 3 * * *",
            "*/15 * * * *",
            "0 0 * * MON-FRI",
            "@daily",
            "@hourly",
        ] {
            assert!(parse_schedule(schedule).is_ok(), "{schedule} should parse");
        }
    }

    #[test]
    fn refuses_seconds_years_and_nonsense() {
        for schedule in ["0 0 3 * * *", "0 3 * * * 2030", "61 * * * *", "every day", ""] {
            let error = parse_schedule(schedule)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                error.contains("five-field"),
                "{schedule:?} should be refused, got {error:?}"
            );
        }
    }
}
