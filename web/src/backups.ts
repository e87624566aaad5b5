// Backups to a registry: the Backups section of a VM's detail page (back up now, progress, the
// VM's backups with Restore as a new VM or in place) and the Backups page listing a repository.
//
// A backup or restore is a long-running operation on the server (POST answers 202 with it); this
// module polls GET /api/v1/operations/{id} until it has Succeeded or Failed, and picks up an
// operation still running when the page is opened again. The repository and the insecure choice
// are remembered in localStorage (they are not secrets; registry credentials stay on the server).

import { Vm, backend, request, vmPath } from "./api";
import { h, replaceChildren, timeAgo } from "./dom";
import { store } from "./store";
import { Page, confirmDialog, errorBox, toast } from "./ui";

const REPOSITORY_KEY = "paddock.backup.repository";
const INSECURE_KEY = "paddock.backup.insecure";
const POLL_MILLISECONDS = 500;

/** The `Backup` schema: one complete backup in a registry. */
export interface Backup {
  reference: string;
  pinnedReference: string;
  tag: string;
  digest: string;
  size: number;
  namespace: string;
  name: string;
  createdAt: string;
  diskVirtualSize: number;
  displayName?: string;
}

/** The `Operation` schema: a backup or restore running on the server. */
export interface Operation {
  id: string;
  kind: "Backup" | "Restore";
  namespace: string;
  name: string;
  phase: "Running" | "Succeeded" | "Failed";
  progress: { stage: string; bytesDone: number; bytesTotal: number; percent?: number };
  message: string;
  startedAt: string;
  finishedAt?: string;
  result?: string;
  backup?: Backup;
}

function json(body: unknown): { text: string; contentType: string } {
  return { text: JSON.stringify(body), contentType: "application/json" };
}

/** Starts a backup of a VM. */
export function startBackup(namespace: string, name: string, repository: string, insecure: boolean): Promise<Operation> {
  return request<Operation>("POST", `${vmPath(namespace, name)}/backups`, json({ repository, insecure }));
}

/** The complete backups in a repository (of one VM when `vm` is given), oldest first. */
export async function listBackups(repository: string, insecure: boolean, vm?: { namespace: string; name: string }): Promise<Backup[]> {
  const query = `repository=${encodeURIComponent(repository)}&insecure=${insecure}`;
  const path = vm ? `${vmPath(vm.namespace, vm.name)}/backups?${query}` : `/api/v1/backups?${query}`;
  return (await request<{ items: Backup[] }>("GET", path)).items;
}

/** Starts a restore of a backup as VM `name` (replacing a stopped VM of that name with `replace`). */
export function startRestore(backup: Backup, insecure: boolean, target: { namespace: string; name: string; replace: boolean; start: boolean }): Promise<Operation> {
  return request<Operation>("POST", "/api/v1/backups/restore", json({ reference: backup.pinnedReference, insecure, ...target }));
}

/** One operation. */
export function getOperation(id: string): Promise<Operation> {
  return request<Operation>("GET", `/api/v1/operations/${encodeURIComponent(id)}`);
}

/** Human-readable bytes (binary units). */
export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function remembered(): { repository: string; insecure: boolean } {
  return { repository: localStorage.getItem(REPOSITORY_KEY) ?? "", insecure: localStorage.getItem(INSECURE_KEY) === "true" };
}

function remember(repository: string, insecure: boolean): void {
  localStorage.setItem(REPOSITORY_KEY, repository);
  localStorage.setItem(INSECURE_KEY, String(insecure));
}

/**
 * Polls an operation until it ends, showing it in `target` (a progress bar with the stage and
 * bytes). Resolves with the ended operation; rejects when polling fails or `cancelled()` says
 * the page is gone.
 */
async function follow(operation: Operation, target: HTMLElement, cancelled: () => boolean): Promise<Operation> {
  let current = operation;
  for (;;) {
    showOperation(current, target);
    if (current.phase !== "Running") return current;
    await new Promise((resolve) => setTimeout(resolve, POLL_MILLISECONDS));
    if (cancelled()) throw new Error("left the page");
    current = await getOperation(current.id);
  }
}

