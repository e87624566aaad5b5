// The "Upload disk" page (Kubernetes mode): a disk file from this computer into a new CDI
// DataVolume, through the console's POST /api/v1/namespaces/{ns}/uploads, which streams it to CDI's
// upload proxy as the signed-in user.
//
// The bar shows the bytes the browser sent (XMLHttpRequest upload progress); the server answers only
// once the proxy accepted every byte, so "100%" is followed by either the server's confirmation or its
// error (403 explanation, proxy failure or timeout, size too small) — never a silent stop. Then the
// DataVolume's phase is polled until Succeeded (or Failed).

import { ApiError, Permission, describeError, request, token } from "./api";
import { createFromDisk } from "./create";
import { h, phaseBadge, replaceChildren, spinner } from "./dom";
import { Page, errorBox } from "./ui";

/** The `Upload` schema. */
export interface UploadView {
  namespace: string;
  name: string;
  phase: string;
  progress?: string;
  message?: string;
  size?: string;
  format?: string;
  bytesSent?: number;
}

const MIB = 1024 * 1024;
/** CDI's default filesystem overhead. */
const FILESYSTEM_OVERHEAD = 0.055;
const PHASE_POLL_MS = 1000;
const PHASE_PATIENCE_MS = 10 * 60 * 1000;

/** The URL of one uploaded DataVolume. */
function uploadPath(namespace: string, name?: string): string {
  const base = `/api/v1/namespaces/${encodeURIComponent(namespace)}/uploads`;
  return name === undefined ? base : `${base}/${encodeURIComponent(name)}`;
}

/**
 * The disk's virtual size from its first bytes when the format says it (qcow2's header), else the
 * file's size (raw); the same rule the server applies.
 */
export async function virtualSize(file: File): Promise<number> {
  const header = new DataView(await file.slice(0, 32).arrayBuffer());
  if (header.byteLength >= 32 && header.getUint32(0) === 0x514649fb) {
    return Number(header.getBigUint64(24));
  }
  return file.size;
}

/** The size to suggest: the virtual size plus CDI's overhead, rounded up to MiB (as `paddock upload`). */
export function suggestedSize(bytes: number): string {
  return `${Math.max(1, Math.ceil(Math.ceil(bytes * (1 + FILESYSTEM_OVERHEAD)) / MIB))}Mi`;
}

/** Human-readable bytes. */
function formatBytes(bytes: number): string {
  if (bytes >= 1024 * MIB) return `${(bytes / (1024 * MIB)).toFixed(2)} GiB`;
  if (bytes >= MIB) return `${(bytes / MIB).toFixed(1)} MiB`;
  return `${bytes} B`;
}

/**
 * Sends `file` with XMLHttpRequest (fetch has no upload progress); `onProgress` gets the bytes sent.
 * Resolves with the server's answer, rejects with ApiError (the server's JSON error, or status 0 when
 * the connection broke).
 */
function sendFile(url: string, file: File, onProgress: (sent: number, total: number) => void, onSent: () => void): Promise<UploadView> {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.setRequestHeader("Authorization", `Bearer ${token() ?? ""}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", (event) => onProgress(event.loaded, event.lengthComputable ? event.total : file.size));
    xhr.upload.addEventListener("load", onSent);
    xhr.addEventListener("load", () => {
      let body: { code?: number; reason?: string; message?: string; permission?: Permission } | UploadView | undefined;
      try {
        body = xhr.responseText ? JSON.parse(xhr.responseText) : undefined;
      } catch {
        body = undefined;
      }
      if (xhr.status >= 200 && xhr.status < 300) {
        resolve(body as UploadView);
        return;
      }
      const error = (body ?? {}) as { reason?: string; message?: string; permission?: Permission };
      const fallback =
        xhr.status === 413
          ? "a proxy in front of the console refused a body this large (HTTP 413); raise its body size limit (e.g. nginx client_max_body_size) or upload with `paddock upload`"
          : xhr.status === 504 || xhr.status === 502
            ? `a proxy in front of the console gave up (HTTP ${xhr.status}); raise its timeouts or upload with \`paddock upload\``
            : `the upload failed with HTTP ${xhr.status}`;
      reject(new ApiError(xhr.status, error.reason ?? xhr.statusText, error.message ?? fallback, error.permission));
    });
    const broken = (what: string) => () =>
      reject(new ApiError(0, "Unreachable", `${what}; the console did not confirm the upload, so it did not complete: check the connection and upload again`));
    xhr.addEventListener("error", broken("the connection to the console broke during the upload"));
    xhr.addEventListener("timeout", broken("the upload timed out"));
    xhr.addEventListener("abort", broken("the upload was cancelled"));
    xhr.send(file);
  });
}

