// The consoles: the VM's screen through noVNC and its serial port through xterm.js, both over the
// API's websockets with KubeVirt's `plain.kubevirt.io` subprotocol.
//
// Screen: shared sessions (RFB `shared`), so opening the console never throws another viewer out,
// and `preserveSession=true` on the URL, KubeVirt's way of asking the same of its VNC proxy; an
// unexpected disconnect while the VM runs reconnects by itself. Special keys, paste as
// keystrokes, scaling and fullscreen are in the toolbar.

import RFB from "@novnc/novnc";
import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";
import { ApiError, KUBEVIRT_SUBPROTOCOL, backend, consoleAccess, getVm, websocketUrl } from "./api";
import { h, phaseBadge, replaceChildren } from "./dom";
import { store } from "./store";
import { Page, errorBox } from "./ui";

const RECONNECT_DELAY_MS = 2000;
// Time between the keys of pasted text (see typePaste).
const PASTE_KEY_INTERVAL_MS = 30;

/** X11 keysyms for the keys the toolbar sends. */
const KEYSYM = {
  shift: 0xffe1,
  control: 0xffe3,
  alt: 0xffe9,
  deleteKey: 0xffff,
  returnKey: 0xff0d,
  tab: 0xff09,
  escape: 0xff1b,
  f1: 0xffbe,
  printScreen: 0xff61,
};

/** US-layout characters typed with Shift, so the guest sees the right character. */
const SHIFTED = new Set('~!@#$%^&*()_+{}|:"<>?ABCDEFGHIJKLMNOPQRSTUVWXYZ');

/** The keysym of a character (X11: Latin-1 maps to itself, other Unicode to 0x01000000 + code point). */
export function keysymOf(character: string): number {
  const code = character.codePointAt(0) ?? 0;
  if (character === "\n") return KEYSYM.returnKey;
  if (character === "\t") return KEYSYM.tab;
  if ((code >= 0x20 && code <= 0x7e) || (code >= 0xa0 && code <= 0xff)) return code;
  return 0x01000000 + code;
}

function header(namespace: string, name: string, current: "console" | "serial"): HTMLElement {
  const base = `#/vm/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}`;
  const vm = store.get(namespace, name);
  return h(
    "div",
    { class: "console-head" },
    h("p", { class: "breadcrumbs" }, h("a", { href: "#/" }, "Virtual machines"), " / ", h("a", { href: base }, `${namespace}/${name}`), " / ", current === "console" ? "Screen" : "Serial"),
    vm ? phaseBadge(vm.status.phase) : null,
    h(
      "nav",
      { class: "tabs", "aria-label": "Consoles" },
      h("a", { href: `${base}/console`, "aria-current": current === "console" ? "page" : null }, "Screen (VNC)"),
      h("a", { href: `${base}/serial`, "aria-current": current === "serial" ? "page" : null }, "Serial"),
    ),
  );
}

/**
 * Kubernetes mode: a browser cannot read why a websocket upgrade was refused, so before (and
 * after a failed) connection ask the API whether this console may be opened: the serial console
 * and the screen are separate subresources with separate RBAC rules, and the refusal names the
 * one permission missing (as a 403 would).
 */
async function consoleRefusal(namespace: string, name: string, kind: "serial" | "vnc"): Promise<ApiError | null> {
  if (backend() !== "kubernetes") return null;
  try {
    const access = (await consoleAccess(namespace, name))[kind];
    if (access.allowed) return null;
    return new ApiError(403, "Forbidden", access.message ?? `You may not open the ${kind === "vnc" ? "screen" : "serial console"}.`, access.permission);
  } catch (error) {
    return error instanceof ApiError && error.code === 403 ? error : null;
  }
}

