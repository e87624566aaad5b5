// The create wizard: image, resources, cloud-init, review. The YAML on the right is exactly the
// body POSTed to /api/v1/vms, so what the user reviews is what the server receives.

import { LibraryImage, Vm, backend, describeError, request } from "./api";
import { formatBytes } from "./backups";
import { h, replaceChildren, timeAgo } from "./dom";
import { store } from "./store";
import { Page, withProgress } from "./ui";
import { toYaml } from "./yaml";

const NAME_PATTERN = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;
const QUANTITY_PATTERN = /^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$/;

type ImageKind = "registry" | "file" | "oci" | "pvc";

/** A disk the next visit of the wizard starts from (set by the upload page). */
let pendingDisk: { namespace: string; name: string } | null = null;

/** Makes the next wizard start from an uploaded DataVolume (its PVC has the same name). */
export function createFromDisk(namespace: string, name: string): void {
  pendingDisk = { namespace, name };
}

interface Draft {
  name: string;
  namespace: string;
  displayName: string;
  imageKind: ImageKind;
  image: string;
  cpu: string;
  memory: string;
  diskSize: string;
  userData: string;
  sshKey: string;
  startNow: boolean;
  /** Kubernetes mode: import the image into a persistent volume (CDI) instead of an ephemeral containerDisk. */
  persistent: boolean;
}

/** The VirtualMachineApp a draft describes. */
export function manifestOf(draft: Draft): Record<string, unknown> {
  const prefix = draft.imageKind === "file" ? "file:" : draft.imageKind === "oci" ? "oci:" : "";
  const image = draft.image.trim();
  const spec: Record<string, unknown> = {};
  if (draft.displayName.trim()) spec.displayName = draft.displayName.trim();
  spec.image = draft.imageKind === "pvc" ? { pvc: { name: image } } : { containerDisk: image && !image.startsWith(prefix) ? prefix + image : image };
  // The CRD's default is persistent; say so only when it is not (Kubernetes mode asks).
  if (!draft.persistent) (spec.image as Record<string, unknown>).persistent = false;
  spec.resources = { cpu: Number(draft.cpu) || 1, memory: draft.memory.trim() };
  if (draft.diskSize.trim()) spec.disk = { size: draft.diskSize.trim() };
  const cloudInit: Record<string, unknown> = {};
  if (draft.userData.trim()) cloudInit.userData = draft.userData.endsWith("\n") ? draft.userData : `${draft.userData}\n`;
  const keys = draft.sshKey.split("\n").map((key) => key.trim()).filter(Boolean);
  if (keys.length) cloudInit.sshKeys = keys;
  if (Object.keys(cloudInit).length) spec.cloudInit = cloudInit;
  spec.runStrategy = draft.startNow ? "Always" : "Halted";
  const metadata: Record<string, unknown> = { name: draft.name.trim() };
  // In a cluster the namespace is always written: it decides whose RBAC applies.
  if (draft.namespace.trim() && (draft.namespace.trim() !== "default" || backend() === "kubernetes")) metadata.namespace = draft.namespace.trim();
  return { apiVersion: "paddock.dev/v1alpha1", kind: "VirtualMachineApp", metadata, spec };
}