function showOperation(operation: Operation, target: HTMLElement): void {
  const { stage, bytesDone, bytesTotal, percent } = operation.progress;
  const bytes = bytesTotal > 0 ? ` — ${formatBytes(bytesDone)} of ${formatBytes(bytesTotal)}` : "";
  const label = `${operation.kind} ${operation.namespace}/${operation.name}: ${stage}${percent !== undefined ? ` ${percent}%` : ""}${bytes}`;
  // Without a percentage the bar is indeterminate (no value attribute).
  const bar = h("progress", { max: 100, value: percent ?? null, "aria-label": `${operation.kind} progress`, id: "operation-bar", "data-phase": operation.phase });
  replaceChildren(
    target,
    h(
      "div",
      { class: `operation operation-${operation.phase.toLowerCase()}`, "data-operation": operation.id },
      bar,
      h("span", { class: "operation-label" }, label),
      h("span", { class: "muted operation-message" }, operation.message),
      operation.kind === "Restore" && operation.phase === "Succeeded"
        ? h("a", { class: "button small", id: "open-restored", href: `#/vm/${encodeURIComponent(operation.namespace)}/${encodeURIComponent(operation.name)}` }, `Open ${operation.name}`)
        : null,
    ),
  );
}

/** The dialog asking for the new VM's name; resolves with it and whether to start, or null. */
async function restoreAsDialog(backup: Backup): Promise<{ name: string; start: boolean } | null> {
  const nameInput = h("input", { type: "text", id: "restore-name", autocomplete: "off", spellcheck: "false", value: `${backup.name}-restored` });
  const start = h("input", { type: "checkbox", id: "restore-start", checked: true });
  const confirmed = await confirmDialog({
    title: `Restore ${backup.tag} as a new VM?`,
    body: [`A new VM in namespace ${backup.namespace} with the disk and definition of ${backup.name} as of ${new Date(backup.createdAt).toLocaleString()}.`],
    confirmLabel: "Restore",
    extra: h("div", {}, h("label", {}, "Name of the new VM ", nameInput), h("label", { class: "checkbox" }, start, " Start it")),
  });
  const name = nameInput.value.trim();
  return confirmed && name ? { name, start: start.checked } : null;
}

interface Restorer {
  insecure: () => boolean;
  progress: HTMLElement;
  errors: HTMLElement;
  cancelled: () => boolean;
  busy: (busy: boolean) => void;
}

async function restoreBackup(backup: Backup, target: { namespace: string; name: string; replace: boolean; start: boolean }, restorer: Restorer): Promise<void> {
  restorer.busy(true);
  try {
    const started = await startRestore(backup, restorer.insecure(), target);
    const ended = await follow(started, restorer.progress, restorer.cancelled);
    if (ended.phase === "Failed") {
      replaceChildren(restorer.errors, errorBox(ended.message, "The restore failed"));
      return;
    }
    restorer.errors.replaceChildren();
    toast(`${ended.result ?? target.name} restored from ${backup.tag}`);
  } catch (error) {
    if (!restorer.cancelled()) replaceChildren(restorer.errors, errorBox(error, "Cannot restore"));
  } finally {
    restorer.busy(false);
  }
}

function backupTable(backups: Backup[], showVm: boolean, actions: (backup: Backup) => HTMLElement[]): HTMLElement {
  return h(
    "table",
    { id: "backups" },
    h(
      "thead",
      {},
      h("tr", {}, showVm ? h("th", {}, "VM") : null, h("th", {}, "Tag"), h("th", {}, "Taken"), h("th", {}, "Size"), h("th", {}, "Digest"), h("th", {}, h("span", { class: "visually-hidden" }, "Actions"))),
    ),
    h(
      "tbody",
      {},
      backups
        .slice()
        .reverse()
        .map((backup) =>
          h(
            "tr",
            { "data-backup": backup.tag },
            showVm ? h("td", {}, `${backup.namespace}/${backup.name}`) : null,
            h("td", { class: "mono" }, backup.tag),
            h("td", {}, timeAgo(backup.createdAt)),
            h("td", {}, formatBytes(backup.size)),
            h("td", { class: "mono", title: backup.pinnedReference }, backup.digest.replace(/^sha256:/, "").slice(0, 12)),
            h("td", { class: "row-actions" }, actions(backup)),
          ),
        ),
    ),
  );
}