export const vncPage: Page = (root, [namespace, name]) => {
  const screen = h("div", { class: "vnc-screen", id: "vnc-screen" });
  const status = h("span", { class: "console-status", role: "status", id: "vnc-status" }, "Connecting…");
  const errorArea = h("div", {});
  const pasteText = h("textarea", { rows: 3, id: "paste-text", spellcheck: "false", "aria-label": "Text to type into the VM" });
  const scaleSelect = h("select", { id: "vnc-scale", "aria-label": "Scaling" }, h("option", { value: "fit" }, "Fit to window"), h("option", { value: "actual" }, "Actual size (scroll)"));
  const keyMenu = h(
    "select",
    { id: "vnc-keys", "aria-label": "Send a special key" },
    h("option", { value: "" }, "Send key…"),
    ["Tab", "Escape", "Ctrl-Alt-F1", "Ctrl-Alt-F2", "Ctrl-Alt-Backspace", "Print Screen", "Super (Windows)"].map((key) => h("option", { value: key }, key)),
  );
  let rfb: RFB | null = null;
  let leaving = false;
  let reconnectTimer: ReturnType<typeof setTimeout> | undefined;

  const tap = (keysyms: number[]): void => {
    if (!rfb) return;
    for (const keysym of keysyms) rfb.sendKey(keysym, null, true);
    for (const keysym of [...keysyms].reverse()) rfb.sendKey(keysym, null, false);
  };

  // A refused console shows the explanation instead of an empty black screen.
  const refuse = (error: ApiError): void => {
    status.textContent = "Not allowed";
    frame.hidden = true;
    screen.dataset.connected = "false";
    replaceChildren(errorArea, errorBox(error, "You cannot open this console"));
  };

  const connect = (): void => {
    clearTimeout(reconnectTimer);
    errorArea.replaceChildren();
    status.textContent = "Connecting…";
    void consoleRefusal(namespace, name, "vnc").then((refusal) => {
      if (leaving) return;
      if (refusal) refuse(refusal);
      else openSession();
    });
  };

  const openSession = (): void => {
    frame.hidden = false;
    const url = websocketUrl(namespace, name, "vnc", "&preserveSession=true");
    const session = new RFB(screen, url, { shared: true, wsProtocols: [KUBEVIRT_SUBPROTOCOL] });
    rfb = session;
    session.scaleViewport = scaleSelect.value === "fit";
    session.clipViewport = false;
    session.focusOnClick = true;
    session.background = "#111";
    session.addEventListener("connect", () => {
      status.textContent = "Connected";
      screen.dataset.connected = "true";
      session.focus();
    });
    session.addEventListener("disconnect", (event) => {
      screen.dataset.connected = "false";
      if (rfb === session) rfb = null;
      if (leaving) return;
      const clean = (event as CustomEvent<{ clean: boolean }>).detail?.clean;
      status.textContent = clean ? "Disconnected" : "Connection lost";
      // The websocket cannot carry the API's error message, so ask the API why.
      getVm(namespace, name).then(
        async (vm) => {
          store.put(vm);
          const refusal = await consoleRefusal(namespace, name, "vnc");
          if (refusal) {
            refuse(refusal);
            return;
          }
          if (vm.status.phase === "Running" || vm.status.phase === "Paused") {
            status.textContent = "Connection lost; reconnecting…";
            reconnectTimer = setTimeout(connect, RECONNECT_DELAY_MS);
          } else {
            replaceChildren(errorArea, errorBox(`The VM is ${vm.status.phase}; start it to use its screen.`, "The console closed"));
          }
        },
        (error) => {
          if (error instanceof ApiError && error.permission) refuse(error);
          else replaceChildren(errorArea, errorBox(error, "The console closed"));
        },
      );
    });
    session.addEventListener("securityfailure", (event) => {
      const reason = (event as CustomEvent<{ reason?: string }>).detail?.reason ?? "unknown";
      replaceChildren(errorArea, errorBox(`The VNC server refused the session: ${reason}`, "Cannot connect"));
    });
  };

  const button = (label: string, id: string, action: () => void, title?: string): HTMLButtonElement => {
    const element = h("button", { type: "button", id, title }, label);
    element.addEventListener("click", () => {
      action();
      rfb?.focus();
    });
    return element;
  };

  // Keys are paced: a burst overflows the guest's keyboard queue (QEMU drops PS/2 scancodes when a
  // slow or busy guest does not drain its 16-entry queue), and pasted text arrives with gaps.
  const typePaste = async (): Promise<void> => {
    if (!rfb) return;
    const typeButton = document.getElementById("paste-type") as HTMLButtonElement | null;
    const characters = [...pasteText.value];
    if (typeButton) typeButton.disabled = true;
    try {
      for (const [index, character] of characters.entries()) {
        if (!rfb) return;
        const shifted = SHIFTED.has(character);
        tap(shifted ? [KEYSYM.shift, keysymOf(character)] : [keysymOf(character)]);
        if (typeButton) typeButton.textContent = `Typing ${index + 1}/${characters.length}`;
        await new Promise((resolve) => setTimeout(resolve, PASTE_KEY_INTERVAL_MS));
      }
    } finally {
      if (typeButton) {
        typeButton.disabled = false;
        typeButton.textContent = "Type it";
      }
    }
  };

  keyMenu.addEventListener("change", () => {
    const choice = keyMenu.value;
    keyMenu.value = "";
    const keys: Record<string, number[]> = {
      Tab: [KEYSYM.tab],
      Escape: [KEYSYM.escape],
      "Ctrl-Alt-F1": [KEYSYM.control, KEYSYM.alt, KEYSYM.f1],
      "Ctrl-Alt-F2": [KEYSYM.control, KEYSYM.alt, KEYSYM.f1 + 1],
      "Ctrl-Alt-Backspace": [KEYSYM.control, KEYSYM.alt, 0xff08],
      "Print Screen": [KEYSYM.printScreen],
      "Super (Windows)": [0xffeb],
    };
    if (keys[choice]) tap(keys[choice]);
    rfb?.focus();
  });
  scaleSelect.addEventListener("change", () => {
    if (rfb) rfb.scaleViewport = scaleSelect.value === "fit";
    screen.classList.toggle("actual-size", scaleSelect.value !== "fit");
  });

  const frame = h("div", { class: "vnc-frame" }, screen);
  replaceChildren(
    root,
    header(namespace, name, "console"),
    h(
      "div",
      { class: "toolbar", role: "toolbar", "aria-label": "Console" },
      button("Ctrl-Alt-Del", "vnc-ctrl-alt-del", () => rfb?.sendCtrlAltDel()),
      keyMenu,
      scaleSelect,
      button("Fullscreen", "vnc-fullscreen", () => void frame.requestFullscreen().catch(() => undefined), "Escape leaves full screen"),
      button("Reconnect", "vnc-reconnect", () => {
        rfb?.disconnect();
        connect();
      }),
      h("span", { class: "spacer" }),
      status,
    ),
    errorArea,
    frame,
    h(
      "details",
      { class: "paste" },
      h("summary", {}, "Paste as keystrokes"),
      h("p", { class: "help" }, "The text is typed into the VM key by key (US keyboard layout), for guests without clipboard sharing."),
      pasteText,
      button("Type it", "paste-type", () => void typePaste()),
    ),
  );
  connect();
  return () => {
    leaving = true;
    clearTimeout(reconnectTimer);
    rfb?.disconnect();
  };
};

