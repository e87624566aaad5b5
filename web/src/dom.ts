// A tiny element builder: every page is built from elements and text nodes, never from HTML
// strings, so names and messages coming from the API can never become markup (and the strict
// Content-Security-Policy needs no inline handlers).

type Child = Node | string | number | null | undefined | false;
type Attributes = Record<string, string | number | boolean | null | undefined | EventListener>;

/** Creates an element: `on*` attributes become listeners, booleans toggle attributes. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attributes: Attributes = {},
  ...children: (Child | Child[])[]
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      element.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "value" && "value" in element) {
      (element as HTMLInputElement).value = String(value);
    } else if (key === "checked" && element instanceof HTMLInputElement) {
      element.checked = Boolean(value);
    } else if (value === true) {
      element.setAttribute(key, "");
    } else {
      element.setAttribute(key, String(value));
    }
  }
  append(element, children);
  return element;
}

/** Appends children, flattening arrays and skipping empty ones. */
export function append(parent: Node, children: (Child | Child[])[]): void {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    parent.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replaces every child of `parent`. */
export function replaceChildren(parent: Element, ...children: (Child | Child[])[]): void {
  parent.replaceChildren();
  append(parent, children);
}

/** A relative time such as "3 min ago" for an RFC 3339 timestamp, with the exact time as title. */
export function timeAgo(timestamp: string | undefined): HTMLElement {
  if (!timestamp) return h("span", {}, "—");
  const date = new Date(timestamp);
  const seconds = Math.round((Date.now() - date.getTime()) / 1000);
  let text: string;
  if (seconds < 60) text = `${Math.max(seconds, 0)} s ago`;
  else if (seconds < 3600) text = `${Math.floor(seconds / 60)} min ago`;
  else if (seconds < 86400) text = `${Math.floor(seconds / 3600)} h ago`;
  else text = `${Math.floor(seconds / 86400)} d ago`;
  return h("time", { datetime: timestamp, title: date.toLocaleString() }, text);
}

/** The badge for a VM phase (Running, Stopped, …). */
export function phaseBadge(phase: string): HTMLElement {
  return h("span", { class: `badge phase-${phase.toLowerCase()}`, "data-phase": phase }, phase);
}

/** A spinner for long operations; screen readers hear the label. */
export function spinner(label: string): HTMLElement {
  return h("span", { class: "spinner", role: "status", "aria-label": label });
}

/**
 * The boot disk's import, when there is one to follow: a progress bar and "Importing disk: 42.0%"
 * while it runs, the reason when it failed; `null` otherwise. `id` names the element for tests.
 */
export function importIndicator(
  status: { import?: { state: string; progress?: string; percent?: number; message?: string } },
  id?: string,
): HTMLElement | null {
  const disk = status.import;
  if (!disk) return null;
  if (disk.state === "Failed") {
    return h("div", { class: "error import-failed", role: "alert", id, "data-state": disk.state }, "Disk import failed", disk.message ? `: ${disk.message}` : "");
  }
  const percent = disk.percent === undefined ? null : disk.percent;
  const label = `Importing disk: ${percent === null ? disk.progress ?? "starting" : `${percent.toFixed(1)}%`}`;
  return h(
    "div",
    { class: "import-progress", role: "status", id, "data-state": disk.state, title: disk.message ?? null },
    h("progress", { max: 100, value: percent, "aria-label": "Disk import progress" }),
    " ",
    h("span", {}, label),
  );
}
