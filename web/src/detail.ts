// The detail page of one VM: status and conditions, power actions (with force stop and pause),
// snapshots (take, restore, delete), backups to a registry (see backups.ts) and the backup policy with its last result, the events this tab has seen, the manifest, a screen
// thumbnail and deletion with confirmation.

import { Snapshot, Vm, backend, cloneVm, migrate, power, request, screenshotUrl, vmPath } from "./api";
import { backupSection } from "./backups";
import { h, importIndicator, phaseBadge, replaceChildren, timeAgo } from "./dom";
import { resourcesOf } from "./list";
import { store } from "./store";
import { Page, confirmDialog, errorBox, toast } from "./ui";
import { spinner } from "./dom";
import { toYaml } from "./yaml";

const SNAPSHOT_NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$/;

/** `spec.backup` of a VirtualMachineApp. */
interface BackupPolicy {
  schedule: string;
  keep?: number;
  repository: string;
  suspend?: boolean;
}

/** `status.backup` of a VirtualMachineApp. */
interface BackupPolicyStatus {
  nextScheduleTime?: string;
  lastBackup?: { time: string; reference: string; tag: string };
  lastFailure?: { time: string; message: string };
}

interface PowerButton {
  action: string;
  label: string;
  busy: string;
  enabledIn: string[];
  danger?: boolean;
}

const POWER: PowerButton[] = [
  { action: "start", label: "Start", busy: "Starting…", enabledIn: ["Stopped", "Failed", "CrashLoopBackOff"] },
  { action: "stop", label: "Stop", busy: "Stopping (asking the guest)…", enabledIn: ["Running", "Paused", "Starting", "CrashLoopBackOff"] },
  { action: "restart", label: "Restart", busy: "Restarting…", enabledIn: ["Running"] },
  { action: "pause", label: "Pause", busy: "Pausing…", enabledIn: ["Running"] },
  { action: "unpause", label: "Resume", busy: "Resuming…", enabledIn: ["Paused"] },
  { action: "forcestop", label: "Force stop", busy: "Switching off…", enabledIn: ["Running", "Paused", "Starting", "Stopping", "CrashLoopBackOff"], danger: true },
];

/** KubeVirt-style conditions derived from the status the backend reports. */
function conditions(vm: Vm): { type: string; status: string; reason: string; message: string }[] {
  const phase = vm.status.phase;
  const exit = vm.status.lastExit;
  return [
    { type: "Ready", status: phase === "Running" ? "True" : "False", reason: phase, message: vm.status.message ?? "" },
    { type: "Paused", status: phase === "Paused" ? "True" : "False", reason: phase === "Paused" ? "PausedByUser" : "", message: "" },
    {
      type: "Failure",
      status: phase === "Failed" || phase === "CrashLoopBackOff" ? "True" : "False",
      reason: exit?.kind ?? "",
      message: exit ? `${exit.message} (${new Date(exit.at).toLocaleString()})` : "",
    },
  ];
}

