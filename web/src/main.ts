// paddock's web console: sign-in, hash routing and the page frame.
//
// The backend (local or kubernetes) comes from the public /readyz before anything is shown.
// Local mode: the access token comes from the `#token=` fragment of the URL `paddock serve`
// prints (a fragment never reaches a server or a log) or from the sign-in form, and is kept in
// sessionStorage for this tab only. Kubernetes mode: the form takes a Kubernetes bearer token,
// which is exchanged once at POST /api/v1/session for a console session token; only that session
// token is kept, never the Kubernetes token. Every page talks to the same-origin API; nothing is
// fetched from anywhere else.

import "@xterm/xterm/css/xterm.css";
import "./style.css";
import { ApiError, backend, createSession, loadBackend, request, setToken, signOut, token } from "./api";
import { backupsPage } from "./backups";
import { vncPage, serialPage } from "./console";
import { createPage } from "./create";
import { detailPage } from "./detail";
import { h, replaceChildren } from "./dom";
import { listPage } from "./list";
import { uploadPage } from "./upload";
import { store } from "./store";
import { mirrorInjectedStyles } from "./styles";
import { Page, errorBox } from "./ui";

mirrorInjectedStyles();

const routes: [RegExp, Page, string][] = [
  [/^\/?$/, listPage, "Virtual machines"],
  [/^\/create$/, createPage, "Create a VM"],
  [/^\/backups$/, backupsPage, "Backups"],
  [/^\/upload$/, uploadPage, "Upload disk"],
  [/^\/vm\/([^/]+)\/([^/]+)$/, detailPage, "VM"],
  [/^\/vm\/([^/]+)\/([^/]+)\/console$/, vncPage, "Console"],
  [/^\/vm\/([^/]+)\/([^/]+)\/serial$/, serialPage, "Serial console"],
];

const main = h("main", { id: "main", tabindex: -1 });
const nav = h("nav", { class: "top-nav", "aria-label": "Main" });
let leave: (() => void) | void;

function layout(): void {
  const signOutButton = h("button", { type: "button", class: "link", id: "sign-out" }, "Sign out");
  signOutButton.addEventListener("click", () => {
    signOut();
    sessionStorage.removeItem(USER_KEY);
    store.stop();
    location.hash = "#/";
    route();
  });
  const user = sessionStorage.getItem(USER_KEY);
  replaceChildren(nav, h("a", { href: "#/" }, "Virtual machines"), h("a", { href: "#/create" }, "Create"), h("a", { href: "#/backups", id: "nav-backups" }, "Backups"), backend() === "kubernetes" ? h("a", { href: "#/upload", id: "nav-upload" }, "Upload disk") : null, h("span", { class: "spacer" }), user ? h("span", { class: "muted", id: "signed-in-user" }, user) : null, h("a", { href: "/openapi.json", target: "_blank", rel: "noopener", id: "api-link" }, "API"), signOutButton);
  replaceChildren(
    document.body,
    h("a", { class: "skip-link", href: "#main" }, "Skip to content"),
    h("header", { class: "top" }, h("a", { class: "brand", href: "#/" }, "paddock"), nav),
    main,
  );
  // The API document needs the token too: fetch it and show it as a blob.
  nav.querySelector("#api-link")?.addEventListener("click", (event) => {
    event.preventDefault();
    request<unknown>("GET", "/openapi.json").then((document) => {
      const blob = new Blob([JSON.stringify(document, null, 2)], { type: "application/json" });
      window.open(URL.createObjectURL(blob), "_blank", "noopener");
    });
  });
}

/** Kubernetes mode: who signed in, shown in the header (sessionStorage, like the session token). */
const USER_KEY = "paddock.user";

