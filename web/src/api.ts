// The client of paddock's REST API (see /openapi.json): bearer-token requests, JSON errors turned
// into ApiError with the server's message, and the URLs of the websockets and the event stream
// (browsers cannot set headers on those, so they carry the token as a query parameter).

const TOKEN_KEY = "paddock.token";

/** Which backend the server runs: `local` (QEMU on that machine) or `kubernetes` (KubeVirt). */
export type BackendKind = "local" | "kubernetes";

let backendKind: BackendKind = "local";

/** The backend learned by {@link loadBackend}; `local` until then. */
export function backend(): BackendKind {
  return backendKind;
}

/**
 * Asks the server which backend it runs, from the public `/readyz` (its `backend` field is there
 * before anyone signs in, even while the server is not ready yet, with 503).
 */
export async function loadBackend(): Promise<BackendKind> {
  try {
    const response = await fetch("/readyz", { headers: { Accept: "application/json" }, cache: "no-store" });
    const body = (await response.json()) as { backend?: string };
    backendKind = body.backend === "kubernetes" ? "kubernetes" : "local";
  } catch {
    backendKind = "local";
  }
  return backendKind;
}

/** A VM as the API shows it (the `Vm` schema). */
export interface Vm {
  namespace: string;
  name: string;
  displayName?: string;
  runStrategy: string;
  createdAt: string;
  console: { serial: boolean; vnc: boolean };
  status: VmStatus;
  snapshots: Snapshot[];
  manifest: Record<string, unknown>;
}

/** The `VmStatus` schema. */
export interface VmStatus {
  phase: string;
  pid?: number;
  accelerator?: string;
  startedAt?: string;
  restartCount: number;
  lastExit?: { kind: string; at: string; message: string };
  message?: string;
  warnings?: string[];
  import?: ImportStatus;
}

/** The `VmStatus.import` schema: the boot disk's import while under way or after it failed. */
export interface ImportStatus {
  state: "Importing" | "Failed";
  progress?: string;
  percent?: number;
  message?: string;
}

/** A base image stored on the machine (the `Image` schema, local mode's image library). */
export interface LibraryImage {
  digest: string;
  /** What to write as spec.image.containerDisk to boot it. */
  image: string;
  source?: string;
  format?: string;
  size: number;
  virtualSize?: number;
  importedAt: string;
  recorded: boolean;
  usedBy: string[];
}

/** The `Snapshot` schema. */
export interface Snapshot {
  name: string;
  createdAt: string;
  memory: boolean;
  takenInPhase: string;
}

/** The `Event` schema: what the event stream carries. */
export type VmEvent =
  | { type: "Changed"; namespace: string; name: string; status: VmStatus }
  | { type: "SnapshotsChanged"; namespace: string; name: string; snapshots: Snapshot[] }
  | { type: "Deleted"; namespace: string; name: string }
  | { type: "Lagged"; missed: number };

/** What a 403 says the signed-in Kubernetes user lacks (the `Permission` schema). */
export interface Permission {
  verb: string;
  group: string;
  resource: string;
  subresource?: string;
  namespace?: string;
  name?: string;
}

/** A refused or failed request, with the API's `{code, reason, message}` (and `permission` on a 403). */
export class ApiError extends Error {
  constructor(
    readonly code: number,
    readonly reason: string,
    message: string,
    readonly permission?: Permission,
  ) {
    super(message);
  }
}

/** The sentence a person needs when a permission is missing: what to ask for, and from whom. */
export function permissionExplanation(permission: Permission): string {
  const resource = permission.subresource ? `${permission.resource}/${permission.subresource}` : permission.resource;
  const where = permission.namespace ? `in namespace ${permission.namespace}` : "in every namespace (cluster-wide)";
  return `You need permission to ${permission.verb} ${resource} ${where}. Ask your cluster administrator for a Role that allows it.`;
}

/** An error as one line for a toast: the permission sentence for a 403, else the message. */
export function describeError(error: unknown): string {
  if (error instanceof ApiError && error.permission) return permissionExplanation(error.permission);
  return error instanceof Error ? error.message : String(error);
}