export const serialPage: Page = (root, [namespace, name]) => {
  const status = h("span", { class: "console-status", role: "status", id: "serial-status" }, "Connecting…");
  const errorArea = h("div", {});
  const container = h("div", { class: "terminal", id: "serial-terminal" });
  const terminal = new Terminal({
    cursorBlink: true,
    convertEol: false,
    fontFamily: "ui-monospace, 'DejaVu Sans Mono', 'Liberation Mono', monospace",
    fontSize: 14,
    scrollback: 5000,
    theme: { background: "#111111" },
  });
  const fit = new FitAddon();
  terminal.loadAddon(fit);
  let socket: WebSocket | null = null;
  let leaving = false;
  const encoder = new TextEncoder();

  const terminalFrame = h("div", { class: "terminal-frame" }, container);
  // A refused console shows the explanation (the missing permission) instead of the terminal.
  const refuse = (error: ApiError): void => {
    status.textContent = "Not allowed";
    terminalFrame.hidden = true;
    container.dataset.connected = "false";
    replaceChildren(errorArea, errorBox(error, "You cannot open this console"));
  };

  const connect = (): void => {
    errorArea.replaceChildren();
    status.textContent = "Connecting…";
    void consoleRefusal(namespace, name, "serial").then((refusal) => {
      if (leaving) return;
      if (refusal) refuse(refusal);
      else openSocket();
    });
  };

  const openSocket = (): void => {
    terminalFrame.hidden = false;
    const websocket = new WebSocket(websocketUrl(namespace, name, "console"), [KUBEVIRT_SUBPROTOCOL]);
    websocket.binaryType = "arraybuffer";
    socket = websocket;
    websocket.onopen = () => {
      status.textContent = "Connected — the serial console is shared with every other viewer";
      container.dataset.connected = "true";
      terminal.focus();
    };
    websocket.onmessage = (message) => {
      terminal.write(typeof message.data === "string" ? message.data : new Uint8Array(message.data as ArrayBuffer));
    };
    websocket.onclose = (event) => {
      container.dataset.connected = "false";
      if (leaving) return;
      status.textContent = event.reason ? `Closed: ${event.reason}` : "Closed";
      getVm(namespace, name).then(
        async (vm) => {
          store.put(vm);
          const refusal = await consoleRefusal(namespace, name, "serial");
          if (leaving) return;
          if (refusal) refuse(refusal);
          else if (vm.status.phase !== "Running" && vm.status.phase !== "Paused") {
            replaceChildren(errorArea, errorBox(`The VM is ${vm.status.phase}; start it to use its serial console.`, "The console closed"));
          }
        },
        (error) => {
          if (error instanceof ApiError && error.permission) refuse(error);
          else replaceChildren(errorArea, errorBox(error, "The console closed"));
        },
      );
    };
  };
  terminal.onData((data) => {
    if (socket?.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
  });
  terminal.onBinary((data) => {
    if (socket?.readyState === WebSocket.OPEN) socket.send(Uint8Array.from(data, (character) => character.charCodeAt(0) & 0xff));
  });

  const reconnect = h("button", { type: "button", id: "serial-reconnect" }, "Reconnect");
  reconnect.addEventListener("click", () => {
    socket?.close();
    connect();
  });
  const clear = h("button", { type: "button", id: "serial-clear" }, "Clear");
  clear.addEventListener("click", () => {
    terminal.clear();
    terminal.focus();
  });
  replaceChildren(
    root,
    header(namespace, name, "serial"),
    h("div", { class: "toolbar", role: "toolbar", "aria-label": "Serial console" }, reconnect, clear, h("span", { class: "spacer" }), status),
    errorArea,
    terminalFrame,
    h("p", { class: "help" }, "While the terminal has focus every key, Tab included, goes to the VM; Ctrl-L (the address bar) or a click elsewhere leaves it."),
  );
  terminal.open(container);
  fit.fit();
  const onResize = (): void => fit.fit();
  window.addEventListener("resize", onResize);
  connect();
  return () => {
    leaving = true;
    window.removeEventListener("resize", onResize);
    socket?.close();
    terminal.dispose();
  };
};
