// The live view of every VM: one list from the API, then the event stream applied to it
// (the order the API documents: list first, then events; after Lagged, list again). Pages
// subscribe and re-render from it; the detail page also reads the per-VM event log kept here.

import { ApiError, Vm, VmEvent, eventsUrl, getVm, listVms } from "./api";

/** One event as the UI remembers it, stamped with when this tab received it. */
export interface LoggedEvent {
  at: Date;
  event: VmEvent;
}

type Listener = () => void;

const EVENT_LOG_LIMIT = 200;

class VmStore {
  vms = new Map<string, Vm>();
  loaded = false;
  error: ApiError | null = null;
  /** Whether the event stream is connected, so pages can say when status is not live. */
  live = false;
  private log: LoggedEvent[] = [];
  private listeners = new Set<Listener>();
  private source: EventSource | null = null;

  static key(namespace: string, name: string): string {
    return `${namespace}/${name}`;
  }

  subscribe(listener: Listener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private notify(): void {
    for (const listener of this.listeners) listener();
  }

  /** Starts the event stream (once) and loads the list. */
  start(): void {
    if (!this.source) this.connect();
    void this.reload();
  }

  /** Stops everything (sign out). */
  stop(): void {
    this.source?.close();
    this.source = null;
    this.vms.clear();
    this.loaded = false;
    this.live = false;
    this.log = [];
  }

  async reload(): Promise<void> {
    try {
      const items = await listVms();
      this.vms = new Map(items.map((vm) => [VmStore.key(vm.namespace, vm.name), vm]));
      this.loaded = true;
      this.error = null;
    } catch (error) {
      this.error = error instanceof ApiError ? error : new ApiError(0, "Error", String(error));
    }
    this.notify();
  }

  /** Puts a VM the API just returned (after an action) into the store. */
  put(vm: Vm): void {
    this.vms.set(VmStore.key(vm.namespace, vm.name), vm);
    this.notify();
  }

  remove(namespace: string, name: string): void {
    this.vms.delete(VmStore.key(namespace, name));
    this.notify();
  }

  get(namespace: string, name: string): Vm | undefined {
    return this.vms.get(VmStore.key(namespace, name));
  }

  /** Events about one VM, newest first. */
  eventsOf(namespace: string, name: string): LoggedEvent[] {
    return this.log.filter(
      ({ event }) => "namespace" in event && event.namespace === namespace && event.name === name,
    );
  }

  private connect(): void {
    const source = new EventSource(eventsUrl());
    this.source = source;
    source.onopen = () => {
      this.live = true;
      // Whatever changed while the stream was down is only in a fresh list.
      void this.reload();
    };
    source.onerror = () => {
      // EventSource reconnects by itself; say that status is not live meanwhile.
      this.live = false;
      this.notify();
    };
    for (const type of ["Changed", "SnapshotsChanged", "Deleted", "Lagged"]) {
      source.addEventListener(type, (message) => {
        try {
          this.apply(JSON.parse((message as MessageEvent<string>).data) as VmEvent);
        } catch {
          void this.reload();
        }
      });
    }
  }

  private apply(event: VmEvent): void {
    this.log.unshift({ at: new Date(), event });
    this.log.length = Math.min(this.log.length, EVENT_LOG_LIMIT);
    if (event.type === "Lagged") {
      void this.reload();
      return;
    }
    const key = VmStore.key(event.namespace, event.name);
    const vm = this.vms.get(key);
    if (event.type === "Deleted") {
      this.vms.delete(key);
    } else if (!vm) {
      // A VM created elsewhere (the CLI, another tab): fetch it whole.
      getVm(event.namespace, event.name).then(
        (fresh) => this.put(fresh),
        () => undefined,
      );
    } else if (event.type === "Changed") {
      this.vms.set(key, { ...vm, status: event.status });
    } else {
      this.vms.set(key, { ...vm, snapshots: event.snapshots });
    }
    this.notify();
  }
}

/** The store every page shares. */
export const store = new VmStore();
export { VmStore };