/** The access token of this browser tab, if signed in. */
export function token(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** Keeps the token for this tab (sessionStorage: gone when the tab closes). */
export function setToken(value: string): void {
  sessionStorage.setItem(TOKEN_KEY, value);
}

/** Forgets the token. */
export function signOut(): void {
  sessionStorage.removeItem(TOKEN_KEY);
}

/** Path segment encoding for namespace and name. */
export function vmPath(namespace: string, name: string): string {
  return `/api/v1/vms/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}`;
}

/** Calls the API; resolves with the parsed JSON (undefined for 204), rejects with ApiError. */
export async function request<T>(
  method: string,
  path: string,
  body?: { text: string; contentType: string },
  candidateToken?: string,
): Promise<T> {
  const headers: Record<string, string> = { Accept: "application/json" };
  const bearer = candidateToken ?? token();
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body) headers["Content-Type"] = body.contentType;
  let response: Response;
  try {
    response = await fetch(path, { method, headers, body: body?.text, cache: "no-store" });
  } catch (error) {
    throw new ApiError(0, "Unreachable", `cannot reach paddock serve (${String(error)}); check that it is still running`);
  }
  if (response.status === 204) return undefined as T;
  const text = await response.text();
  let parsed: unknown;
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    parsed = undefined;
  }
  if (!response.ok) {
    const error = parsed as { code?: number; reason?: string; message?: string; permission?: Permission } | undefined;
    throw new ApiError(
      response.status,
      error?.reason ?? response.statusText,
      error?.message ?? `${method} ${path} failed with HTTP ${response.status}`,
      error?.permission,
    );
  }
  return parsed as T;
}

/** Whether the caller may open one console, and if not, what they lack (`ConsoleAccessEntry`). */
export interface ConsoleAccess {
  allowed: boolean;
  permission?: Permission;
  message?: string;
}

/**
 * Which consoles of a VM the caller may open; each is its own KubeVirt subresource with its own
 * RBAC rule (`GET …/console-access`).
 */
export function consoleAccess(namespace: string, name: string): Promise<{ serial: ConsoleAccess; vnc: ConsoleAccess }> {
  return request("GET", `${vmPath(namespace, name)}/console-access`);
}

/** A signed-in console session (`POST /api/v1/session`). */
export interface Session {
  token: string;
  expires?: string;
  user: { username: string; groups: string[] };
}

/**
 * Kubernetes mode: exchanges a Kubernetes bearer token for a console session token. Only the
 * session token is kept by the caller; the Kubernetes token is used for this one request.
 */
export function createSession(kubernetesToken: string): Promise<Session> {
  return request<Session>("POST", "/api/v1/session", undefined, kubernetesToken);
}

/** Kubernetes mode: migrates a running VM to another node. */
export function migrate(namespace: string, name: string): Promise<Vm> {
  return request<Vm>("PUT", `${vmPath(namespace, name)}/migrate`);
}

/** Kubernetes mode: clones a VM into a new one named `cloneName` in the same namespace. */
export function cloneVm(namespace: string, name: string, cloneName: string): Promise<Vm> {
  return request<Vm>("POST", `${vmPath(namespace, name)}/clone`, {
    text: JSON.stringify({ name: cloneName }),
    contentType: "application/json",
  });
}

/** Every VM. */
export async function listVms(): Promise<Vm[]> {
  return (await request<{ items: Vm[] }>("GET", "/api/v1/vms")).items;
}

/** One VM. */
export function getVm(namespace: string, name: string): Promise<Vm> {
  return request<Vm>("GET", vmPath(namespace, name));
}

/** A power action: start, stop, forcestop, restart, pause, unpause. */
export function power(namespace: string, name: string, action: string): Promise<Vm> {
  return request<Vm>("PUT", `${vmPath(namespace, name)}/${action}`);
}

/** A PNG of the VM's screen, as an object URL the caller must revoke. */
export async function screenshotUrl(namespace: string, name: string): Promise<string> {
  const response = await fetch(`${vmPath(namespace, name)}/screenshot`, {
    headers: { Authorization: `Bearer ${token() ?? ""}` },
    cache: "no-store",
  });
  if (!response.ok) {
    const error = (await response.json().catch(() => ({}))) as { reason?: string; message?: string; permission?: Permission };
    throw new ApiError(response.status, error.reason ?? "", error.message ?? `HTTP ${response.status}`, error.permission);
  }
  return URL.createObjectURL(await response.blob());
}

/** The websocket URL of a VM's `console` or `vnc` route. */
export function websocketUrl(namespace: string, name: string, console: "console" | "vnc", extra = ""): string {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = `token=${encodeURIComponent(token() ?? "")}${extra}`;
  return `${scheme}//${location.host}${vmPath(namespace, name)}/${console}?${query}`;
}

/** The event stream's URL. */
export function eventsUrl(): string {
  return `/api/v1/events?token=${encodeURIComponent(token() ?? "")}`;
}

/** KubeVirt's console subprotocol. */
export const KUBEVIRT_SUBPROTOCOL = "plain.kubevirt.io";
