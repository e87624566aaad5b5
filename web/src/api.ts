// The client of paddock's REST API (see /openapi.json): bearer-token requests, JSON errors turned
// into ApiError with the server's message, and the URLs of the websockets and the event stream
// (browsers cannot set headers on those, so they carry the token as a query parameter).

const TOKEN_KEY = "paddock.token";

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

/** A refused or failed request, with the API's `{code, reason, message}`. */
export class ApiError extends Error {
  constructor(
    readonly code: number,
    readonly reason: string,
    message: string,
  ) {
    super(message);
  }
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
    const error = parsed as { code?: number; reason?: string; message?: string } | undefined;
    throw new ApiError(
      response.status,
      error?.reason ?? response.statusText,
      error?.message ?? `${method} ${path} failed with HTTP ${response.status}`,
    );
  }
  return parsed as T;
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
    const error = (await response.json().catch(() => ({}))) as { reason?: string; message?: string };
    throw new ApiError(response.status, error.reason ?? "", error.message ?? `HTTP ${response.status}`);
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