export const uploadPage: Page = (root) => {
  let leaving = false;
  const fileInput = h("input", { type: "file", id: "upload-file", required: true });
  const nameInput = h("input", { type: "text", id: "upload-name", required: true, autocomplete: "off", spellcheck: "false", placeholder: "debian-disk", pattern: "[a-z0-9]([-a-z0-9]*[a-z0-9])?" });
  const namespaceInput = h("input", { type: "text", id: "upload-namespace", required: true, autocomplete: "off", spellcheck: "false", value: "default" });
  const sizeInput = h("input", { type: "text", id: "upload-size", required: true, autocomplete: "off", spellcheck: "false", placeholder: "10Gi" });
  const classInput = h("input", { type: "text", id: "upload-storage-class", autocomplete: "off", spellcheck: "false", placeholder: "the cluster's default" });
  const sizeHint = h("p", { class: "muted small", id: "upload-size-hint" }, "Pick a file to get a suggested size.");
  const submit = h("button", { type: "submit", class: "primary", id: "upload-start" }, "Upload");
  const bar = h("progress", { id: "upload-progress", max: 100, value: 0 });
  const barLabel = h("span", { id: "upload-progress-label", class: "muted" });
  const status = h("div", { id: "upload-status", role: "status", "aria-live": "polite" });
  const errors = h("div", { id: "upload-error" });
  const progressArea = h("div", { class: "upload-progress", hidden: true }, bar, barLabel);
  let confirmation: HTMLElement = h("p", {});

  fileInput.addEventListener("change", async () => {
    const file = fileInput.files?.[0];
    if (!file) return;
    if (!nameInput.value) {
      nameInput.value = file.name.toLowerCase().replace(/\.[^.]*$/, "").replace(/[^a-z0-9-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 63) || "uploaded-disk";
    }
    const virtual = await virtualSize(file);
    sizeInput.value = suggestedSize(virtual);
    replaceChildren(sizeHint, `${file.name}: ${formatBytes(file.size)} file, ${formatBytes(virtual)} virtual size; the DataVolume needs at least that plus CDI's 5.5% filesystem overhead.`);
  });

  const pollPhase = async (namespace: string, name: string): Promise<void> => {
    const deadline = Date.now() + PHASE_PATIENCE_MS;
    while (!leaving) {
      let view: UploadView;
      try {
        view = await request<UploadView>("GET", uploadPath(namespace, name));
      } catch (error) {
        replaceChildren(errors, errorBox(error, "Cannot read the DataVolume's phase"));
        return;
      }
      replaceChildren(
        status,
        h("p", {}, "DataVolume ", h("code", {}, `${namespace}/${name}`), ": ", h("span", { id: "upload-phase", "data-phase": view.phase }, phaseBadge(view.phase || "Pending")), view.progress ? ` ${view.progress}` : ""),
        view.message && view.phase !== "Succeeded" ? h("p", { class: "muted small" }, view.message) : null,
      );
      status.prepend(confirmation);
      if (view.phase === "Succeeded") {
        status.append(
          h("p", { id: "upload-done" }, "The disk is imported. A VM can use it as its PVC ", h("code", {}, name), " in namespace ", h("code", {}, namespace), "."),
          h("p", {}, h("button", { type: "button", class: "primary", id: "upload-create-vm", onclick: () => {
            createFromDisk(namespace, name);
            location.hash = "#/create";
          } }, "Create VM from this disk")),
        );
        return;
      }
      if (view.phase === "Failed") {
        replaceChildren(errors, errorBox(new ApiError(0, "Failed", `CDI could not import the disk: ${view.message ?? "no message"}`), "Import failed"));
        return;
      }
      if (Date.now() > deadline) {
        replaceChildren(errors, errorBox(`The DataVolume is still ${view.phase} after ${PHASE_PATIENCE_MS / 60000} minutes; check CDI's pods and the PVC's events.`, "Import is slow"));
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, PHASE_POLL_MS));
    }
  };

  const form = h(
    "form",
    { class: "upload-form", id: "upload-form" },
    h("div", { class: "field" }, h("label", { for: "upload-file" }, "Disk file"), fileInput, h("p", { class: "muted small" }, "qcow2, raw, vmdk, vdi, vhd or vhdx; CDI converts it. No backing file, not encrypted.")),
    h("div", { class: "field" }, h("label", { for: "upload-name" }, "DataVolume name"), nameInput),
    h("div", { class: "field" }, h("label", { for: "upload-namespace" }, "Namespace"), namespaceInput),
    h("div", { class: "field" }, h("label", { for: "upload-size" }, "Size"), sizeInput, sizeHint),
    h("div", { class: "field" }, h("label", { for: "upload-storage-class" }, "StorageClass (optional)"), classInput),
    h("div", { class: "actions" }, submit),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = fileInput.files?.[0];
    errors.replaceChildren();
    status.replaceChildren();
    if (!file) {
      replaceChildren(errors, errorBox("Pick a disk file first.", "No file"));
      return;
    }
    const namespace = namespaceInput.value.trim();
    const name = nameInput.value.trim();
    const query = new URLSearchParams({ name, size: sizeInput.value.trim() });
    if (classInput.value.trim()) query.set("storageClass", classInput.value.trim());
    submit.disabled = true;
    // Ask first (permissions, a taken name), so a refusal does not wait for gigabytes to be sent.
    try {
      await request<UploadView>("POST", `${uploadPath(namespace)}?${query.toString()}&dryRun=true`);
    } catch (error) {
      replaceChildren(errors, errorBox(error, "The upload would be refused"));
      submit.disabled = false;
      return;
    }
    progressArea.hidden = false;
    bar.value = 0;
    const started = Date.now();
    barLabel.textContent = `0 of ${formatBytes(file.size)}`;
    try {
      const view = await sendFile(
        `${uploadPath(namespace)}?${query.toString()}`,
        file,
        (sent, total) => {
          bar.value = total ? (sent / total) * 100 : 0;
          const seconds = (Date.now() - started) / 1000;
          barLabel.textContent = `${formatBytes(sent)} of ${formatBytes(total)}${seconds > 0.5 ? ` · ${formatBytes(sent / seconds)}/s` : ""}`;
        },
        () => replaceChildren(status, h("p", {}, spinner("Waiting"), " All bytes sent; waiting for the upload proxy to confirm…")),
      );
      bar.value = 100;
      confirmation = h("p", { id: "upload-confirmed" }, `The upload proxy accepted ${formatBytes(view.bytesSent ?? file.size)} (${view.format ?? "disk"}) into DataVolume ${view.namespace}/${view.name} (${view.size ?? ""}).`);
      replaceChildren(status, confirmation);
      await pollPhase(view.namespace, view.name);
    } catch (error) {
      progressArea.hidden = true;
      status.replaceChildren();
      const title = error instanceof ApiError && error.code === 504 ? "The upload proxy timed out" : error instanceof ApiError && error.code === 422 ? "The disk does not fit or is refused" : "The upload failed";
      replaceChildren(errors, errorBox(error, title));
      if (!(error instanceof ApiError)) console.warn(describeError(error));
    } finally {
      submit.disabled = false;
    }
  });
  sizeInput.addEventListener("input", () => sizeInput.setCustomValidity(""));

  replaceChildren(
    root,
    h("div", { class: "page-head" }, h("h1", {}, "Upload disk")),
    h("p", { class: "muted" }, "Uploads a disk file from this computer into a new CDI DataVolume, as you (your RBAC needs create on datavolumes and uploadtokenrequests in the namespace). Keep this tab open until the upload proxy confirms."),
    form,
    progressArea,
    status,
    errors,
  );
  return () => {
    leaving = true;
  };
};
