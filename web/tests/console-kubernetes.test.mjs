// End-to-end test of the web console in Kubernetes mode: `paddock serve --kubeconfig` (the real
// binary) on the test world — a real kube-apiserver, the KubeVirt/CDI simulator running real QEMU
// and the real `paddock operator` — driven with Playwright in Debian's Chromium (headless).
//
// The admin (a ServiceAccount bound to cluster-admin) signs in with a Kubernetes token (only the
// console session token is kept), creates a VirtualMachineApp in the wizard, sees it Running,
// reads a non-blank VNC canvas, filters the list, migrates, takes, restores and deletes a
// snapshot, sets (after a refused invalid one) and clears a snapshot schedule. alice (a
// ServiceAccount without RBAC) sees the 403 explanation built from the API's `permission` on the
// detail page and the console page, which does not connect; after a RoleBinding she sees the VM and its screen, and a stop she may not do explains itself.
// The session token works at a second console replica sharing the session key.
// bob, who may open serial consoles but not screens, sees which permission the screen needs and
// uses the serial console. The detail page's import progress bar follows a DataVolume's import
// (reported step by step through the world, as CDI's importer would). The admin
// deletes the VM. Before that the admin uploads the test disk on the "Upload disk" page (progress bar,
// the server's confirmation, the DataVolume's phase until Succeeded). The admin backs a persistent
// VM up to a loopback registry from its detail page, sees it listed, restores it under a new name
// and finds the new VM; alice gets the 403 explanation for virtualmachineexports. Screenshots go to
// target/web-screenshots/kubernetes-*.png.
//
// The world is started by `cargo run -p paddock-tests --bin cluster-console-world`, which prints
// the console URL and the tokens as JSON and takes commands (`grant`) on stdin.
//
// Run: `node web/tests/console-kubernetes.test.mjs` (hack/test.sh does). Environment:
//   PADDOCK_BIN       a built paddock binary (default: the world binary builds it with cargo)
//   PADDOCK_CACHE_DIR where the cluster binaries and the test disk are cached
//   CHROMIUM          the browser (default /usr/bin/chromium); when missing the test is skipped
//                     loudly, unless PADDOCK_REQUIRE_CHROMIUM=1 makes that a failure.
import { chromium } from "playwright-core";
import { spawn, spawnSync } from "node:child_process";
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { createInterface } from "node:readline";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";

const repository = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const browserPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const targetDir = process.env.CARGO_TARGET_DIR ? resolve(process.env.CARGO_TARGET_DIR) : join(repository, "target");
const screenshots = join(targetDir, "web-screenshots");
const VM = "web-k8s";
const IMPORTING = "web-k8s-import";
// The image the simulator "pulls": it boots the test disk under real QEMU for any containerDisk.
const IMAGE = "registry.example.com/vms/console-test:1";
const started = Date.now();
const timings = [];

function log(message) {
  console.log(`[web-e2e-kubernetes ${((Date.now() - started) / 1000).toFixed(1)}s] ${message}`);
}

async function timed(label, work) {
  const begin = Date.now();
  const result = await work();
  const seconds = (Date.now() - begin) / 1000;
  timings.push([label, seconds]);
  log(`${label}: ${seconds.toFixed(1)} s`);
  return result;
}

function skip(message) {
  if (process.env.PADDOCK_REQUIRE_CHROMIUM === "1") {
    console.error(message);
    process.exit(1);
  }
  console.error(`\n${"!".repeat(100)}\n${message}\n${"!".repeat(100)}\n`);
  process.exit(0);
}

if (!existsSync(browserPath)) {
  skip(`Chromium is not installed at ${browserPath}: the Kubernetes web console end-to-end test is SKIPPED. Install it with hack/install-deps.sh (apt-get install chromium) or set CHROMIUM.`);
}

function paddockBinary(scratch) {
  if (process.env.PADDOCK_BIN) return process.env.PADDOCK_BIN;
  const build = spawnSync("cargo", ["build", "-p", "paddock", "--message-format=json-render-diagnostics"], {
    cwd: repository,
    stdio: ["ignore", "pipe", "inherit"],
    encoding: "utf8",
    maxBuffer: 256 * 1024 * 1024,
  });
  assert.equal(build.status, 0, "cargo build -p paddock failed");
  const executable = build.stdout
    .split("\n")
    .filter((line) => line.startsWith("{"))
    .map((line) => JSON.parse(line))
    .find((message) => message.reason === "compiler-artifact" && message.target?.name === "paddock" && message.executable)?.executable;
  assert.ok(executable, "cargo built no paddock executable");
  // target/debug/paddock is shared with other builds, which may replace it at any moment: the
  // console and the operator run a private copy of what this build made.
  const copy = join(scratch, "paddock");
  copyFileSync(executable, copy);
  chmodSync(copy, 0o755);
  return copy;
}