/** The repository form shared by the section and the page. */
function repositoryForm(idPrefix: string, submitLabel: string, secondary?: HTMLButtonElement) {
  const saved = remembered();
  const repository = h("input", {
    type: "text",
    id: `${idPrefix}-repository`,
    autocomplete: "off",
    spellcheck: "false",
    size: 40,
    placeholder: "registry.example.com/backups/web",
    value: saved.repository,
    "aria-describedby": `${idPrefix}-help`,
  });
  const insecure = h("input", { type: "checkbox", id: `${idPrefix}-insecure`, checked: saved.insecure });
  const submit = h("button", { type: "submit", class: "primary", id: `${idPrefix}-submit` }, submitLabel);
  const form = h(
    "form",
    { class: "inline-form", "aria-label": submitLabel },
    h("label", { for: `${idPrefix}-repository` }, "Repository"),
    repository,
    h("label", { class: "checkbox" }, insecure, " Plain http (insecure)"),
    submit,
    secondary ?? null,
    h("div", { class: "help", id: `${idPrefix}-help` }, "registry/repository, e.g. 127.0.0.1:5000/backups/web; backups are tagged <vm>-<UTC time>. Credentials come from the server's docker config."),
  );
  const read = (): { repository: string; insecure: boolean } | null => {
    const value = repository.value.trim();
    if (!value) {
      repository.setAttribute("aria-invalid", "true");
      repository.focus();
      return null;
    }
    repository.removeAttribute("aria-invalid");
    remember(value, insecure.checked);
    return { repository: value, insecure: insecure.checked };
  };
  return { form, repository, insecure, submit, read };
}

/**
 * The Backups section of a VM's detail page. Built once per page; `update(vm)` refreshes what
 * depends on the VM's state (Replace needs it stopped). `dispose()` stops polling.
 */
export function backupSection(namespace: string, name: string): { element: HTMLElement; update: (vm: Vm) => void; dispose: () => void } {
  let gone = false;
  let busy = false;
  let backups: Backup[] | null = null;
  let listedFrom = "";
  let phase = "";
  const refresh = h("button", { type: "button", id: "backup-refresh" }, "List backups");
  const { form, read, submit, insecure } = repositoryForm("backup", "Back up now", refresh);
  const progress = h("div", { class: "backup-progress", role: "status", "aria-live": "polite", id: "backup-progress" });
  const errors = h("div", { id: "backup-errors" });
  const list = h("div", { id: "backup-list" });

  const setBusy = (value: boolean): void => {
    busy = value;
    submit.disabled = value;
    refresh.disabled = value;
    renderList();
  };
  const cancelled = (): boolean => gone;
  const restorer: Restorer = { insecure: () => insecure.checked, progress, errors, cancelled, busy: setBusy };

  const renderList = (): void => {
    if (backups === null) {
      replaceChildren(list, h("p", { class: "muted" }, "Give a repository and list its backups of this VM, or back up now."));
      return;
    }
    if (!backups.length) {
      replaceChildren(list, h("p", { class: "muted", id: "backups-empty" }, `No complete backups of ${name} in ${listedFrom}.`));
      return;
    }
    const stopped = phase === "Stopped" || phase === "Failed";
    replaceChildren(
      list,
      backupTable(backups, false, (backup) => {
        const restoreAs = h("button", { type: "button", class: "small", "data-action": "restore-as", disabled: busy }, "Restore as new…");
        restoreAs.addEventListener("click", async () => {
          const choice = await restoreAsDialog(backup);
          if (!choice) return;
          await restoreBackup(backup, { namespace: backup.namespace, name: choice.name, replace: false, start: choice.start }, restorer);
        });
        const replace = h(
          "button",
          { type: "button", class: "small danger", "data-action": "replace", disabled: busy || !stopped, title: stopped ? `Replace ${name} with this backup` : `Stop ${name} first to replace it` },
          "Replace…",
        );
        replace.addEventListener("click", async () => {
          const ok = await confirmDialog({
            title: `Replace ${name} with ${backup.tag}?`,
            body: [
              backend() === "kubernetes"
                ? `${name}'s VirtualMachineApp, VM and disk are deleted, then created again from the backup; the VM comes back as it was at ${new Date(backup.createdAt).toLocaleString()}.`
                : `${name}'s disk and snapshots are deleted once the backup is pulled and verified; the VM comes back as it was at ${new Date(backup.createdAt).toLocaleString()}.`,
            ],
            confirmLabel: "Replace",
            typeToConfirm: name,
          });
          if (!ok) return;
          await restoreBackup(backup, { namespace, name, replace: true, start: false }, restorer);
        });
        return [restoreAs, replace];
      }),
    );
  };

  const load = async (choice: { repository: string; insecure: boolean }): Promise<void> => {
    replaceChildren(list, h("p", { class: "muted" }, "Listing backups…"));
    try {
      backups = await listBackups(choice.repository, choice.insecure, { namespace, name });
      listedFrom = choice.repository;
      errors.replaceChildren();
    } catch (error) {
      backups = null;
      replaceChildren(errors, errorBox(error, `Cannot list the backups in ${choice.repository}`));
    }
    if (!gone) renderList();
  };

  refresh.addEventListener("click", () => {
    const choice = read();
    if (choice) void load(choice);
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const choice = read();
    if (!choice || busy) return;
    void (async () => {
      setBusy(true);
      try {
        const ended = await follow(await startBackup(namespace, name, choice.repository, choice.insecure), progress, cancelled);
        if (ended.phase === "Failed") {
          replaceChildren(errors, errorBox(ended.message, "The backup failed"));
        } else {
          errors.replaceChildren();
          toast(`Backed up ${name} as ${ended.backup?.tag ?? ended.result ?? ""}`);
        }
      } catch (error) {
        if (!gone) replaceChildren(errors, errorBox(error, "Cannot back up"));
      } finally {
        setBusy(false);
      }
      if (!gone) await load(choice);
    })();
  });

  const element = h(
    "section",
    { "aria-labelledby": "backups-title", id: "backups-section" },
    h("h2", { id: "backups-title" }, "Backups"),
    form,
    progress,
    errors,
    list,
  );
  renderList();
  const saved = remembered();
  if (saved.repository) void load(saved);
  // An operation on this VM still running (started before this page was opened) is followed.
  request<{ items: Operation[] }>("GET", "/api/v1/operations").then(
    ({ items }) => {
      const running = items.find((operation) => operation.phase === "Running" && operation.namespace === namespace && operation.name === name);
      if (!running || busy || gone) return;
      setBusy(true);
      follow(running, progress, cancelled)
        .catch(() => undefined)
        .finally(() => setBusy(false));
    },
    () => undefined,
  );
  return {
    element,
    update: (vm: Vm) => {
      if (vm.status.phase !== phase) {
        phase = vm.status.phase;
        renderList();
      }
    },
    dispose: () => {
      gone = true;
    },
  };
}

