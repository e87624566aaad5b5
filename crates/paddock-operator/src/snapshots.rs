//! Scheduled snapshots: when a VirtualMachineApp with `spec.snapshots` needs a new
//! VirtualMachineSnapshot, which old ones to prune, and when to look again.
//!
//! Contract: [`plan`] is a pure function of the schedule, `keep`, the time, the app's creation time and
//! the scheduled snapshots that exist. It keeps no state: the last scheduled time is read back from
//! the snapshots themselves (annotation [`SCHEDULED_AT_ANNOTATION`]), and a snapshot's name is derived
//! from its scheduled time, so an operator killed between creating a snapshot and recording anything
//! creates the same name again (the API server answers AlreadyExists) instead of a duplicate.
//!
//! Semantics follow CronJobs with `concurrencyPolicy: Forbid`-like catch-up: missed times are not
//! back-filled one by one; only the latest missed time is taken, and nothing before the app existed.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::{Timestamp, tz::TimeZone};
use paddock_api::{
    builders::{APP_LABEL, MANAGED_BY_LABEL, MANAGER},
    kubevirt::virtualmachinesnapshot::{
        VirtualMachineSnapshot, VirtualMachineSnapshotSource, VirtualMachineSnapshotSpec,
    },
    schedule::parse_schedule,
};

/// Label marking snapshots paddock took on schedule (value `"true"`); manual snapshots lack it and are
/// never pruned.
pub const SCHEDULED_LABEL: &str = "paddock.dev/scheduled-snapshot";
/// Annotation holding the scheduled time (RFC 3339, UTC) a snapshot was taken for.
pub const SCHEDULED_AT_ANNOTATION: &str = "paddock.dev/scheduled-at";

/// A scheduled snapshot that exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingSnapshot {
    /// Its name.
    pub name: String,
    /// The scheduled time it was taken for.
    pub scheduled_at: Timestamp,
    /// KubeVirt's phase (`InProgress`, `Succeeded`, `Failed`, ...).
    pub phase: Option<String>,
    /// KubeVirt's error message, when it reported one.
    pub error: Option<String>,
}

/// What to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// A snapshot to create: its name and scheduled time.
    pub create: Option<(String, Timestamp)>,
    /// Scheduled snapshots to delete, oldest first.
    pub delete: Vec<String>,
    /// The next scheduled time after now: reconcile again then.
    pub next: Timestamp,
    /// The newest snapshot failed: its name and KubeVirt's message.
    pub failed: Option<(String, String)>,
}

/// Why no plan can be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The schedule does not parse.
    #[error(transparent)]
    Schedule(#[from] paddock_api::schedule::ScheduleError),
    /// The schedule never fires (e.g. February 30th).
    #[error("snapshots.schedule '{schedule}' never fires after {after}: choose a date that exists")]
    NeverFires {
        /// The schedule.
        schedule: String,
        /// The time searched from.
        after: Timestamp,
    },
}

/// The name of the snapshot of `app_name` scheduled at `at`: `<app>-<YYYYMMDDhhmm>` (UTC).
pub fn snapshot_name(app_name: &str, at: Timestamp) -> String {
    format!("{app_name}-{}", at.strftime("%Y%m%d%H%M"))
}

fn civil(at: Timestamp) -> k8s_openapi::jiff::civil::DateTime {
    at.to_zoned(TimeZone::UTC).datetime()
}

fn timestamp(at: k8s_openapi::jiff::civil::DateTime) -> Option<Timestamp> {
    at.to_zoned(TimeZone::UTC).ok().map(|zoned| zoned.timestamp())
}

/// Decides what to create and delete for `app_name`.
pub fn plan(
    app_name: &str,
    schedule: &str,
    keep: u32,
    now: Timestamp,
    app_created: Timestamp,
    existing: &[ExistingSnapshot],
) -> Result<Plan, PlanError> {
    let cron = parse_schedule(schedule)?;
    let never = |after| PlanError::NeverFires {
        schedule: schedule.to_owned(),
        after,
    };
    let last = existing
        .iter()
        .map(|snapshot| snapshot.scheduled_at)
        .max()
        .unwrap_or(app_created)
        .max(app_created);
    let latest_due = cron
        .find_previous_occurrence(&civil(now), true)
        .ok()
        .and_then(timestamp);
    let create = latest_due
        .filter(|due| *due > last && *due <= now)
        .map(|due| (snapshot_name(app_name, due), due));
    let next = cron
        .find_next_occurrence(&civil(now), false)
        .ok()
        .and_then(timestamp)
        .ok_or_else(|| never(now))?;

    let mut sorted: Vec<&ExistingSnapshot> = existing.iter().collect();
    sorted.sort_by_key(|snapshot| snapshot.scheduled_at);
    let total = sorted.len() + usize::from(create.is_some());
    let excess = total.saturating_sub(usize::try_from(keep).unwrap_or(usize::MAX));
    let delete = sorted
        .iter()
        .take(excess)
        .map(|snapshot| snapshot.name.clone())
        .collect();
    let failed = sorted.last().and_then(|newest| {
        (newest.phase.as_deref() == Some("Failed") || newest.error.is_some()).then(|| {
            (
                newest.name.clone(),
                newest
                    .error
                    .clone()
                    .unwrap_or_else(|| "KubeVirt reported phase Failed".to_owned()),
            )
        })
    });
    Ok(Plan {
        create,
        delete,
        next,
        failed,
    })
}