export const detailPage: Page = (root, [namespace, name]) => {
  const errorArea = h("div", {});
  const body = h("div", {});
  let screenUrl = "";
  let screenFetched = 0;
  let fetchError: unknown = null;
  replaceChildren(root, h("p", { class: "breadcrumbs" }, h("a", { href: "#/" }, "Virtual machines"), " / ", `${namespace}/${name}`), errorArea, body);
  const snapshotName = h("input", { type: "text", id: "snapshot-name", autocomplete: "off", spellcheck: "false", "aria-describedby": "snapshot-help" });
  const snapshotMemory = h("input", { type: "checkbox", id: "snapshot-memory" });
  const snapshotError = h("div", {});
  // One operation at a time: its progress line survives re-renders (events arrive while a VM
  // stops or a snapshot is taken), and every action button is disabled meanwhile.
  const progress = h("div", { class: "progress", role: "status", "aria-live": "polite", id: "operation-progress" });
  let operation: { label: string; started: number } | null = null;
  const run = async (label: string, work: () => Promise<void>, errorTarget: HTMLElement): Promise<void> => {
    if (operation) return;
    operation = { label, started: Date.now() };
    const text = h("span", {}, label);
    replaceChildren(progress, spinner(label), text);
    const timer = setInterval(() => {
      if (operation) text.textContent = `${operation.label} ${Math.round((Date.now() - operation.started) / 1000)} s`;
    }, 1000);
    render();
    try {
      await work();
      errorTarget.replaceChildren();
    } catch (error) {
      replaceChildren(errorTarget, errorBox(error));
    } finally {
      clearInterval(timer);
      operation = null;
      progress.replaceChildren();
      render();
    }
  };

  // Parts that user input lives in are built once and moved into each render, so typing is not
  // lost when an event re-renders the page.
  const snapshotForm = h(
    "form",
    { class: "inline-form", "aria-label": "Take a snapshot" },
    h("label", { for: "snapshot-name" }, "Name"),
    snapshotName,
    h("label", { class: "checkbox" }, snapshotMemory, " Include memory (resume exactly here)"),
    h("button", { type: "submit", id: "snapshot-create" }, "Take snapshot"),
    h("div", { class: "help", id: "snapshot-help" }, "Letters, digits, '-', '_', '.'; memory snapshots need a running or paused VM."),
  );
  // KubeVirt snapshots are disk-only: the API answers 422 to memory snapshots in a cluster.
  if (backend() === "kubernetes") {
    snapshotMemory.closest("label")?.remove();
    const help = snapshotForm.querySelector("#snapshot-help");
    if (help) help.textContent = "Letters, digits, '-', '_', '.'; a VirtualMachineSnapshot of the disks (KubeVirt does not save memory).";
  }
  snapshotForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const vm = store.get(namespace, name);
    const snapshot = snapshotName.value.trim() || `snapshot-${new Date().toISOString().replace(/[-:]/g, "").slice(0, 15)}`;
    if (!SNAPSHOT_NAME.test(snapshot) || /^[0-9]+$/.test(snapshot)) {
      replaceChildren(snapshotError, errorBox("Use 1 to 64 letters, digits, '-', '_' or '.', not only digits.", "Invalid snapshot name"));
      snapshotName.focus();
      return;
    }
    void run(snapshotMemory.checked ? `Saving memory and disk to ${snapshot}…` : `Taking snapshot ${snapshot}…`, async () => {
      await request<Snapshot>("POST", `${vmPath(namespace, name)}/snapshots`, {
        text: JSON.stringify({ name: snapshot, memory: snapshotMemory.checked }),
        contentType: "application/json",
      });
      snapshotName.value = "";
      toast(`Snapshot ${snapshot} taken`);
      if (vm) store.put(await refreshed());
    }, snapshotError);
  });

  const refreshed = (): Promise<Vm> => request<Vm>("GET", vmPath(namespace, name));

  // The snapshot schedule: the VirtualMachineApp's spec.snapshots, which the cluster's operator
  // runs. Local mode has no scheduler, so it only says where schedules run.
  const scheduleCron = h("input", { type: "text", id: "schedule-cron", autocomplete: "off", spellcheck: "false", placeholder: "0 3 * * *", "aria-describedby": "schedule-help" });
  const scheduleKeep = h("input", { type: "number", id: "schedule-keep", min: 1, max: 1000, value: 7 });
  const scheduleSave = h("button", { type: "submit", id: "schedule-save" }, "Set schedule");
  const scheduleClear = h("button", { type: "button", id: "schedule-clear", class: "danger" }, "Clear schedule");
  const scheduleError = h("div", {});
  let scheduleFilled = false;
  const scheduleForm = h(
    "form",
    { class: "inline-form", "aria-label": "Snapshot schedule", id: "schedule-form" },
    h("label", { for: "schedule-cron" }, "Schedule"),
    scheduleCron,
    h("label", { for: "schedule-keep" }, "Keep"),
    scheduleKeep,
    scheduleSave,
    scheduleClear,
    h("div", { class: "help", id: "schedule-help" }, "Five-field cron in UTC (minute hour day-of-month month day-of-week), e.g. '0 3 * * *', or @daily; older scheduled snapshots beyond 'keep' are deleted."),
  );
  const schedulePath = (): string => `${vmPath(namespace, name)}/snapshot-schedule`;
  scheduleForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const schedule = scheduleCron.value.trim();
    const keep = Number(scheduleKeep.value || "7");
    void run(`Setting the snapshot schedule to ${schedule}…`, async () => {
      store.put(await request<Vm>("PUT", schedulePath(), { text: JSON.stringify({ schedule, keep }), contentType: "application/json" }));
      toast(`Snapshots scheduled: ${schedule}`);
    }, scheduleError);
  });
  scheduleClear.addEventListener("click", () => {
    void run("Clearing the snapshot schedule…", async () => {
      store.put(await request<Vm>("DELETE", schedulePath()));
      scheduleCron.value = "";
      toast("Snapshot schedule cleared");
    }, scheduleError);
  });
  const scheduleSection = (vm: Vm): HTMLElement => {
    if (backend() !== "kubernetes") {
      return h("p", { class: "muted", id: "snapshot-schedule" }, "Scheduled snapshots: schedules run in cluster mode (the paddock operator takes them); here snapshots are taken on request.");
    }
    if (vm.manifest.kind !== "VirtualMachineApp") {
      return h("p", { class: "muted", id: "snapshot-schedule" }, "Scheduled snapshots need a VirtualMachineApp; this is a plain KubeVirt VirtualMachine.");
    }
    const current = (vm.manifest.spec as { snapshots?: { schedule: string; keep?: number } } | undefined)?.snapshots;
    if (current && !scheduleFilled) {
      scheduleCron.value = current.schedule;
      scheduleKeep.value = String(current.keep ?? 7);
    }
    scheduleFilled = true;
    scheduleSave.disabled = Boolean(operation);
    scheduleClear.disabled = Boolean(operation) || !current;
    return h(
      "div",
      { class: "schedule" },
      h(
        "p",
        { id: "snapshot-schedule", "data-schedule": current?.schedule ?? "" },
        current ? `Scheduled snapshots: ${current.schedule} (UTC), keeping the newest ${current.keep ?? 7}.` : "No scheduled snapshots.",
      ),
      scheduleForm,
      scheduleError,
    );
  };
  const backups = backupSection(namespace, name);
  // The backup policy (spec.backup, run by the cluster's operator) and what it last did
  // (status.backup, condition BackupSucceeded); read-only: edit it in the manifest.
  const backupPolicySection = (vm: Vm): HTMLElement | null => {
    if (vm.manifest.kind !== "VirtualMachineApp") return null;
    const policy = (vm.manifest.spec as { backup?: BackupPolicy } | undefined)?.backup;
    const status = (vm.manifest.status as { backup?: BackupPolicyStatus; conditions?: { type: string; status: string; reason: string; message: string }[] } | undefined);
    const condition = status?.conditions?.find((item) => item.type === "BackupSucceeded");
    const last = status?.backup?.lastBackup;
    const failure = status?.backup?.lastFailure;
    const next = status?.backup?.nextScheduleTime;
    return h(
      "section",
      { "aria-labelledby": "backup-policy-title", id: "backup-policy", "data-condition": condition?.status ?? "" },
      h("h2", { id: "backup-policy-title" }, "Scheduled backups"),
      policy
        ? h(
            "p",
            { id: "backup-policy-schedule" },
            `${policy.suspend ? "Suspended: " : ""}${policy.schedule} (UTC) to ${policy.repository}, keeping the newest ${policy.keep ?? 7}${backend() === "kubernetes" ? "" : " (schedules run in cluster mode)"}.`,
          )
        : h("p", { class: "muted", id: "backup-policy-schedule" }, "No scheduled backups: set spec.backup in the manifest."),
      last ? h("p", { id: "backup-policy-last" }, `Last backup ${timeAgo(last.time)}: `, h("code", {}, last.reference)) : null,
      next ? h("p", { class: "muted" }, `Next backup due ${new Date(next).toLocaleString()}.`) : null,
      condition && condition.status !== "True" && failure ? errorBox(failure.message, "The last backup failed") : null,
      condition && condition.reason === "PruningNotPossible" ? h("p", { class: "muted" }, condition.message) : null,
    );
  };

  const powerAction = (item: PowerButton): void => {
    void run(item.busy, async () => {
      store.put(await power(namespace, name, item.action));
    }, errorArea);
  };

  // Kubernetes mode: live migration to another node, and a clone (VirtualMachineClone).
  const migrateVm = (vm: Vm): void => {
    void run(`Migrating ${vm.name} to another node…`, async () => {
      store.put(await migrate(namespace, name));
      toast(`Migration of ${vm.name} started`);
    }, errorArea);
  };

  const cloneName = h("input", { type: "text", id: "clone-name", autocomplete: "off", spellcheck: "false" });
  const cloneDialog = async (vm: Vm): Promise<void> => {
    cloneName.value = `${vm.name}-copy`;
    const confirmed = await confirmDialog({
      title: `Clone ${vm.name}?`,
      body: [`A new VM with a copy of ${vm.name}'s disks, in namespace ${vm.namespace}.`],
      confirmLabel: "Clone",
      extra: h("label", {}, "Name of the copy ", cloneName),
    });
    const target = cloneName.value.trim();
    if (!confirmed || !target) return;
    await run(`Cloning ${vm.name} to ${target}…`, async () => {
      const clone = await cloneVm(namespace, name, target);
      store.put(clone);
      toast(`${clone.name} created from ${vm.name}`);
    }, errorArea);
  };

  const deleteVm = async (vm: Vm): Promise<void> => {
    const force = h("input", { type: "checkbox", id: "delete-snapshots" });
    const confirmed = await confirmDialog({
      title: `Delete ${vm.name}?`,
      body: ["The VM is switched off and its disk is deleted. This cannot be undone."],
      confirmLabel: "Delete VM",
      typeToConfirm: vm.name,
      extra: vm.snapshots.length
        ? h("label", { class: "checkbox" }, force, ` Also delete its ${vm.snapshots.length} snapshot(s) (required)`)
        : undefined,
    });
    if (!confirmed) return;
    await run(`Deleting ${vm.name}…`, async () => {
      await request("DELETE", `${vmPath(namespace, name)}${force.checked ? "?force=true" : ""}`);
      store.remove(namespace, name);
      toast(`${vm.name} deleted`);
      location.hash = "#/";
    }, errorArea);
  };

  const snapshotRow = (snapshot: Snapshot): HTMLElement => {
    const restore = h("button", { type: "button", class: "small", "data-action": "restore", disabled: Boolean(operation) }, "Restore");
    const remove = h("button", { type: "button", class: "small danger", "data-action": "delete", disabled: Boolean(operation) }, "Delete");
    restore.addEventListener("click", async () => {
      const ok = await confirmDialog({
        title: `Restore ${snapshot.name}?`,
        body: [
          snapshot.memory
            ? "The VM goes back to the moment of the snapshot, memory included; whatever happened since is lost."
            : "The disk goes back to the snapshot; the VM must be stopped. Changes since are lost.",
        ],
        confirmLabel: "Restore",
      });
      if (!ok) return;
      await run(`Restoring ${snapshot.name}…`, async () => {
        store.put(await request<Vm>("PUT", `${vmPath(namespace, name)}/snapshots/${encodeURIComponent(snapshot.name)}/restore`));
        toast(`Restored ${snapshot.name}`);
      }, snapshotError);
    });
    remove.addEventListener("click", async () => {
      const ok = await confirmDialog({ title: `Delete snapshot ${snapshot.name}?`, body: ["The snapshot's data is deleted; the VM is not affected."], confirmLabel: "Delete snapshot" });
      if (!ok) return;
      await run(`Deleting snapshot ${snapshot.name}…`, async () => {
        await request("DELETE", `${vmPath(namespace, name)}/snapshots/${encodeURIComponent(snapshot.name)}`);
        store.put(await refreshed());
      }, snapshotError);
    });
    return h(
      "tr",
      { "data-snapshot": snapshot.name },
      h("td", {}, snapshot.name),
      h("td", {}, timeAgo(snapshot.createdAt)),
      h("td", {}, snapshot.memory ? "memory + disk" : "disk only"),
      h("td", {}, snapshot.takenInPhase),
      h("td", { class: "row-actions" }, restore, remove),
    );
  };

  const render = (): void => {
    const vm = store.get(namespace, name);
    if (!vm) {
      if (fetchError) {
        // Why this VM cannot be fetched (a 403 names the permission) beats "not found".
        replaceChildren(body, errorBox(fetchError, `Cannot show ${namespace}/${name}`), h("p", {}, h("a", { href: "#/" }, "Back to the list")));
      } else if (store.loaded) {
        replaceChildren(body, errorBox(`There is no VM ${namespace}/${name} (any more).`, "Not found"), h("p", {}, h("a", { href: "#/" }, "Back to the list")));
      }
      return;
    }
    const phase = vm.status.phase;
    const running = phase === "Running" || phase === "Paused";
    backups.update(vm);
    if (vm.console.vnc && running && Date.now() - screenFetched > 10000) {
      screenFetched = Date.now();
      screenshotUrl(namespace, name).then(
        (url) => {
          if (screenUrl) URL.revokeObjectURL(screenUrl);
          screenUrl = url;
          render();
        },
        () => undefined,
      );
    }
    const consoleHref = `#/vm/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}`;
    const powerButtons = POWER.map((item) => {
      const button = h("button", { type: "button", class: item.danger ? "danger" : "", "data-action": item.action, disabled: Boolean(operation) || !item.enabledIn.includes(phase) }, item.label);
      button.addEventListener("click", () => powerAction(item));
      return button;
    });
    const deleteButton = h("button", { type: "button", class: "danger", id: "vm-delete", disabled: Boolean(operation) }, "Delete…");
    for (const button of snapshotForm.querySelectorAll("button")) button.disabled = Boolean(operation);
    deleteButton.addEventListener("click", () => void deleteVm(vm));
    const clusterButtons: HTMLElement[] = [];
    if (backend() === "kubernetes") {
      const migrateButton = h("button", { type: "button", id: "vm-migrate", disabled: Boolean(operation) || phase !== "Running" }, "Migrate");
      migrateButton.addEventListener("click", () => migrateVm(vm));
      const cloneButton = h("button", { type: "button", id: "vm-clone", disabled: Boolean(operation) }, "Clone…");
      cloneButton.addEventListener("click", () => void cloneDialog(vm));
      clusterButtons.push(migrateButton, cloneButton);
    }
    const events = store.eventsOf(namespace, name).slice(0, 50);
    replaceChildren(
      body,
      h(
        "div",
        { class: "page-head" },
        h("h1", {}, vm.displayName ?? vm.name),
        phaseBadge(phase),
        h("span", { class: "spacer" }),
        vm.console.vnc ? h("a", { class: `button${running ? " primary" : " disabled"}`, href: `${consoleHref}/console`, "aria-disabled": running ? null : "true", id: "open-console" }, "Open console") : null,
        vm.console.serial ? h("a", { class: `button${running ? "" : " disabled"}`, href: `${consoleHref}/serial`, "aria-disabled": running ? null : "true", id: "open-serial" }, "Serial console") : null,
      ),
      h("div", { class: "toolbar", role: "toolbar", "aria-label": "Power" }, powerButtons, h("span", { class: "spacer" }), clusterButtons, deleteButton),
      progress,
      importIndicator(vm.status, "vm-import"),
      vm.status.warnings?.length ? h("div", { class: "warning", role: "note" }, vm.status.warnings.map((warning) => h("p", {}, warning))) : null,
      h(
        "div",
        { class: "two-columns" },
        h(
          "section",
          { "aria-labelledby": "status-title" },
          h("h2", { id: "status-title" }, "Status"),
          h(
            "dl",
            { class: "facts" },
            h("dt", {}, "State"), h("dd", { id: "vm-phase" }, phase),
            h("dt", {}, "Namespace"), h("dd", {}, vm.namespace),
            h("dt", {}, "Run strategy"), h("dd", {}, vm.runStrategy),
            h("dt", {}, "Resources"), h("dd", {}, resourcesOf(vm)),
            h("dt", {}, "Image"), h("dd", { class: "mono" }, String(((vm.manifest.spec as { image?: { containerDisk?: string } })?.image?.containerDisk) ?? "—")),
            h("dt", {}, "Accelerator"), h("dd", {}, vm.status.accelerator ?? "—"),
            h("dt", {}, "Started"), h("dd", {}, timeAgo(vm.status.startedAt)),
            h("dt", {}, "Restarts"), h("dd", {}, vm.status.restartCount),
            h("dt", {}, "Process"), h("dd", {}, vm.status.pid ?? "—"),
            h("dt", {}, "Created"), h("dd", {}, timeAgo(vm.createdAt)),
            vm.status.message ? [h("dt", {}, "Message"), h("dd", {}, vm.status.message)] : null,
            vm.status.lastExit ? [h("dt", {}, "Last exit"), h("dd", {}, `${vm.status.lastExit.kind}: ${vm.status.lastExit.message}`)] : null,
          ),
        ),
        h(
          "section",
          { "aria-labelledby": "screen-title" },
          h("h2", { id: "screen-title" }, "Screen"),
          running && screenUrl
            ? h("a", { href: `${consoleHref}/console`, "aria-label": "Open the console" }, h("img", { class: "screen", src: screenUrl, alt: `Screen of ${vm.name}` }))
            : h("p", { class: "muted" }, running ? "Loading the screen…" : "The VM is not running."),
        ),
      ),
      h(
        "section",
        { "aria-labelledby": "conditions-title" },
        h("h2", { id: "conditions-title" }, "Conditions"),
        h(
          "table",
          {},
          h("thead", {}, h("tr", {}, h("th", {}, "Type"), h("th", {}, "Status"), h("th", {}, "Reason"), h("th", {}, "Message"))),
          h("tbody", {}, conditions(vm).map((condition) => h("tr", {}, h("td", {}, condition.type), h("td", {}, condition.status), h("td", {}, condition.reason), h("td", {}, condition.message)))),
        ),
      ),
      h(
        "section",
        { "aria-labelledby": "snapshots-title" },
        h("h2", { id: "snapshots-title" }, "Snapshots"),
        snapshotForm,
        snapshotError,
        scheduleSection(vm),
        vm.snapshots.length
          ? h(
              "table",
              { id: "snapshots" },
              h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Taken"), h("th", {}, "Contents"), h("th", {}, "VM was"), h("th", {}, h("span", { class: "visually-hidden" }, "Actions")))),
              h("tbody", {}, vm.snapshots.map((snapshot) => snapshotRow(snapshot))),
            )
          : h("p", { class: "muted", id: "snapshots" }, "No snapshots."),
      ),
      backups.element,
      backupPolicySection(vm),
      h(
        "section",
        { "aria-labelledby": "events-title" },
        h("h2", { id: "events-title" }, "Events"),
        events.length
          ? h(
              "ol",
              { class: "events" },
              events.map(({ at, event }) =>
                h(
                  "li",
                  {},
                  h("time", { datetime: at.toISOString() }, at.toLocaleTimeString()),
                  " ",
                  event.type === "Changed" ? `${event.status.phase}${event.status.message ? `: ${event.status.message}` : ""}` : event.type === "SnapshotsChanged" ? `snapshots: ${event.snapshots.map((item) => item.name).join(", ") || "none"}` : event.type,
                ),
              ),
            )
          : h("p", { class: "muted" }, "No events since this page was opened."),
      ),
      h("section", { "aria-labelledby": "manifest-title" }, h("details", {}, h("summary", { id: "manifest-title" }, "Manifest (VirtualMachineApp)"), h("pre", { class: "yaml" }, toYaml(vm.manifest)))),
    );
  };

  const unsubscribe = store.subscribe(render);
  render();
  // The store may hold an older copy (or none yet): fetch this VM fresh.
  refreshed().then(
    (vm) => store.put(vm),
    (error) => {
      fetchError = error;
      render();
    },
  );
  return () => {
    unsubscribe();
    backups.dispose();
    if (screenUrl) URL.revokeObjectURL(screenUrl);
  };
};