/** The Backups page: every backup in a repository, each restorable as a new VM. */
export const backupsPage: Page = (root) => {
  let gone = false;
  let busy = false;
  const { form, read, submit, insecure } = repositoryForm("backups", "List backups");
  const progress = h("div", { class: "backup-progress", role: "status", "aria-live": "polite", id: "backup-progress" });
  const errors = h("div", { id: "backup-errors" });
  const list = h("div", { id: "backup-list" });
  const restorer: Restorer = {
    insecure: () => insecure.checked,
    progress,
    errors,
    cancelled: () => gone,
    busy: (value) => {
      busy = value;
      submit.disabled = value;
      for (const button of list.querySelectorAll("button")) button.disabled = value;
    },
  };
  const load = async (choice: { repository: string; insecure: boolean }): Promise<void> => {
    replaceChildren(list, h("p", { class: "muted" }, "Listing backups…"));
    try {
      const backups = await listBackups(choice.repository, choice.insecure);
      errors.replaceChildren();
      if (gone) return;
      replaceChildren(
        list,
        backups.length
          ? backupTable(backups, true, (backup) => {
              const restoreAs = h("button", { type: "button", class: "small", "data-action": "restore-as", disabled: busy }, "Restore as new…");
              restoreAs.addEventListener("click", async () => {
                const choice = await restoreAsDialog(backup);
                if (!choice) return;
                await restoreBackup(backup, { namespace: backup.namespace, name: choice.name, replace: false, start: choice.start }, restorer);
              });
              const existing = store.get(backup.namespace, backup.name);
              return [restoreAs, existing ? h("a", { class: "button small", href: `#/vm/${encodeURIComponent(backup.namespace)}/${encodeURIComponent(backup.name)}` }, "Open VM") : h("span", {})];
            })
          : h("p", { class: "muted", id: "backups-empty" }, `No complete backups in ${choice.repository}.`),
      );
    } catch (error) {
      list.replaceChildren();
      replaceChildren(errors, errorBox(error, `Cannot list the backups in ${choice.repository}`));
    }
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const choice = read();
    if (choice) void load(choice);
  });
  replaceChildren(
    root,
    h("div", { class: "page-head" }, h("h1", {}, "Backups")),
    form,
    progress,
    errors,
    list,
  );
  const saved = remembered();
  if (saved.repository) void load(saved);
  return () => {
    gone = true;
  };
};