/// The VirtualMachineSnapshot to create for a plan's `create`.
pub fn build_snapshot(
    app_name: &str,
    namespace: &str,
    owner: OwnerReference,
    name: &str,
    scheduled_at: Timestamp,
) -> VirtualMachineSnapshot {
    VirtualMachineSnapshot {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned()),
                (APP_LABEL.to_owned(), app_name.to_owned()),
                (SCHEDULED_LABEL.to_owned(), "true".to_owned()),
            ])),
            annotations: Some(BTreeMap::from([(
                SCHEDULED_AT_ANNOTATION.to_owned(),
                scheduled_at.to_string(),
            )])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: VirtualMachineSnapshotSpec {
            source: VirtualMachineSnapshotSource {
                api_group: Some("kubevirt.io".to_owned()),
                kind: "VirtualMachine".to_owned(),
                name: app_name.to_owned(),
            },
            ..VirtualMachineSnapshotSpec::default()
        },
        status: None,
    }
}

/// Reads a scheduled snapshot back, or `None` for a snapshot paddock did not schedule.
pub fn existing(snapshot: &VirtualMachineSnapshot) -> Option<ExistingSnapshot> {
    let scheduled_at = snapshot
        .metadata
        .annotations
        .as_ref()?
        .get(SCHEDULED_AT_ANNOTATION)?
        .parse()
        .ok()?;
    let status = snapshot.status.as_ref();
    Some(ExistingSnapshot {
        name: snapshot.metadata.name.clone()?,
        scheduled_at,
        phase: status.and_then(|s| s.phase.clone()),
        error: status
            .and_then(|s| s.error.as_ref())
            .and_then(|e| e.message.clone()),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn snapshot(name: &str, scheduled: &str, phase: &str) -> ExistingSnapshot {
        ExistingSnapshot {
            name: name.to_owned(),
            scheduled_at: at(scheduled),
            phase: Some(phase.to_owned()),
            error: None,
        }
    }

    #[test]
    fn first_snapshot_waits_for_the_first_time_after_the_app_existed() {
        let created = at("2026-01-01T03:30:00Z");
        let plan = plan("vm", "0 3 * * *", 3, at("2026-01-01T12:00:00Z"), created, &[]).unwrap();
        assert_eq!(plan.create, None);
        assert_eq!(plan.next, at("2026-01-02T03:00:00Z"));
        let plan = plan_at("2026-01-02T03:00:20Z", created, &[]);
        assert_eq!(
            plan.create,
            Some(("vm-202601020300".to_owned(), at("2026-01-02T03:00:00Z")))
        );
        assert_eq!(plan.next, at("2026-01-03T03:00:00Z"));
    }

    fn plan_at(now: &str, created: Timestamp, existing: &[ExistingSnapshot]) -> Plan {
        plan("vm", "0 3 * * *", 3, at(now), created, existing).unwrap()
    }

    #[test]
    fn missed_times_take_only_the_latest_and_a_taken_time_is_not_repeated() {
        let created = at("2025-12-01T00:00:00Z");
        let existing = [snapshot("vm-202512020300", "2025-12-02T03:00:00Z", "Succeeded")];
        let plan = plan_at("2025-12-05T10:00:00Z", created, &existing);
        assert_eq!(plan.create.unwrap().0, "vm-202512050300");
        let existing = [snapshot("vm-202512050300", "2025-12-05T03:00:00Z", "Succeeded")];
        let plan = plan_at("2025-12-05T10:00:00Z", created, &existing);
        assert_eq!(plan.create, None);
    }

    #[test]
    fn prunes_the_oldest_beyond_keep_counting_the_new_one() {
        let created = at("2025-12-01T00:00:00Z");
        let existing = [
            snapshot("c", "2025-12-04T03:00:00Z", "Succeeded"),
            snapshot("a", "2025-12-02T03:00:00Z", "Succeeded"),
            snapshot("b", "2025-12-03T03:00:00Z", "Succeeded"),
        ];
        let plan = plan_at("2025-12-05T03:00:01Z", created, &existing);
        assert!(plan.create.is_some());
        assert_eq!(plan.delete, vec!["a".to_owned()]);
        let plan = plan_at("2025-12-04T05:00:00Z", created, &existing);
        assert!(plan.create.is_none());
        assert!(plan.delete.is_empty());
    }

    #[test]
    fn the_newest_failure_is_reported() {
        let created = at("2025-12-01T00:00:00Z");
        let mut failed = snapshot("b", "2025-12-03T03:00:00Z", "Failed");
        failed.error = Some("volume snapshot class missing".to_owned());
        let existing = [snapshot("a", "2025-12-02T03:00:00Z", "Succeeded"), failed];
        let plan = plan_at("2025-12-03T05:00:00Z", created, &existing);
        assert_eq!(
            plan.failed,
            Some(("b".to_owned(), "volume snapshot class missing".to_owned()))
        );
    }

    #[test]
    fn bad_schedules_are_errors_with_the_fix() {
        let error = plan(
            "vm",
            "every day",
            1,
            at("2026-01-01T00:00:00Z"),
            at("2026-01-01T00:00:00Z"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("five-field"), "{error}");
    }

    #[test]
    fn built_snapshot_round_trips_through_existing() {
        let owner = OwnerReference {
            api_version: "paddock.dev/v1alpha1".to_owned(),
            kind: "VirtualMachineApp".to_owned(),
            name: "vm".to_owned(),
            uid: "1".to_owned(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let when = at("2026-01-02T03:00:00Z");
        let built = build_snapshot("vm", "ns", owner, &snapshot_name("vm", when), when);
        let read = existing(&built).unwrap();
        assert_eq!(read.scheduled_at, when);
        assert_eq!(read.name, "vm-202601020300");
        assert_eq!(built.spec.source.name, "vm");
    }
}
