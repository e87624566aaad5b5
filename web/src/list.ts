// The VM list: live status from the event stream, filters by namespace, state and text, bulk
// start and stop, and screen thumbnails of running VMs.

import { Vm, backend, describeError, power, screenshotUrl } from "./api";
import { h, importIndicator, phaseBadge, replaceChildren, spinner, timeAgo } from "./dom";
import { store } from "./store";
import { Page, errorBox, toast } from "./ui";

const PHASES = ["Running", "Starting", "Paused", "Stopping", "Stopped", "CrashLoopBackOff", "Failed"];
const THUMBNAIL_REFRESH_MS = 15000;

/** What the filters are set to; kept across visits to the page within this tab. */
const filters = { namespace: "", phase: "", text: "" };

/** The resources line of a VM, from its manifest. */
export function resourcesOf(vm: Vm): string {
  const spec = (vm.manifest.spec ?? {}) as { resources?: { cpu?: number; memory?: string }; disk?: { size?: string } };
  const parts = [];
  if (spec.resources?.cpu) parts.push(`${spec.resources.cpu} vCPU`);
  if (spec.resources?.memory) parts.push(spec.resources.memory);
  if (spec.disk?.size) parts.push(`${spec.disk.size} disk`);
  return parts.join(" · ") || "defaults";
}

/** Screenshot thumbnails, refreshed while the VM runs; object URLs are revoked when replaced. */
class Thumbnails {
  private urls = new Map<string, { url: string; at: number }>();
  private pending = new Set<string>();

  image(vm: Vm, onLoaded: () => void): HTMLElement {
    const key = `${vm.namespace}/${vm.name}`;
    const running = vm.status.phase === "Running" || vm.status.phase === "Paused";
    if (!vm.console.vnc || !running) return h("div", { class: "thumbnail empty", "aria-hidden": "true" });
    const cached = this.urls.get(key);
    if ((!cached || Date.now() - cached.at > THUMBNAIL_REFRESH_MS) && !this.pending.has(key)) {
      this.pending.add(key);
      screenshotUrl(vm.namespace, vm.name)
        .then((url) => {
          if (cached) URL.revokeObjectURL(cached.url);
          this.urls.set(key, { url, at: Date.now() });
          onLoaded();
        })
        .catch(() => this.urls.set(key, { url: cached?.url ?? "", at: Date.now() }))
        .finally(() => this.pending.delete(key));
    }
    return cached?.url
      ? h("img", { class: "thumbnail", src: cached.url, alt: `Screen of ${vm.name}` })
      : h("div", { class: "thumbnail empty", "aria-hidden": "true" });
  }

  clear(): void {
    for (const { url } of this.urls.values()) if (url) URL.revokeObjectURL(url);
    this.urls.clear();
  }
}