/** Problems with one step of the draft, as messages per field id. */
function problems(draft: Draft, step: number): Record<string, string> {
  const found: Record<string, string> = {};
  if (step === 0) {
    if (!NAME_PATTERN.test(draft.name.trim())) found["vm-name"] = "Use 1–63 lowercase letters, digits and '-', starting and ending with a letter or digit.";
    if (draft.namespace.trim() && !NAME_PATTERN.test(draft.namespace.trim())) found["vm-namespace"] = "Same rules as the name.";
    if (backend() === "kubernetes" && !draft.namespace.trim()) found["vm-namespace"] = "Give the namespace to create the VM in.";
    if (!draft.image.trim()) {
      found["vm-image"] =
        draft.imageKind === "pvc"
          ? "Give the name of the PVC (an uploaded DataVolume's name) in the VM's namespace."
          : draft.imageKind === "registry"
          ? "Give an image reference, e.g. quay.io/containerdisks/debian:12."
          : draft.imageKind === "file"
            ? "Give the path of a disk file on the machine running paddock serve."
            : "Give the path of an OCI layout directory, optionally with :tag.";
    }
  }
  if (step === 1) {
    const cpu = Number(draft.cpu);
    if (!Number.isInteger(cpu) || cpu < 1 || cpu > 64) found["vm-cpu"] = "Between 1 and 64 virtual CPUs.";
    if (!QUANTITY_PATTERN.test(draft.memory.trim())) found["vm-memory"] = "A size such as 512Mi or 2Gi.";
    if (draft.diskSize.trim() && !QUANTITY_PATTERN.test(draft.diskSize.trim())) found["vm-disk"] = "A size such as 10Gi, or empty for the image's size.";
    if (backend() === "kubernetes" && draft.persistent && !draft.diskSize.trim()) found["vm-disk"] = "A persistent disk needs a size at least the image's virtual size, e.g. 10Gi.";
  }
  if (step === 2) {
    for (const key of draft.sshKey.split("\n").map((line) => line.trim()).filter(Boolean)) {
      if (!/^(ssh-|ecdsa-|sk-)/.test(key)) found["vm-ssh"] = "Each line must be an OpenSSH public key (ssh-ed25519 …, ssh-rsa …, ecdsa-…).";
    }
  }
  return found;
}

const STEPS = ["Image", "Resources", "Cloud-init", "Review"];