function signInPage(problem?: unknown): void {
  leave?.();
  leave = undefined;
  const input = h("input", { type: "password", id: "token", autocomplete: "off", required: true, spellcheck: "false", "aria-describedby": "token-help" });
  const errorArea = h("div", {}, problem ? errorBox(problem, "Sign-in failed") : null);
  const submit = h("button", { type: "submit", class: "primary", id: "sign-in" }, "Sign in");
  const form = h(
    "form",
    { class: "sign-in", "aria-labelledby": "sign-in-title" },
    h("h1", { id: "sign-in-title" }, "paddock"),
    ...(backend() === "kubernetes"
      ? [
          h("label", { for: "token" }, "Kubernetes bearer token"),
          input,
          h(
            "p",
            { class: "help", id: "token-help" },
            "A token the cluster accepts, e.g. from `kubectl create token NAME`. The console checks it once and gives this tab its own session token (8 hours); the Kubernetes token is not kept. What you can see and do is what your RBAC allows.",
          ),
        ]
      : [
          h("label", { for: "token" }, "Access token"),
          input,
          h("p", { class: "help", id: "token-help" }, "`paddock serve` prints it at start (the URL with #token= signs in directly). It is also in serve.json in the server's state directory."),
        ]),
    errorArea,
    submit,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    void signIn(input.value.trim(), errorArea);
  });
  replaceChildren(document.body, h("main", { id: "main" }, form));
  input.focus();
}

async function signIn(candidate: string, errorArea: HTMLElement): Promise<void> {
  try {
    if (backend() === "kubernetes") {
      const session = await createSession(candidate);
      setToken(session.token);
      sessionStorage.setItem(USER_KEY, session.user.username);
      start();
      return;
    }
    await request("GET", "/api/v1/vms", undefined, candidate);
    setToken(candidate);
    start();
  } catch (error) {
    replaceChildren(errorArea, errorBox(error, error instanceof ApiError && error.code === 401 ? "Wrong token" : "Sign-in failed"));
  }
}

function route(): void {
  if (!token()) {
    signInPage();
    return;
  }
  if (!document.body.contains(main)) layout();
  const path = decodeURIComponent(location.hash.replace(/^#/, "")) === "" ? "/" : location.hash.replace(/^#/, "");
  leave?.();
  leave = undefined;
  for (const [pattern, page, title] of routes) {
    const match = pattern.exec(path);
    if (match) {
      const parameters = match.slice(1).map(decodeURIComponent);
      document.title = `${parameters.length ? `${parameters[1]} · ` : ""}${title} · paddock`;
      for (const link of nav.querySelectorAll("a")) link.toggleAttribute("aria-current", link.getAttribute("href") === `#${path}` || (path === "/" && link.getAttribute("href") === "#/"));
      leave = page(main, parameters);
      main.focus({ preventScroll: true });
      return;
    }
  }
  replaceChildren(main, errorBox(`There is no page ${path}.`, "Not found"), h("p", {}, h("a", { href: "#/" }, "Back to the list")));
}

let watchingForSignOut = false;

function start(): void {
  store.start();
  if (watchingForSignOut) {
    if (!location.hash || location.hash === "#") location.hash = "#/";
    route();
    return;
  }
  watchingForSignOut = true;
  // A 401 later (the server restarted with a new token) sends the user back to sign in.
  store.subscribe(() => {
    if (store.error?.code === 401) {
      signOut();
      store.stop();
      signInPage(store.error);
    }
  });
  if (!location.hash || location.hash === "#") location.hash = "#/";
  route();
}

window.addEventListener("hashchange", () => {
  if (token()) route();
});

// `#token=…` from the URL `paddock serve` printed: keep it, then take it out of the address bar
// and the history so it is not shared by copying the URL.
const fragment = /^#token=([^&]+)/.exec(location.hash);
if (fragment) history.replaceState(null, "", `${location.pathname}#/`);
await loadBackend();
document.documentElement.dataset.backend = backend();
if (fragment) {
  const errorArea = h("div", {});
  void signIn(decodeURIComponent(fragment[1]), errorArea).then(() => {
    if (!token()) signInPage(errorArea.textContent ? new ApiError(401, "Unauthorized", errorArea.querySelector(".error-message")?.textContent ?? "") : undefined);
  });
} else if (token()) {
  start();
} else {
  signInPage();
}