export const listPage: Page = (root) => {
  const selected = new Set<string>();
  const thumbnails = new Thumbnails();
  const namespaceSelect = h("select", { id: "filter-namespace" });
  const phaseSelect = h(
    "select",
    { id: "filter-phase" },
    h("option", { value: "" }, "Any state"),
    PHASES.map((phase) => h("option", { value: phase }, phase)),
  );
  phaseSelect.value = filters.phase;
  const search = h("input", { id: "filter-text", type: "search", placeholder: "Name contains…", value: filters.text });
  const bulkStatus = h("span", { class: "muted", role: "status" });
  const startButton = h("button", { type: "button", id: "bulk-start" }, "Start selected");
  const stopButton = h("button", { type: "button", id: "bulk-stop" }, "Stop selected");
  const tableArea = h("div", { class: "table-area" });
  const liveIndicator = h("span", { class: "live" });

  replaceChildren(
    root,
    h("div", { class: "page-head" }, h("h1", {}, "Virtual machines"), liveIndicator, h("a", { class: "button primary", href: "#/create" }, "Create VM")),
    h(
      "div",
      { class: "toolbar", role: "search" },
      h("label", {}, "Namespace ", namespaceSelect),
      h("label", {}, "State ", phaseSelect),
      h("label", {}, "Search ", search),
      h("span", { class: "spacer" }),
      startButton,
      stopButton,
      bulkStatus,
    ),
    tableArea,
  );

  const visible = (): Vm[] =>
    Array.from(store.vms.values()).filter(
      (vm) =>
        (!filters.namespace || vm.namespace === filters.namespace) &&
        (!filters.phase || vm.status.phase === filters.phase) &&
        (!filters.text || `${vm.name} ${vm.displayName ?? ""}`.toLowerCase().includes(filters.text.toLowerCase())),
    );

  const render = (): void => {
    // Re-rendering replaces the table: keep keyboard focus on the same control.
    const focused = document.activeElement;
    const focusKey = focused && tableArea.contains(focused) ? focused.getAttribute("aria-label") ?? focused.getAttribute("href") : null;
    renderTable();
    if (focusKey) {
      const again = Array.from(tableArea.querySelectorAll<HTMLElement>("[aria-label], [href]")).find(
        (element) => element.getAttribute("aria-label") === focusKey || element.getAttribute("href") === focusKey,
      );
      again?.focus();
    }
  };

  const renderTable = (): void => {
    liveIndicator.textContent = store.live ? "● live" : "○ reconnecting…";
    liveIndicator.className = store.live ? "live on" : "live off";
    const namespaces = Array.from(new Set(Array.from(store.vms.values()).map((vm) => vm.namespace))).sort();
    replaceChildren(
      namespaceSelect,
      h("option", { value: "" }, "All namespaces"),
      namespaces.map((namespace) => h("option", { value: namespace }, namespace)),
    );
    namespaceSelect.value = filters.namespace;
    if (store.error && !store.loaded) {
      replaceChildren(tableArea, errorBox(store.error, "Cannot list the VMs"));
      return;
    }
    if (!store.loaded) {
      replaceChildren(tableArea, h("p", {}, spinner("Loading"), " Loading…"));
      return;
    }
    const vms = visible();
    for (const key of Array.from(selected)) if (!vms.some((vm) => `${vm.namespace}/${vm.name}` === key)) selected.delete(key);
    startButton.disabled = stopButton.disabled = selected.size === 0;
    if (store.vms.size === 0) {
      replaceChildren(
        tableArea,
        h(
          "div",
          { class: "empty-state" },
          h("p", {}, "No virtual machines yet."),
          backend() === "kubernetes"
            ? h("p", { class: "muted", id: "empty-rbac-hint" }, "You see the VMs of the namespaces where your RBAC lets you list virtualmachines.kubevirt.io; if you expected some, ask your cluster administrator for a Role that allows it.")
            : null,
          h("a", { class: "button primary", href: "#/create" }, "Create the first one"),
        ),
      );
      return;
    }
    const selectAll = h("input", {
      type: "checkbox",
      "aria-label": "Select every VM shown",
      checked: vms.length > 0 && vms.every((vm) => selected.has(`${vm.namespace}/${vm.name}`)),
      onchange: (event: Event) => {
        const on = (event.target as HTMLInputElement).checked;
        for (const vm of vms) (on ? selected.add(`${vm.namespace}/${vm.name}`) : selected.delete(`${vm.namespace}/${vm.name}`));
        render();
      },
    });
    replaceChildren(
      tableArea,
      h(
        "table",
        { class: "vms" },
        h(
          "thead",
          {},
          h("tr", {}, h("th", {}, selectAll), h("th", {}, h("span", { class: "visually-hidden" }, "Screen")), h("th", {}, "Name"), h("th", {}, "Namespace"), h("th", {}, "State"), h("th", {}, "Resources"), h("th", {}, "Created")),
        ),
        h(
          "tbody",
          {},
          vms.length === 0 ? h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No VM matches the filters.")) : null,
          vms.map((vm) => {
            const key = `${vm.namespace}/${vm.name}`;
            const detail = `#/vm/${encodeURIComponent(vm.namespace)}/${encodeURIComponent(vm.name)}`;
            return h(
              "tr",
              { "data-vm": key },
              h(
                "td",
                {},
                h("input", {
                  type: "checkbox",
                  "aria-label": `Select ${vm.name}`,
                  checked: selected.has(key),
                  onchange: (event: Event) => {
                    if ((event.target as HTMLInputElement).checked) selected.add(key);
                    else selected.delete(key);
                    render();
                  },
                }),
              ),
              h("td", {}, h("a", { href: detail, tabindex: -1 }, thumbnails.image(vm, render))),
              h("td", {}, h("a", { href: detail, class: "vm-name" }, vm.displayName ?? vm.name), vm.displayName ? h("div", { class: "muted" }, vm.name) : null),
              h("td", {}, vm.namespace),
              h("td", {}, phaseBadge(vm.status.phase), importIndicator(vm.status), vm.status.message && !vm.status.import ? h("div", { class: "muted small" }, vm.status.message) : null),
              h("td", {}, resourcesOf(vm)),
              h("td", {}, timeAgo(vm.createdAt)),
            );
          }),
        ),
      ),
    );
  };

  const bulk = async (action: "start" | "stop", button: HTMLButtonElement): Promise<void> => {
    const targets = Array.from(selected).map((key) => store.vms.get(key)).filter((vm): vm is Vm => Boolean(vm));
    button.disabled = true;
    let done = 0;
    const failures: string[] = [];
    const label = action === "start" ? "Starting" : "Stopping";
    bulkStatus.textContent = `${label} ${targets.length} VM(s)…`;
    await Promise.all(
      targets.map(async (vm) => {
        try {
          store.put(await power(vm.namespace, vm.name, action));
        } catch (error) {
          failures.push(`${vm.name}: ${describeError(error)}`);
        }
        done += 1;
        bulkStatus.textContent = `${label}: ${done} of ${targets.length} done`;
      }),
    );
    bulkStatus.textContent = failures.length ? `${failures.length} failed` : `${done} done`;
    for (const failure of failures) toast(failure, "error");
    render();
  };
  startButton.addEventListener("click", () => void bulk("start", startButton));
  stopButton.addEventListener("click", () => void bulk("stop", stopButton));
  namespaceSelect.addEventListener("change", () => {
    filters.namespace = namespaceSelect.value;
    render();
  });
  phaseSelect.addEventListener("change", () => {
    filters.phase = phaseSelect.value;
    render();
  });
  search.addEventListener("input", () => {
    filters.text = search.value;
    render();
  });

  const unsubscribe = store.subscribe(render);
  const refresher = setInterval(render, THUMBNAIL_REFRESH_MS);
  render();
  return () => {
    unsubscribe();
    clearInterval(refresher);
    thumbnails.clear();
  };
};