export const createPage: Page = (root) => {
  const kubernetes = backend() === "kubernetes";
  // In a cluster, start from the namespace of the VMs the user sees (where they likely may create).
  const seenNamespaces = Array.from(new Set(Array.from(store.vms.values()).map((vm) => vm.namespace))).sort();
  const draft: Draft = {
    name: "",
    namespace: kubernetes ? (seenNamespaces[0] ?? "") : "default",
    displayName: "",
    imageKind: "registry",
    image: "",
    cpu: "1",
    memory: "1Gi",
    diskSize: "",
    userData: "",
    sshKey: "",
    startNow: true,
    persistent: true,
  };
  if (kubernetes && pendingDisk) {
    // From the upload page: the VM boots the uploaded disk itself (persistent: false uses the PVC
    // as it is instead of importing a copy).
    Object.assign(draft, { namespace: pendingDisk.namespace, name: `${pendingDisk.name}-vm`.slice(0, 63), imageKind: "pvc", image: pendingDisk.name, persistent: false });
  }
  pendingDisk = null;
  let step = 0;
  const preview = h("pre", { class: "yaml", id: "yaml-preview", tabindex: 0, "aria-label": "The VirtualMachineApp that will be created" });
  const errorArea = h("div", {});
  const stepper = h("ol", { class: "stepper" });
  const stepArea = h("div", { class: "step" });
  const back = h("button", { type: "button", id: "wizard-back" }, "Back");
  const next = h("button", { type: "submit", class: "primary", id: "wizard-next" }, "Next");

  const field = (
    id: string,
    label: string,
    input: HTMLInputElement | HTMLTextAreaElement | HTMLSelectElement,
    help: string,
    key: keyof Draft,
  ): HTMLElement => {
    input.id = id;
    input.setAttribute("aria-describedby", `${id}-help ${id}-problem`);
    const value = draft[key];
    if (input instanceof HTMLInputElement && input.type === "checkbox") input.checked = Boolean(value);
    else input.value = String(value);
    input.addEventListener("input", () => {
      (draft as unknown as Record<string, unknown>)[key] =
        input instanceof HTMLInputElement && input.type === "checkbox" ? input.checked : input.value;
      updatePreview();
    });
    return h(
      "div",
      { class: "field" },
      h("label", { for: id }, label),
      input,
      h("div", { class: "help", id: `${id}-help` }, help),
      h("div", { class: "problem", id: `${id}-problem`, role: "alert" }),
    );
  };

  const updatePreview = (): void => {
    preview.textContent = toYaml(manifestOf(draft));
  };

  const renderStep = (): void => {
    replaceChildren(
      stepper,
      STEPS.map((title, index) =>
        h("li", { class: index === step ? "current" : index < step ? "done" : "", "aria-current": index === step ? "step" : null }, `${index + 1}. ${title}`),
      ),
    );
    back.disabled = step === 0;
    next.textContent = step === STEPS.length - 1 ? "Create" : "Next";
    next.id = step === STEPS.length - 1 ? "wizard-create" : "wizard-next";
    let content: HTMLElement[];
    if (step === 0) {
      const kind = h(
        "select",
        {},
        h("option", { value: "registry" }, "Registry image (containerDisk reference)"),
        kubernetes ? h("option", { value: "pvc" }, "Uploaded disk (a PVC in the namespace)") : null,
        kubernetes ? null : h("option", { value: "file" }, "Disk file on this machine (file:)"),
        kubernetes ? null : h("option", { value: "oci" }, "OCI layout on this machine (oci:)"),
      );
      content = kubernetes
        ? [
            field("vm-name", "Name", h("input", { type: "text", required: true, autocomplete: "off", spellcheck: "false" }), "Lowercase letters, digits and '-'; the VM's name everywhere.", "name"),
            field("vm-namespace", "Namespace", h("input", { type: "text", autocomplete: "off", spellcheck: "false", list: "known-namespaces" }), "The Kubernetes namespace to create it in; you need permission to create virtualmachineapps there.", "namespace"),
            h("datalist", { id: "known-namespaces" }, seenNamespaces.map((namespace) => h("option", { value: namespace }))),
            field("vm-display-name", "Display name (optional)", h("input", { type: "text" }), "What people see, e.g. 'Debian 12'.", "displayName"),
            field("vm-image-kind", "Image source", kind, "A registry image the cluster pulls, or a disk uploaded with \"Upload disk\" (its PVC).", "imageKind"),
            field("vm-image", "Image", h("input", { type: "text", required: true, autocomplete: "off", spellcheck: "false", placeholder: "quay.io/containerdisks/debian:12" }), "A containerDisk reference such as registry.example.com/vms/debian:12, or for an uploaded disk the PVC's (DataVolume's) name.", "image"),
            field("vm-persistent", "Persistent disk", h("input", { type: "checkbox" }), "Checked: the image is imported into a volume the VM owns (CDI; set a disk size on the next step) and changes survive restarts. Unchecked: the VM runs on a throw-away copy of the image.", "persistent"),
          ]
        : [
            field("vm-name", "Name", h("input", { type: "text", required: true, autocomplete: "off", spellcheck: "false" }), "Lowercase letters, digits and '-'; the VM's name everywhere.", "name"),
            field("vm-namespace", "Namespace", h("input", { type: "text", autocomplete: "off" }), "Groups VMs; 'default' unless you need another.", "namespace"),
            field("vm-display-name", "Display name (optional)", h("input", { type: "text" }), "What people see, e.g. 'Debian 12'.", "displayName"),
            field("vm-image-kind", "Image source", kind, "The local backend boots registry images, disk files (qcow2, raw, …) and OCI layouts made by paddock package.", "imageKind"),
            field("vm-image", "Image", h("input", { type: "text", required: true, autocomplete: "off", spellcheck: "false", placeholder: "quay.io/containerdisks/debian:12" }), "A reference such as registry.example.com/vms/debian:12, or a path such as /srv/disks/debian.qcow2.", "image"),
          ];
      if (!kubernetes) content.push(imageLibrary());
      kind.addEventListener("change", () => {
        draft.imageKind = kind.value as ImageKind;
        const image = stepArea.querySelector<HTMLInputElement>("#vm-image");
        if (image) image.placeholder = draft.imageKind === "registry" ? "quay.io/containerdisks/debian:12" : draft.imageKind === "pvc" ? "debian-disk" : draft.imageKind === "file" ? "/srv/disks/debian.qcow2" : "/srv/images/debian-oci:12";
        updatePreview();
      });
    } else if (step === 1) {
      content = [
        field("vm-cpu", "Virtual CPUs", h("input", { type: "number", min: 1, max: 64, step: 1 }), "How many CPUs the guest sees.", "cpu"),
        field("vm-memory", "Memory", h("input", { type: "text", list: "memory-sizes" }), "e.g. 512Mi, 2Gi.", "memory"),
        h("datalist", { id: "memory-sizes" }, ["256Mi", "512Mi", "1Gi", "2Gi", "4Gi", "8Gi"].map((size) => h("option", { value: size }))),
        field("vm-disk", "Disk size (optional)", h("input", { type: "text", placeholder: "10Gi" }), "Grows the image's disk to this size; empty keeps the image's size.", "diskSize"),
        field("vm-start", "Start now", h("input", { type: "checkbox" }), "Unchecked creates the VM stopped (runStrategy Halted).", "startNow"),
      ];
    } else if (step === 2) {
      content = [
        field("vm-user-data", "Cloud-init user data (optional)", h("textarea", { rows: 10, spellcheck: "false", placeholder: "#cloud-config\npackages: [htop]" }), "Handed to the guest as a NoCloud seed, like KubeVirt's cloudInitNoCloud.", "userData"),
        field("vm-ssh", "SSH public keys (optional)", h("textarea", { rows: 3, spellcheck: "false", placeholder: "ssh-ed25519 AAAA… you@laptop" }), "One key per line; cloud-init adds them to the default user.", "sshKey"),
      ];
    } else {
      content = [
        h("p", {}, "paddock will POST the VirtualMachineApp shown on the right. ", draft.startNow ? "It starts as soon as its disk is ready." : "It stays stopped until you start it."),
        kubernetes
          ? h("p", { class: "muted" }, "The console creates it as you (your RBAC decides); the paddock operator then makes the KubeVirt VirtualMachine. `kubectl apply -f` of the same manifest does the same.")
          : h("p", { class: "muted" }, "The same manifest works with `paddock vm create -f` and on a cluster with the paddock operator."),
      ];
    }
    replaceChildren(stepArea, h("h2", {}, STEPS[step]), content);
    stepArea.querySelector<HTMLElement>("input, select, textarea")?.focus();
    updatePreview();
  };

  /** Fills the image fields with a library entry's containerDisk value (kind from its prefix). */
  const chooseImage = (value: string): void => {
    const [imageKind, image] = value.startsWith("file:") ? (["file", value.slice(5)] as const) : value.startsWith("oci:") ? (["oci", value.slice(4)] as const) : (["registry", value] as const);
    draft.imageKind = imageKind;
    draft.image = image;
    const kindSelect = stepArea.querySelector<HTMLSelectElement>("#vm-image-kind");
    if (kindSelect) kindSelect.value = imageKind;
    const imageInput = stepArea.querySelector<HTMLInputElement>("#vm-image");
    if (imageInput) {
      imageInput.value = image;
      imageInput.removeAttribute("aria-invalid");
    }
    const problem = stepArea.querySelector("#vm-image-problem");
    if (problem) problem.textContent = "";
    updatePreview();
  };

  /**
   * Local mode: the disks already stored on this machine, as a radio group (arrow keys move the
   * choice, as in any radio group); choosing one fills the image fields.
   */
  const imageLibrary = (): HTMLElement => {
    const body = h("div", { class: "library-body" }, h("p", { class: "muted" }, "Loading the images on this machine…"));
    const fieldset = h(
      "fieldset",
      { class: "image-library", id: "image-library", "aria-busy": "true" },
      h("legend", {}, "Image library (optional)"),
      h("div", { class: "help" }, "Disks already on this machine, from earlier VMs; choose one instead of typing its source."),
      body,
    );
    void request<{ items: LibraryImage[] }>("GET", "/api/v1/images").then(
      ({ items }) => {
        fieldset.setAttribute("aria-busy", "false");
        if (!items.length) {
          replaceChildren(body, h("p", { class: "muted", id: "image-library-empty" }, "No images yet: the first VM's disk is kept here once it is created."));
          return;
        }
        replaceChildren(
          body,
          items.map((image) => {
            const current = manifestOf(draft).spec as { image?: { containerDisk?: string } };
            const radio = h("input", { type: "radio", name: "library-image", value: image.image, "data-digest": image.digest, checked: current.image?.containerDisk === image.image });
            radio.addEventListener("change", () => {
              if (radio.checked) chooseImage(image.image);
            });
            const details = [image.format ?? "unknown format", `${formatBytes(image.size)} stored`, image.virtualSize === undefined ? null : `${formatBytes(image.virtualSize)} disk`]
              .filter(Boolean)
              .join(" · ");
            return h(
              "label",
              { class: "library-image", "data-digest": image.digest },
              radio,
              h(
                "span",
                { class: "library-text" },
                h("span", { class: "library-source" }, image.source ?? `${image.digest.slice(0, 19)}… (source not recorded)`),
                h("span", { class: "muted" }, details, " · imported ", timeAgo(image.importedAt), image.usedBy.length ? ` · used by ${image.usedBy.join(", ")}` : ""),
              ),
            );
          }),
        );
      },
      (error: unknown) => {
        fieldset.setAttribute("aria-busy", "false");
        replaceChildren(body, h("p", { class: "error", role: "alert" }, `The image library cannot be shown: ${describeError(error)}`));
      },
    );
    return fieldset;
  };

  const showProblems = (found: Record<string, string>): boolean => {
    for (const element of stepArea.querySelectorAll<HTMLElement>(".problem")) element.textContent = "";
    for (const [id, message] of Object.entries(found)) {
      const target = stepArea.querySelector(`#${id}-problem`);
      if (target) target.textContent = message;
      stepArea.querySelector(`#${id}`)?.setAttribute("aria-invalid", "true");
    }
    const first = Object.keys(found)[0];
    if (first) stepArea.querySelector<HTMLElement>(`#${first}`)?.focus();
    return first === undefined;
  };

  const form = h(
    "form",
    { class: "wizard", novalidate: true, "aria-label": "Create a virtual machine" },
    stepper,
    stepArea,
    errorArea,
    h("div", { class: "actions" }, back, next),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!showProblems(problems(draft, step))) return;
    if (step < STEPS.length - 1) {
      step += 1;
      renderStep();
      return;
    }
    for (let index = 0; index < STEPS.length - 1; index += 1) {
      const found = problems(draft, index);
      if (Object.keys(found).length) {
        step = index;
        renderStep();
        showProblems(found);
        return;
      }
    }
    const yaml = toYaml(manifestOf(draft));
    void withProgress(next, "Creating (preparing the disk)…", async () => {
      const vm = await request<Vm>("POST", "/api/v1/vms", { text: yaml, contentType: "application/yaml" });
      store.put(vm);
      location.hash = `#/vm/${encodeURIComponent(vm.namespace)}/${encodeURIComponent(vm.name)}`;
    }, errorArea);
  });
  back.addEventListener("click", () => {
    if (step > 0) {
      step -= 1;
      renderStep();
    }
  });

  replaceChildren(
    root,
    h("div", { class: "page-head" }, h("h1", {}, "Create a virtual machine")),
    h("div", { class: "two-columns" }, form, h("section", { class: "preview", "aria-label": "Manifest preview" }, h("h2", {}, "VirtualMachineApp"), preview)),
  );
  renderStep();
};
