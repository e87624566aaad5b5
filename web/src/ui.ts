// Shared page pieces: the error banner, toasts, confirmation dialogs and buttons that show the
// progress of a long operation.

import { ApiError, describeError, permissionExplanation } from "./api";
import { h, replaceChildren, spinner } from "./dom";

/** A page: renders into `root` and returns what to do when the user leaves it. */
export type Page = (root: HTMLElement, parameters: string[]) => (() => void) | void;

/** The error box: the API's message first (it says what failed, why and what to do). */
export function errorBox(error: unknown, title = "That did not work"): HTMLElement {
  const apiError = error instanceof ApiError ? error : null;
  if (apiError?.permission) {
    // A 403 in Kubernetes mode: say which permission is missing and whom to ask; the API server's
    // own words follow for the administrator.
    const permission = apiError.permission;
    return h(
      "div",
      { class: "error permission-error", role: "alert", "data-permission": `${permission.verb} ${permission.resource}${permission.subresource ? `/${permission.subresource}` : ""}` },
      h("strong", {}, "Permission needed"),
      h("p", { class: "error-message permission-explanation" }, permissionExplanation(permission)),
      h(
        "p",
        { class: "muted" },
        `API group ${permission.group || "core"}${permission.name ? `, object ${permission.name}` : ""}. The server said: ${apiError.message}`,
      ),
      h("p", { class: "muted" }, `HTTP ${apiError.code} ${apiError.reason}`),
    );
  }
  return h(
    "div",
    { class: "error", role: "alert" },
    h("strong", {}, title),
    h("p", { class: "error-message" }, apiError ? apiError.message : String(error)),
    apiError && apiError.code ? h("p", { class: "muted" }, `HTTP ${apiError.code} ${apiError.reason}`) : null,
  );
}

let toastArea: HTMLElement | null = null;

/** A short message in the corner (role=status, so screen readers announce it). */
export function toast(message: string, kind: "ok" | "error" = "ok"): void {
  if (!toastArea) {
    toastArea = h("div", { class: "toasts", role: "status", "aria-live": "polite" });
    document.body.appendChild(toastArea);
  }
  const item = h("div", { class: `toast toast-${kind}` }, message);
  toastArea.appendChild(item);
  setTimeout(() => item.remove(), kind === "error" ? 10000 : 4000);
}

/**
 * Runs a long operation from a button: disables it, shows a spinner with the elapsed seconds,
 * and reports failure in `errorTarget` (or a toast). Resolves with the result, or undefined.
 */
export async function withProgress<T>(
  button: HTMLButtonElement,
  busyLabel: string,
  operation: () => Promise<T>,
  errorTarget?: HTMLElement,
): Promise<T | undefined> {
  const original = Array.from(button.childNodes);
  const started = Date.now();
  const label = h("span", {}, busyLabel);
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  replaceChildren(button, spinner(busyLabel), label);
  const timer = setInterval(() => {
    label.textContent = `${busyLabel} ${Math.round((Date.now() - started) / 1000)} s`;
  }, 1000);
  try {
    const result = await operation();
    if (errorTarget) errorTarget.replaceChildren();
    return result;
  } catch (error) {
    if (errorTarget) replaceChildren(errorTarget, errorBox(error));
    else toast(describeError(error), "error");
    return undefined;
  } finally {
    clearInterval(timer);
    button.removeAttribute("aria-busy");
    button.disabled = false;
    button.replaceChildren(...original);
  }
}

/** A modal confirmation; resolves true when confirmed. `typeToConfirm` must be typed first. */
export function confirmDialog(options: {
  title: string;
  body: (Node | string)[];
  confirmLabel: string;
  typeToConfirm?: string;
  extra?: HTMLElement;
}): Promise<boolean> {
  return new Promise((resolve) => {
    const typed = h("input", {
      type: "text",
      autocomplete: "off",
      "aria-label": `Type ${options.typeToConfirm ?? ""} to confirm`,
    });
    const confirm = h("button", { type: "submit", class: "danger", value: "confirm" }, options.confirmLabel);
    const cancel = h("button", { type: "button", value: "cancel" }, "Cancel");
    const dialog = h(
      "dialog",
      { class: "dialog", "aria-labelledby": "dialog-title" },
      h(
        "form",
        { method: "dialog" },
        h("h2", { id: "dialog-title" }, options.title),
        ...options.body.map((part) => (typeof part === "string" ? h("p", {}, part) : part)),
        options.typeToConfirm
          ? h("label", {}, "Type ", h("code", {}, options.typeToConfirm), " to confirm", typed)
          : null,
        options.extra ?? null,
        h("div", { class: "actions" }, cancel, confirm),
      ),
    );
    if (options.typeToConfirm) {
      confirm.disabled = true;
      typed.addEventListener("input", () => {
        confirm.disabled = typed.value !== options.typeToConfirm;
      });
    }
    cancel.addEventListener("click", () => dialog.close("cancel"));
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(dialog.returnValue === "confirm");
    });
    document.body.appendChild(dialog);
    dialog.showModal();
    (options.typeToConfirm ? typed : cancel).focus();
  });
}