/** Starts the world binary; resolves with its JSON and a way to send it commands. */
function startWorld(binary) {
  return new Promise((resolvePromise, reject) => {
    const env = { ...process.env, PADDOCK_BINARY: binary };
    env.PADDOCK_CACHE_DIR ??= join(process.env.XDG_CACHE_HOME ?? join(process.env.HOME, ".cache"), "paddock");
    const child = spawn("cargo", ["run", "--locked", "-q", "-p", "paddock-tests", "--bin", "cluster-console-world"], {
      cwd: repository,
      stdio: ["pipe", "pipe", "inherit"],
      env,
    });
    const lines = createInterface({ input: child.stdout });
    const waiting = [];
    let world = null;
    const timer = setTimeout(() => reject(new Error("the test world did not start within 20 minutes")), 20 * 60 * 1000);
    lines.on("line", (line) => {
      let message;
      try {
        message = JSON.parse(line);
      } catch {
        log(`world: ${line}`);
        return;
      }
      if (!world) {
        clearTimeout(timer);
        world = message;
        resolvePromise({
          ...message,
          child,
          /** Sends a command and resolves with the world's answer. */
          command(text) {
            return new Promise((resolveAnswer) => {
              waiting.push(resolveAnswer);
              child.stdin.write(`${text}\n`);
            });
          },
        });
      } else {
        waiting.shift()?.(message);
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      if (!world) reject(new Error(`the test world exited (${code}) before it was up`));
    });
  });
}

async function stopWorld(world) {
  if (!world || world.child.exitCode !== null) return;
  world.child.stdin.end();
  await Promise.race([
    new Promise((resolveExit) => world.child.on("exit", resolveExit)),
    new Promise((resolveTimeout) =>
      setTimeout(() => {
        world.child.kill("SIGTERM");
        resolveTimeout();
      }, 30000),
    ),
  ]);
}

/** The share of pixels of the VNC canvas that differ from its most common colour. */
async function canvasLitShare(page) {
  return page.evaluate(() => {
    const canvas = document.querySelector("#vnc-screen canvas");
    if (!canvas || canvas.width === 0 || canvas.height === 0) return { width: 0, height: 0, lit: 0, colours: 0 };
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    const counts = new Map();
    for (let index = 0; index < data.length; index += 4) {
      const key = (data[index] << 16) | (data[index + 1] << 8) | data[index + 2];
      counts.set(key, (counts.get(key) ?? 0) + 1);
    }
    const pixels = data.length / 4;
    const background = Math.max(...counts.values());
    return { width: canvas.width, height: canvas.height, lit: (pixels - background) / pixels, colours: counts.size };
  });
}

async function waitFor(description, timeoutMs, check) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    last = await check();
    if (last.done) return last.value;
    await new Promise((resolveDelay) => setTimeout(resolveDelay, 500));
  }
  throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${description}; last: ${JSON.stringify(last?.value)}`);
}

async function waitReady(url) {
  await waitFor("the console's /readyz", 120000, async () => {
    const response = await fetch(`${url}/readyz`).catch(() => null);
    return { done: response?.status === 200, value: response ? await response.text() : "unreachable" };
  });
}

/** Signs in on the form with a Kubernetes token; checks that only the session token is kept. */
async function signIn(page, url, kubernetesToken) {
  await page.goto(`${url}/ui/`);
  await page.locator("label[for=token]", { hasText: "Kubernetes bearer token" }).waitFor();
  await page.fill("#token", kubernetesToken);
  await page.click("#sign-in");
  await page.locator("h1", { hasText: "Virtual machines" }).waitFor();
  const stored = await page.evaluate(() => ({ session: { ...sessionStorage }, local: { ...localStorage } }));
  assert.match(stored.session["paddock.token"] ?? "", /^pds1\./, "the tab keeps a console session token");
  for (const value of [...Object.values(stored.session), ...Object.values(stored.local)]) {
    assert.ok(!value.includes(kubernetesToken), "the Kubernetes token is not kept by the browser");
  }
}

async function expectPermission(page, sentence) {
  const explanation = page.locator(".permission-explanation", { hasText: sentence }).first();
  await explanation.waitFor({ timeout: 30000 });
  return explanation;
}

async function main() {
  mkdirSync(screenshots, { recursive: true });
  const scratch = mkdtempSync(join(tmpdir(), "paddock-web-e2e-kubernetes-"));
  const binary = await timed("build paddock", async () => paddockBinary(scratch));
  const world = await timed("test world up", () => startWorld(binary)).catch((error) => {
    rmSync(scratch, { recursive: true, force: true });
    throw error;
  });
  if (world.skip) {
    await stopWorld(world);
    rmSync(scratch, { recursive: true, force: true });
    skip(`the Kubernetes web console end-to-end test is SKIPPED: ${world.skip}`);
  }
  try {
    await run(world);
  } catch (error) {
    if (world.child.exitCode === null) {
      const answer = await Promise.race([world.command("logs"), new Promise((resolveLate) => setTimeout(() => resolveLate({}), 10000))]);
      console.error(`--- console and operator logs ---\n${answer.logs ?? "(none)"}`);
    }
    throw error;
  } finally {
    await stopWorld(world);
    rmSync(scratch, { recursive: true, force: true });
  }
  log(`passed; timings: ${timings.map(([label, seconds]) => `${label} ${seconds.toFixed(1)} s`).join(", ")}`);
  log(`screenshots: ${screenshots}/kubernetes-*.png`);
}

async function run(world) {
  const { url, namespace } = world;
  await timed("console ready", () => waitReady(url));
  await timed("console replica ready", () => waitReady(world.replicaUrl));
  const browser = await chromium.launch({ executablePath: browserPath, headless: true, args: ["--no-sandbox"] });
  const policyViolations = [];
  const pageErrors = [];
  const watch = (page) => {
    page.setDefaultTimeout(30000);
    page.on("console", (message) => {
      if (message.type() === "error" && /Content.Security.Policy/i.test(message.text())) policyViolations.push(message.text());
    });
    page.on("pageerror", (error) => pageErrors.push(String(error)));
  };
  const detailUrl = `${url}/ui/#/vm/${namespace}/${VM}`;
  try {
    const admin = await (await browser.newContext({ viewport: { width: 1366, height: 768 } })).newPage();
    watch(admin);

    await timed("admin signs in with a Kubernetes token", async () => {
      await admin.goto(`${url}/ui/`);
      await admin.fill("#token", "not-a-kubernetes-token");
      await admin.click("#sign-in");
      await admin.locator(".error").waitFor();
      await signIn(admin, url, world.adminToken);
      await admin.locator("#signed-in-user", { hasText: `system:serviceaccount:${namespace}:console-admin` }).waitFor();
    });

    // Sessions are signed with a key the replicas share: the other replica takes this session
    // (the browser's session token, not the Kubernetes token) and serves the same user.
    await timed("the session works at the other console replica", async () => {
      const sessionToken = await admin.evaluate(() => sessionStorage.getItem("paddock.token"));
      const other = await fetch(`${world.replicaUrl}/api/v1/session`, { headers: { Authorization: `Bearer ${sessionToken}` } });
      assert.equal(other.status, 200, "the replica accepts the session");
      const session = await other.json();
      assert.equal(session.user.username, `system:serviceaccount:${namespace}:console-admin`);
      const vms = await fetch(`${world.replicaUrl}/api/v1/vms`, { headers: { Authorization: `Bearer ${sessionToken}` } });
      assert.equal(vms.status, 200, "the replica acts as the session's user");
      const forged = await fetch(`${world.replicaUrl}/api/v1/session`, { headers: { Authorization: `Bearer ${sessionToken.slice(0, -4)}AAAA` } });
      assert.equal(forged.status, 401, "a changed signature is refused");
    });

    await timed("upload a disk in the browser", async () => {
      assert.ok(world.testDisk, "the world names the test disk");
      await admin.click("#nav-upload");
      await admin.locator("h1", { hasText: "Upload disk" }).waitFor();
      await admin.setInputFiles("#upload-file", world.testDisk);
      // The suggested size comes from the qcow2 header's virtual size, not the file's size.
      await admin.locator("#upload-size-hint", { hasText: "virtual size" }).waitFor();
      assert.match(await admin.inputValue("#upload-size"), /^\d+Mi$/, "a size is suggested");
      await admin.fill("#upload-name", "web-upload");
      await admin.fill("#upload-namespace", namespace);
      await admin.click("#upload-start");
      await admin.locator("#upload-progress").waitFor();
      await admin.locator("#upload-confirmed").waitFor({ timeout: 120000 });
      const progress = await admin.locator("#upload-progress").evaluate((bar) => bar.value);
      assert.equal(progress, 100, "the bar is full once the server confirmed");
      await admin.locator('#upload-phase[data-phase="Succeeded"]').waitFor({ timeout: 120000 });
      await admin.locator("#upload-done").waitFor();
      await admin.screenshot({ path: join(screenshots, "kubernetes-upload.png"), fullPage: true });
      // "Create VM from this disk": the wizard starts from the uploaded disk's PVC.
      await admin.click("#upload-create-vm");
      await admin.locator("h1", { hasText: "Create a virtual machine" }).waitFor();
      assert.equal(await admin.inputValue("#vm-image-kind"), "pvc");
      const fromDisk = await admin.locator("#yaml-preview").innerText();
      for (const line of ["pvc:", "name: web-upload", "persistent: false", `namespace: ${namespace}`]) {
        assert.ok(fromDisk.includes(line), `the manifest from the uploaded disk shows ${line}:\n${fromDisk}`);
      }
      await admin.click("#nav-upload");
      await admin.locator("h1", { hasText: "Upload disk" }).waitFor();
      await admin.setInputFiles("#upload-file", world.testDisk);
      await admin.fill("#upload-name", "web-upload");
      await admin.fill("#upload-namespace", namespace);
      // The same name again: the server's 409 is shown, not a silent stop.
      await admin.click("#upload-start");
      await admin.locator("#upload-error .error", { hasText: "already exists" }).waitFor({ timeout: 60000 });
      await admin.click('header.top a:has-text("Virtual machines")');
      await admin.locator("h1", { hasText: "Virtual machines" }).waitFor();
    });

    await timed("create through the wizard", async () => {
      await admin.click("text=Create VM");
      await admin.fill("#vm-name", VM);
      await admin.fill("#vm-namespace", namespace);
      await admin.fill("#vm-image", IMAGE);
      await admin.uncheck("#vm-persistent");
      await admin.click("#wizard-next");
      await admin.fill("#vm-cpu", "1");
      await admin.fill("#vm-memory", "256Mi");
      await admin.click("#wizard-next");
      await admin.click("#wizard-next");
      // The image library is local mode's: not in this wizard, and the API says why.
      assert.equal(await admin.locator("#image-library").count(), 0, "no image library in cluster mode");
      const library = await admin.evaluate(async () => {
        const response = await fetch("/api/v1/images", { headers: { Authorization: `Bearer ${sessionStorage.getItem("paddock.token")}` } });
        return { status: response.status, body: await response.json() };
      });
      assert.equal(library.status, 501);
      assert.match(library.body.message, /not available in cluster mode/);
      const yaml = await admin.locator("#yaml-preview").innerText();
      for (const line of [`name: ${VM}`, `namespace: ${namespace}`, `containerDisk: ${IMAGE}`, "persistent: false", "memory: 256Mi", "runStrategy: Always"]) {
        assert.ok(yaml.includes(line), `the manifest preview shows ${line}:\n${yaml}`);
      }
      await admin.screenshot({ path: join(screenshots, "kubernetes-wizard.png") });
      await admin.click("#wizard-create");
      await admin.waitForURL(new RegExp(`#/vm/${namespace}/${VM}$`), { timeout: 120000 });
    });

    await timed("Running", async () => {
      await admin.locator("#vm-phase", { hasText: "Running" }).waitFor({ timeout: 180000 });
      await admin.locator("#vm-migrate").waitFor();
      await admin.locator("#vm-clone").waitFor();
      // The screen's thumbnail (vnc/screenshot) is in the picture, not an empty frame.
      await waitFor("the VNC thumbnail loaded", 60000, async () => {
        const loaded = await admin
          .locator("img.screen")
          .evaluate((image) => image.complete && image.naturalWidth > 0, undefined, { timeout: 1000 })
          .catch(() => false);
        return { done: loaded, value: loaded };
      });
      await admin.screenshot({ path: join(screenshots, "kubernetes-detail.png"), fullPage: true });
    });

    // The import progress bar of a persistent disk: the VM's DataVolume imports from an http
    // source, which the simulator leaves to others, so the world reports the import's phase and
    // progress as CDI's importer would; the operator copies them into the app's importProgress,
    // and the detail page's bar follows, then disappears once the disk is imported.
    await timed("import progress bar on the detail page", async () => {
      const manifest = `apiVersion: paddock.dev/v1alpha1\nkind: VirtualMachineApp\nmetadata:\n  name: ${IMPORTING}\n  namespace: ${namespace}\nspec:\n  image:\n    http:\n      url: http://disks.example.com/console-test.qcow2\n  resources: {cpu: 1, memory: 256Mi}\n  disk: {size: 1Gi}\n  runStrategy: Halted\n`;
      const created = await admin.evaluate(async (body) => {
        const response = await fetch("/api/v1/vms", { method: "POST", headers: { Authorization: `Bearer ${sessionStorage.getItem("paddock.token")}`, "Content-Type": "application/yaml" }, body });
        return { status: response.status, text: await response.text() };
      }, manifest);
      assert.equal(created.status, 201, `the app with an http disk is created: ${created.text}`);
      await admin.goto(`${url}/ui/#/vm/${namespace}/${IMPORTING}`);
      await admin.locator('#vm-import[data-state="Importing"]').waitFor({ timeout: 120000 });
      const bar = admin.locator("#vm-import progress");
      for (const percent of [23, 71]) {
        assert.deepEqual(await world.command(`import-progress ${IMPORTING}-disk ImportInProgress ${percent}.00%`), { patched: true });
        await admin.locator("#vm-import", { hasText: `Importing disk: ${percent}.0%` }).waitFor({ timeout: 60000 });
        assert.equal(await bar.evaluate((element) => element.value), percent, `the bar shows ${percent}%`);
        if (percent === 71) await admin.screenshot({ path: join(screenshots, "kubernetes-import-progress.png") });
      }
      assert.deepEqual(await world.command(`import-progress ${IMPORTING}-disk Succeeded 100.0%`), { patched: true });
      await admin.locator("#vm-import").waitFor({ state: "detached", timeout: 60000 });
      const deleted = await admin.evaluate(async (path) => (await fetch(path, { method: "DELETE", headers: { Authorization: `Bearer ${sessionStorage.getItem("paddock.token")}` } })).status, `/api/v1/vms/${namespace}/${IMPORTING}`);
      assert.ok([200, 202, 204].includes(deleted), `the importing VM is deleted (${deleted})`);
      await admin.goto(detailUrl);
      await admin.locator("#vm-phase", { hasText: "Running" }).waitFor();
    });

    await timed("VNC screen not blank", async () => {
      await admin.click("#open-console");
      await admin.locator('#vnc-screen[data-connected="true"]').waitFor({ timeout: 60000 });
      const share = await waitFor("a non-blank VNC canvas", 120000, async () => {
        const value = await canvasLitShare(admin);
        return { done: value.width > 0 && value.lit > 0.001 && value.colours > 1, value };
      });
      log(`VNC canvas ${share.width}x${share.height}, ${(share.lit * 100).toFixed(2)}% of pixels lit, ${share.colours} colours`);
      await admin.screenshot({ path: join(screenshots, "kubernetes-console.png") });
    });

    await timed("list with namespace column and filters", async () => {
      await admin.click('header.top a:has-text("Virtual machines")');
      const row = admin.locator(`tr[data-vm="${namespace}/${VM}"]`);
      await row.locator("[data-phase=Running]").waitFor();
      assert.equal((await row.locator("td").nth(3).innerText()).trim(), namespace, "the namespace column");
      await admin.selectOption("#filter-namespace", namespace);
      await admin.selectOption("#filter-phase", "Stopped");
      await row.waitFor({ state: "detached" });
      await admin.locator("td", { hasText: "No VM matches the filters." }).waitFor();
      await admin.selectOption("#filter-phase", "Running");
      await row.waitFor();
      await admin.screenshot({ path: join(screenshots, "kubernetes-list.png") });
      await row.locator("a.vm-name").click();
      await admin.locator("#vm-phase", { hasText: "Running" }).waitFor();
    });

    await timed("migrate", async () => {
      await admin.click("#vm-migrate");
      await admin.locator(".toast", { hasText: `Migration of ${VM} started` }).waitFor({ timeout: 60000 });
      await admin.locator("#vm-phase", { hasText: "Running" }).waitFor({ timeout: 120000 });
    });

    await timed("snapshot, restore, delete it", async () => {
      assert.equal(await admin.locator("#snapshot-memory").count(), 0, "no memory snapshots in a cluster");
      await admin.fill("#snapshot-name", "before-upgrade");
      await admin.click("#snapshot-create");
      await admin.locator('tr[data-snapshot="before-upgrade"]').waitFor({ timeout: 120000 });
      await admin.locator("#operation-progress:empty").waitFor({ state: "attached", timeout: 120000 });
      await admin.locator('tr[data-snapshot="before-upgrade"] button[data-action=restore]').click();
      await admin.locator("dialog button", { hasText: "Restore" }).click();
      await admin.locator(".toast", { hasText: "Restored before-upgrade" }).waitFor({ timeout: 180000 });
      await admin.locator("#vm-phase", { hasText: "Running" }).waitFor({ timeout: 180000 });
      await admin.locator('tr[data-snapshot="before-upgrade"] button[data-action=delete]').click();
      await admin.locator("dialog button", { hasText: "Delete snapshot" }).click();
      await admin.locator('tr[data-snapshot="before-upgrade"]').waitFor({ state: "detached", timeout: 120000 });
    });

    await timed("snapshot schedule: refused when invalid, set, in the app's spec, cleared", async () => {
      await admin.locator("#snapshot-schedule", { hasText: "No scheduled snapshots." }).waitFor();
      await admin.fill("#schedule-cron", "every night");
      await admin.click("#schedule-save");
      await admin.locator(".error", { hasText: "five-field cron expression" }).waitFor({ timeout: 30000 });
      await admin.fill("#schedule-cron", "0 3 * * *");
      await admin.fill("#schedule-keep", "3");
      await admin.click("#schedule-save");
      await admin.locator('#snapshot-schedule[data-schedule="0 3 * * *"]', { hasText: "keeping the newest 3" }).waitFor({ timeout: 30000 });
      // The API (as the signed-in admin) shows it in the VirtualMachineApp's spec, which the operator runs.
      const spec = await admin.evaluate(async (path) => {
        const response = await fetch(path, { headers: { Authorization: `Bearer ${sessionStorage.getItem("paddock.token")}` } });
        return (await response.json()).manifest;
      }, `/api/v1/vms/${namespace}/${VM}`);
      assert.equal(spec.kind, "VirtualMachineApp");
      assert.deepEqual(spec.spec.snapshots, { schedule: "0 3 * * *", keep: 3 }, "the schedule is the app's spec.snapshots");
      await admin.click("#schedule-clear");
      await admin.locator("#snapshot-schedule", { hasText: "No scheduled snapshots." }).waitFor({ timeout: 30000 });
    });

    const alice = await (await browser.newContext({ viewport: { width: 1366, height: 768 } })).newPage();
    watch(alice);
    await timed("a user without RBAC sees 403 explanations and no console", async () => {
      await signIn(alice, url, world.userToken);
      await alice.locator("#empty-rbac-hint").waitFor();
      await alice.click("#nav-upload");
      await alice.setInputFiles("#upload-file", world.testDisk);
      await alice.fill("#upload-namespace", namespace);
      await alice.click("#upload-start");
      await expectPermission(alice, `You need permission to create datavolumes in namespace ${namespace}. Ask your cluster administrator for a Role that allows it.`);
      await alice.goto(detailUrl);
      await expectPermission(alice, `You need permission to get virtualmachines in namespace ${namespace}. Ask your cluster administrator for a Role that allows it.`);
      await alice.screenshot({ path: join(screenshots, "kubernetes-403.png") });
      await alice.goto(`${detailUrl}/console`);
      await alice.locator(".permission-error").waitFor();
      const explanation = await alice.locator(".permission-explanation").innerText();
      assert.match(explanation, new RegExp(`^You need permission to get \\S+ in namespace ${namespace}\\. Ask your cluster administrator for a Role that allows it\\.$`));
      assert.ok(await alice.locator(".vnc-frame").isHidden(), "no black screen in place of the explanation");
      await alice.waitForTimeout(2000);
      assert.notEqual(await alice.locator("#vnc-screen").getAttribute("data-connected"), "true", "the console did not connect");
      await alice.screenshot({ path: join(screenshots, "kubernetes-console-403.png") });
    });

    await timed("after a RoleBinding the user can", async () => {
      assert.deepEqual(await world.command("grant"), { granted: true });
      // Denials are cached for a few seconds: reload until the VM shows.
      await waitFor("the VM visible to alice", 60000, async () => {
        await alice.goto("about:blank");
        await alice.goto(detailUrl);
        const visible = await alice.locator("#vm-phase", { hasText: "Running" }).waitFor({ timeout: 5000 }).then(() => true, () => false);
        return { done: visible, value: await alice.locator("main").innerText().catch(() => "") };
      });
      await alice.click("#open-console");
      await alice.locator('#vnc-screen[data-connected="true"]').waitFor({ timeout: 60000 });
      await waitFor("a non-blank VNC canvas for alice", 120000, async () => {
        const value = await canvasLitShare(alice);
        return { done: value.width > 0 && value.lit > 0.001 && value.colours > 1, value };
      });
      // Viewing is not stopping: the action she may not do explains itself.
      await alice.goBack();
      await alice.locator("#vm-phase", { hasText: "Running" }).waitFor();
      await alice.click("button[data-action=stop]");
      await expectPermission(alice, `You need permission to patch virtualmachineapps in namespace ${namespace}.`);
    });

    // bob may open the serial console (virtualmachineinstances/console) but not the screen: the
    // screen's page names exactly the permission missing, in place of the viewer, and the serial
    // console connects.
    const bob = await (await browser.newContext({ viewport: { width: 1366, height: 768 } })).newPage();
    watch(bob);
    await timed("a user with the serial console but not the screen", async () => {
      await signIn(bob, url, world.serialUserToken);
      await bob.goto(`${detailUrl}/console`);
      await bob.locator(".permission-error").waitFor();
      assert.equal(
        await bob.locator(".permission-explanation").innerText(),
        `You need permission to get virtualmachineinstances/vnc in namespace ${namespace}. Ask your cluster administrator for a Role that allows it.`,
      );
      assert.ok(await bob.locator(".vnc-frame").isHidden(), "the explanation replaces the screen");
      await bob.screenshot({ path: join(screenshots, "kubernetes-console-vnc-refused.png") });
      await bob.goto(`${detailUrl}/serial`);
      await bob.locator('#serial-terminal[data-connected="true"]').waitFor({ timeout: 60000 });
      assert.equal(await bob.locator(".permission-error").count(), 0, "no refusal on the serial console");
      const access = await bob.evaluate(async (path) => (await fetch(path, { headers: { Authorization: `Bearer ${sessionStorage.getItem("paddock.token")}` } })).json(), `/api/v1/vms/${namespace}/${VM}/console-access`);
      assert.equal(access.serial.allowed, true);
      assert.equal(access.vnc.allowed, false);
      assert.deepEqual([access.vnc.permission.verb, access.vnc.permission.resource, access.vnc.permission.subresource], ["get", "virtualmachineinstances", "vnc"]);
    });
    // Backups in cluster mode: the admin backs a persistent VM (a blank disk the simulated
    // importer pulled from the loopback registry) up from its detail page, sees it listed (also on
    // the Backups page) and restores it as a new VM; alice, who may view VMs but not export them,
    // gets the 403 explanation.
    if (world.backupImage) {
      const source = "web-backup";
      const copy = "web-backup-copy";
      const sourceUrl = `${url}/ui/#/vm/${namespace}/${source}`;
      await timed("admin backs up a VM from the console", async () => {
        const manifest = {
          apiVersion: "paddock.dev/v1alpha1",
          kind: "VirtualMachineApp",
          metadata: { name: source, namespace },
          spec: { image: { containerDisk: world.backupImage, persistent: true }, resources: { cpu: 1, memory: "256Mi" }, disk: { size: "32Mi" }, runStrategy: "Halted" },
        };
        const created = await admin.request.post(`${url}/api/v1/vms`, { headers: { Authorization: `Bearer ${world.adminToken}`, "Content-Type": "application/json" }, data: JSON.stringify(manifest) });
        assert.equal(created.status(), 201, await created.text());
        await admin.goto(sourceUrl);
        await admin.locator("#backups-section").waitFor();
        assert.equal(await admin.locator("#backups-unsupported").count(), 0, "no cluster-mode note in place of the backups");
        await admin.fill("#backup-repository", world.backupRepository);
        await admin.check("#backup-insecure");
        await admin.click("#backup-submit");
        await admin.locator('#operation-bar[data-phase="Running"], #operation-bar[data-phase="Succeeded"]').waitFor();
        await admin.locator('#operation-bar[data-phase="Succeeded"], #operation-bar[data-phase="Failed"]').waitFor({ timeout: 600000 });
        const errors = await admin.locator("#backup-errors").innerText();
        assert.equal(await admin.locator("#operation-bar").getAttribute("data-phase"), "Succeeded", `the backup failed: ${errors}`);
        await admin.locator(`tr[data-backup^="${source}-"]`).waitFor({ timeout: 30000 });
        assert.equal(await admin.locator("#backups tbody tr").count(), 1, "exactly one backup is listed");
        await admin.evaluate(() => document.querySelectorAll(".toast").forEach((toast) => toast.remove()));
        await admin.screenshot({ path: join(screenshots, "kubernetes-backups.png"), fullPage: true });
      });
      await timed("admin restores it as a new VM", async () => {
        await admin.locator(`tr[data-backup^="${source}-"] button[data-action=restore-as]`).click();
        await admin.fill("#restore-name", copy);
        await admin.uncheck("#restore-start");
        await admin.locator("dialog button", { hasText: "Restore" }).click();
        await admin.locator("#open-restored").waitFor({ timeout: 120000 });
        await admin.click("#open-restored");
        await admin.locator("h1", { hasText: copy }).waitFor({ timeout: 60000 });
        const restored = await admin.request.get(`${url}/api/v1/vms/${namespace}/${copy}`, { headers: { Authorization: `Bearer ${world.adminToken}` } });
        assert.equal(restored.status(), 200, await restored.text());
        const view = await restored.json();
        assert.match(view.manifest.spec.image.containerDisk, new RegExp(`^${world.backupRepository.replace(/[.]/g, "\\.")}@sha256:`), "the new VirtualMachineApp names the backup by digest");
        await admin.click("#nav-backups");
        await admin.fill("#backups-repository", world.backupRepository);
        await admin.check("#backups-insecure");
        await admin.click("#backups-submit");
        await admin.locator(`#backups tr[data-backup^="${source}-"]`).waitFor({ timeout: 30000 });
      });
      await timed("alice may not back up", async () => {
        await alice.goto(sourceUrl);
        await alice.locator("#backups-section").waitFor();
        await alice.fill("#backup-repository", world.backupRepository);
        await alice.check("#backup-insecure");
        await alice.click("#backup-submit");
        await expectPermission(alice, `You need permission to create virtualmachineexports in namespace ${namespace}.`);
        await alice.screenshot({ path: join(screenshots, "kubernetes-backup-403.png") });
      });
      for (const name of [copy, source]) {
        const removed = await admin.request.delete(`${url}/api/v1/vms/${namespace}/${name}?force=true`, { headers: { Authorization: `Bearer ${world.adminToken}` } });
        assert.ok([202, 204].includes(removed.status()), `deleting ${name}: ${removed.status()} ${await removed.text()}`);
      }
    } else {
      console.error(`\n${"!".repeat(100)}\ndocker-registry is missing: the cluster backup steps are SKIPPED\n${"!".repeat(100)}\n`);
    }

    await timed("admin deletes the VM", async () => {
      await admin.goto(detailUrl);
      await admin.locator("#vm-phase", { hasText: "Running" }).waitFor();
      await admin.click("#vm-delete");
      await admin.fill("dialog input[type=text]", VM);
      await admin.locator("dialog button", { hasText: "Delete VM" }).click();
      await admin.waitForURL(/#\/$/, { timeout: 120000 });
      await admin.locator(`tr[data-vm="${namespace}/${VM}"]`).waitFor({ state: "detached", timeout: 120000 });
    });

    assert.deepEqual(policyViolations, [], "the Content-Security-Policy blocked nothing");
    assert.deepEqual(pageErrors, [], "no uncaught errors in the page");
  } catch (error) {
    if (policyViolations.length) console.error(`CSP violations: ${policyViolations.join("\n")}`);
    if (pageErrors.length) console.error(`page errors: ${pageErrors.join("\n")}`);
    throw error;
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
