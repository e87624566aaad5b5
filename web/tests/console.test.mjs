// End-to-end test of the web console against a real `paddock serve` and real QEMU, driven with
// Playwright in Debian's Chromium (headless): sign in with the token, create a VM from the test
// disk through the wizard, see it Running, read the serial console, check that the VNC canvas
// shows a screen, take and restore a memory snapshot (the guest's state really goes back), back
// the VM up to a real docker-registry on loopback and restore the backup as a new VM that runs,
// and delete the VM. Screenshots of each page go to target/web-screenshots/ (printed at the end).
//
// Run: `node web/tests/console.test.mjs` (hack/test.sh does, after `npm ci`). Environment:
//   PADDOCK_BIN       a built paddock binary (default: `cargo build -p paddock` and use that)
//   PADDOCK_CACHE_DIR where tests/testdisk/build.sh caches the test disk
//   (docker-registry  /usr/bin/docker-registry; when missing the backup steps are skipped loudly,
//                     unless PADDOCK_REQUIRE_CHROMIUM=1 makes that a failure too)
//   CHROMIUM          the browser (default /usr/bin/chromium); when missing the test is skipped
//                     loudly, unless PADDOCK_REQUIRE_CHROMIUM=1 makes that a failure.
import { chromium } from "playwright-core";
import { spawn, spawnSync } from "node:child_process";
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";

const repository = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const browserPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const targetDir = process.env.CARGO_TARGET_DIR ? resolve(process.env.CARGO_TARGET_DIR) : join(repository, "target");
const screenshots = join(targetDir, "web-screenshots");
const VM = "web-e2e";
const RESTORED = "web-e2e-restored";
const FROM_LIBRARY = "web-e2e-library";
const REGISTRY_BINARY = "/usr/bin/docker-registry";
const READY_BANNER = "PADDOCK TEST VM READY";
const started = Date.now();
const timings = [];

function log(message) {
  console.log(`[web-e2e ${((Date.now() - started) / 1000).toFixed(1)}s] ${message}`);
}

async function timed(label, work) {
  const begin = Date.now();
  const result = await work();
  const seconds = (Date.now() - begin) / 1000;
  timings.push([label, seconds]);
  log(`${label}: ${seconds.toFixed(1)} s`);
  return result;
}

if (!existsSync(browserPath)) {
  const message = `Chromium is not installed at ${browserPath}: the web console end-to-end test is SKIPPED. Install it with hack/install-deps.sh (apt-get install chromium) or set CHROMIUM.`;
  if (process.env.PADDOCK_REQUIRE_CHROMIUM === "1") {
    console.error(message);
    process.exit(1);
  }
  console.error(`\n${"!".repeat(100)}\n${message}\n${"!".repeat(100)}\n`);
  process.exit(0);
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
  // target/debug/paddock is shared with `cargo test` and other builds, which may replace it at
  // any moment: run a private copy of what this build made.
  const copy = join(scratch, "paddock");
  copyFileSync(executable, copy);
  chmodSync(copy, 0o755);
  return copy;
}

function testDisk() {
  const build = spawnSync("bash", [join(repository, "tests/testdisk/build.sh")], {
    stdio: ["ignore", "pipe", "inherit"],
    encoding: "utf8",
    env: { ...process.env, PADDOCK_CACHE_DIR: process.env.PADDOCK_CACHE_DIR ?? join(process.env.XDG_CACHE_HOME ?? join(process.env.HOME, ".cache"), "paddock") },
  });
  assert.equal(build.status, 0, `tests/testdisk/build.sh failed (status ${build.status})`);
  const disk = build.stdout.trim().split("\n").pop();
  assert.ok(disk && existsSync(disk), `the test disk build printed no disk path: ${build.stdout}`);
  return disk;
}

function startServe(binary, stateDir, logFile) {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(binary, ["serve", "--state-dir", stateDir, "--listen", "127.0.0.1:0"], {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "info" },
    });
    let logText = "";
    child.stderr.on("data", (chunk) => {
      logText += chunk;
      writeFileSync(logFile, logText);
    });
    let stdout = "";
    const fail = (error) => {
      clearTimeout(timer);
      child.kill("SIGTERM");
      reject(error);
    };
    const timer = setTimeout(() => fail(new Error(`paddock serve printed no web console URL in 60 s; log:\n${logText}`)), 60000);
    child.stdout.on("data", (chunk) => {
      stdout += chunk;
      const match = /web console: (http:\/\/\S+\/ui\/#token=([0-9a-f]{64}))/.exec(stdout);
      if (!match && /other clients:/.test(stdout)) {
        fail(new Error(`${binary} printed no web console URL (an old build?); its output:\n${stdout}`));
      }
      if (match) {
        clearTimeout(timer);
        resolvePromise({ child, consoleUrl: match[1], token: match[2], base: match[1].replace(/\/ui\/#.*$/, "") });
      }
    });
    child.on("exit", (code) => reject(new Error(`paddock serve exited (${code}); log:\n${logText}`)));
  });
}

/** A free loopback port (learnt by binding port 0; a race with another process is rare). */
function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

/** A real docker-registry on loopback with storage in `directory`; `null` (loudly) when missing. */
async function startRegistry(directory) {
  if (!existsSync(REGISTRY_BINARY)) {
    const message = `docker-registry is not installed at ${REGISTRY_BINARY}: the backup steps are SKIPPED. Install it with hack/install-deps.sh.`;
    if (process.env.PADDOCK_REQUIRE_CHROMIUM === "1") throw new Error(message);
    console.error(`\n${"!".repeat(100)}\n${message}\n${"!".repeat(100)}\n`);
    return null;
  }
  mkdirSync(join(directory, "storage"), { recursive: true });
  const address = `127.0.0.1:${await freePort()}`;
  writeFileSync(
    join(directory, "config.yml"),
    `version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: ${join(directory, "storage")}\n  delete:\n    enabled: true\nhttp:\n  addr: ${address}\n  secret: paddock-web-e2e\n`,
  );
  // The registry logs every 404 (a HEAD before each upload) as an error: keep that in its own file.
  const registryLog = openSync(join(directory, "registry.log"), "w");
  const child = spawn(REGISTRY_BINARY, ["serve", join(directory, "config.yml")], { stdio: ["ignore", registryLog, registryLog] });
  await waitFor("docker-registry to answer", 20000, async () => {
    const answer = await fetch(`http://${address}/v2/`).then((response) => response.status, () => 0);
    return { done: answer === 200, value: answer };
  });
  return { child, address };
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

async function serialText(page) {
  return page.locator("#serial-terminal .xterm-rows").innerText();
}

async function typeInSerial(page, command) {
  await page.locator("#serial-terminal").click();
  await page.keyboard.type(command);
  await page.keyboard.press("Enter");
}

async function main() {
  mkdirSync(screenshots, { recursive: true });
  const scratch = mkdtempSync(join(tmpdir(), "paddock-web-e2e-"));
  try {
    await run(scratch);
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
  log(`passed; timings: ${timings.map(([label, seconds]) => `${label} ${seconds.toFixed(1)} s`).join(", ")}`);
  log(`screenshots: ${screenshots}`);
}

async function run(scratch) {
  const binary = await timed("build paddock", async () => paddockBinary(scratch));
  const disk = await timed("test disk", async () => testDisk());
  const serveLog = join(scratch, "serve.log");
  const serve = await timed("paddock serve ready", () => startServe(binary, join(scratch, "state"), serveLog));
  const browser = await chromium.launch({ executablePath: browserPath, headless: true, args: ["--no-sandbox"] });
  const policyViolations = [];
  const pageErrors = [];
  try {
    const context = await browser.newContext({ viewport: { width: 1366, height: 768 } });
    const page = await context.newPage();
    page.setDefaultTimeout(30000);
    page.on("console", (message) => {
      if (message.type() === "error" && /Content.Security.Policy/i.test(message.text())) policyViolations.push(message.text());
    });
    page.on("pageerror", (error) => pageErrors.push(String(error)));

    // Sign in: the bare address leads a browser to the sign-in form; a wrong token shows the
    // API's message; the right one opens the list.
    await timed("sign in", async () => {
      const response = await page.goto(`${serve.base}/`);
      assert.ok(response.url().endsWith("/ui/"), `the bare address redirects to /ui/, got ${response.url()}`);
      const policy = (await page.request.get(`${serve.base}/ui/`)).headers()["content-security-policy"];
      assert.match(policy, /script-src 'self';/);
      assert.doesNotMatch(policy, /unsafe/);
      await page.fill("#token", "not-the-token-at-all");
      await page.click("#sign-in");
      await page.locator(".error-message").filter({ hasText: "access token is wrong" }).waitFor();
      await page.screenshot({ path: join(screenshots, "01-sign-in-error.png") });
      await page.fill("#token", serve.token);
      await page.click("#sign-in");
      await page.locator("h1", { hasText: "Virtual machines" }).waitFor();
      await page.locator(".live.on").waitFor();
    });

    // The printed URL signs in by itself and takes the token out of the address bar.
    await timed("sign in from the printed URL", async () => {
      const other = await browser.newPage();
      await other.goto(serve.consoleUrl);
      await other.locator("h1", { hasText: "Virtual machines" }).waitFor();
      assert.ok(!other.url().includes(serve.token), `the token left the address bar: ${other.url()}`);
      await other.close();
    });

    await timed("create through the wizard", async () => {
      await page.click("text=Create VM");
      await page.fill("#vm-name", VM);
      await page.selectOption("#vm-image-kind", "file");
      await page.fill("#vm-image", disk);
      await page.click("#wizard-next");
      await page.fill("#vm-cpu", "1");
      await page.fill("#vm-memory", "256Mi");
      await page.fill("#vm-disk", "64Mi");
      await page.click("#wizard-next");
      await page.click("#wizard-next");
      const yaml = await page.locator("#yaml-preview").innerText();
      for (const line of [`name: ${VM}`, `containerDisk: file:${disk}`, "cpu: 1", "memory: 256Mi", "size: 64Mi", "runStrategy: Always"]) {
        assert.ok(yaml.includes(line), `the manifest preview shows ${line}:\n${yaml}`);
      }
      await page.screenshot({ path: join(screenshots, "02-wizard.png") });
      await page.click("#wizard-create");
      await page.waitForURL(new RegExp(`#/vm/default/${VM}$`), { timeout: 120000 });
    });

    await timed("Running", async () => {
      await page.locator("#vm-phase", { hasText: "Running" }).waitFor({ timeout: 120000 });
    });

    // The first VM imported the test disk: the wizard's image library offers it, and choosing it
    // by keyboard fills the image fields (no typing of the path). That VM is created stopped.
    await timed("create from the image library", async () => {
      await page.click('header.top a[href="#/create"]');
      await page.fill("#vm-name", FROM_LIBRARY);
      const choice = page.locator(`#image-library input[type=radio][value="file:${disk}"]`);
      await choice.waitFor();
      assert.equal(await page.locator("#vm-image").inputValue(), "", "the image field starts empty");
      await choice.focus();
      await page.keyboard.press("Space");
      assert.ok(await choice.isChecked(), "Space chooses the focused library entry");
      assert.equal(await page.locator("#vm-image-kind").inputValue(), "file");
      assert.equal(await page.locator("#vm-image").inputValue(), disk, "the library filled the image field");
      const entry = await page.locator("#image-library label.library-image", { has: page.locator(`input[value="file:${disk}"]`) }).innerText();
      assert.match(entry, /qcow2/, `the entry shows the format: ${entry}`);
      assert.match(entry, new RegExp(`used by default/${VM}`), `the entry shows the VM using it: ${entry}`);
      await page.screenshot({ path: join(screenshots, "02b-wizard-image-library.png") });
      await page.click("#wizard-next");
      await page.fill("#vm-memory", "256Mi");
      await page.uncheck("#vm-start");
      await page.click("#wizard-next");
      await page.click("#wizard-next");
      const yaml = await page.locator("#yaml-preview").innerText();
      for (const line of [`name: ${FROM_LIBRARY}`, `containerDisk: file:${disk}`, "runStrategy: Halted"]) {
        assert.ok(yaml.includes(line), `the manifest preview shows ${line}:\n${yaml}`);
      }
      await page.click("#wizard-create");
      await page.waitForURL(new RegExp(`#/vm/default/${FROM_LIBRARY}$`), { timeout: 120000 });
      await page.locator("#vm-phase", { hasText: "Stopped" }).waitFor({ timeout: 60000 });
      const headers = { Authorization: `Bearer ${serve.token}` };
      const images = await (await page.request.get(`${serve.base}/api/v1/images`, { headers })).json();
      assert.equal(images.items.length, 1, `both VMs share one stored disk: ${JSON.stringify(images.items)}`);
      assert.deepEqual([...images.items[0].usedBy].sort(), [`default/${FROM_LIBRARY}`, `default/${VM}`].sort());
      const removed = await page.request.delete(`${serve.base}/api/v1/vms/default/${FROM_LIBRARY}`, { headers });
      assert.equal(removed.status(), 204, "the VM from the library is deleted");
      await page.goto(`${serve.base}/ui/#/vm/default/${VM}`);
      await page.locator("#vm-phase", { hasText: "Running" }).waitFor();
    });

    // The serial console: the guest's banner, then a command through the shell.
    await timed("serial banner", async () => {
      await page.click("#open-serial");
      await page.locator('#serial-terminal[data-connected="true"]').waitFor();
      await waitFor("the ready banner on the serial console", 120000, async () => {
        const text = await serialText(page);
        return { done: text.includes(READY_BANNER), value: text.slice(-400) };
      });
      await typeInSerial(page, "echo web-$((6*7))");
      await waitFor("the shell's answer", 30000, async () => {
        const text = await serialText(page);
        return { done: text.includes("web-42"), value: text.slice(-400) };
      });
      await page.screenshot({ path: join(screenshots, "05-serial-console.png") });
    });

    // The screen through noVNC: the canvas shows something other than one colour.
    await timed("VNC screen not blank", async () => {
      await page.click('nav.tabs a:has-text("Screen")');
      await page.locator('#vnc-screen[data-connected="true"]').waitFor();
      const share = await waitFor("a non-blank VNC canvas", 60000, async () => {
        const value = await canvasLitShare(page);
        return { done: value.width > 0 && value.lit > 0.001 && value.colours > 1, value };
      });
      log(`VNC canvas ${share.width}x${share.height}, ${(share.lit * 100).toFixed(2)}% of pixels lit, ${share.colours} colours`);
      await page.screenshot({ path: join(screenshots, "04-console-vnc.png") });
      // Paste as keystrokes into the VGA console's shell (shifted characters included); the
      // serial console checks the result below.
      await page.click("details.paste summary");
      await page.fill("#paste-text", "echo PASTED-$((3*4)) > /tmp/pasted\n");
      await page.click("#paste-type");
      // Typing is paced; a user stays on the page until it is done (and the guest has read it).
      await page.locator("#paste-type:enabled", { hasText: "Type it" }).waitFor({ timeout: 30000 });
      await page.waitForTimeout(1000);
    });

    // The list, now with the VM and its thumbnail.
    await timed("list with thumbnail", async () => {
      await page.click('header.top a:has-text("Virtual machines")');
      const row = page.locator(`tr[data-vm="default/${VM}"]`);
      await row.locator("[data-phase=Running]").waitFor();
      await row.locator("img.thumbnail").waitFor({ timeout: 30000 });
      await page.screenshot({ path: join(screenshots, "03-list.png") });
      await row.locator("a.vm-name").click();
      await page.locator("#vm-phase", { hasText: "Running" }).waitFor();
    });

    await timed("pause and resume", async () => {
      await page.click("button[data-action=pause]");
      await page.locator("#vm-phase", { hasText: "Paused" }).waitFor({ timeout: 60000 });
      await page.click("button[data-action=unpause]");
      await page.locator("#vm-phase", { hasText: "Running" }).waitFor({ timeout: 60000 });
    });

    // A memory snapshot, a change in the guest, a restore: the change is gone.
    await timed("snapshot with memory", async () => {
      await page.fill("#snapshot-name", "before-change");
      await page.check("#snapshot-memory");
      await page.click("#snapshot-create");
      await page.locator('tr[data-snapshot="before-change"]').waitFor({ timeout: 120000 });
      await page.locator("#operation-progress:empty").waitFor({ state: "attached", timeout: 120000 });
      await page.screenshot({ path: join(screenshots, "06-detail.png"), fullPage: true });
    });
    await timed("change, then restore", async () => {
      await page.click("#open-serial");
      await page.locator('#serial-terminal[data-connected="true"]').waitFor();
      await typeInSerial(page, "cat /tmp/pasted");
      await waitFor("the line pasted through VNC", 30000, async () => {
        const text = await serialText(page);
        return { done: /^PASTED-12\s*$/m.test(text), value: text.slice(-300) };
      });
      await typeInSerial(page, "touch /tmp/after-snapshot && echo made-$((2+3))");
      await waitFor("the file made after the snapshot", 30000, async () => {
        const text = await serialText(page);
        return { done: text.includes("made-5"), value: text.slice(-300) };
      });
      await page.goBack();
      await page.locator('tr[data-snapshot="before-change"] button[data-action=restore]').click();
      await page.locator("dialog button", { hasText: "Restore" }).click();
      await page.locator(".toast", { hasText: "Restored before-change" }).waitFor({ timeout: 180000 });
      await page.locator("#vm-phase", { hasText: "Running" }).waitFor({ timeout: 120000 });
      await page.click("#open-serial");
      await page.locator('#serial-terminal[data-connected="true"]').waitFor();
      await typeInSerial(page, "test -e /tmp/after-snapshot && echo still-$((1+1)) || echo gone-$((1+1))");
      const answer = await waitFor("the restored guest's answer", 60000, async () => {
        const text = await serialText(page);
        const found = /(still|gone)-2/.exec(text);
        return { done: Boolean(found), value: found ? found[0] : text.slice(-300) };
      });
      assert.equal(answer, "gone-2", "after restoring the memory snapshot the file made later is gone");
      await page.goBack();
    });

    await timed("bulk stop and start from the list", async () => {
      await page.click('header.top a:has-text("Virtual machines")');
      const row = page.locator(`tr[data-vm="default/${VM}"]`);
      await row.locator("input[type=checkbox]").check();
      await page.click("#bulk-stop");
      await row.locator("[data-phase=Stopped]").waitFor({ timeout: 120000 });
      await row.locator("input[type=checkbox]").check();
      await page.click("#bulk-start");
      await row.locator("[data-phase=Running]").waitFor({ timeout: 120000 });
      await row.locator("a.vm-name").click();
      await page.locator("#vm-phase", { hasText: "Running" }).waitFor();
    });

    // Back up the running VM to the loopback registry from its detail page, watch the progress
    // bar end, see the backup listed, restore it as a new VM and see that one run.
    const registry = await startRegistry(join(scratch, "registry"));
    try {
      if (registry) {
        await timed("back up from the detail page", async () => {
          await page.fill("#backup-repository", `${registry.address}/backups/web`);
          await page.check("#backup-insecure");
          await page.click("#backup-submit");
          await page.locator('#operation-bar[data-phase="Running"], #operation-bar[data-phase="Succeeded"]').waitFor();
          await page.locator('#operation-bar[data-phase="Succeeded"]').waitFor({ timeout: 300000 });
          assert.equal(await page.locator("#operation-bar").getAttribute("value"), "100");
          await page.locator(`tr[data-backup^="${VM}-"]`).waitFor({ timeout: 30000 });
          assert.equal(await page.locator("#backups tbody tr").count(), 1, "exactly one backup is listed");
          await page.locator("#backups-section").scrollIntoViewIfNeeded();
          // The toast would cover the row's buttons (a screenshot's injected style breaks the CSP).
          await page.evaluate(() => document.querySelectorAll(".toast").forEach((toast) => toast.remove()));
          await page.screenshot({ path: join(screenshots, "backups.png"), fullPage: true });
        });
        await timed("restore as a new VM, Running", async () => {
          await page.locator(`tr[data-backup^="${VM}-"] button[data-action=restore-as]`).click();
          await page.fill("#restore-name", RESTORED);
          await page.locator("dialog button", { hasText: "Restore" }).click();
          await page.locator(".toast", { hasText: `default/${RESTORED} restored from` }).waitFor({ timeout: 300000 });
          await page.click('header.top a:has-text("Virtual machines")');
          await page.locator(`tr[data-vm="default/${RESTORED}"] [data-phase=Running]`).waitFor({ timeout: 120000 });
        });
        await timed("the Backups page lists the repository", async () => {
          await page.click('header.top a:has-text("Backups")');
          await page.locator(`#backups tr[data-backup^="${VM}-"]`).waitFor({ timeout: 30000 });
        });
        const removed = await page.request.delete(`${serve.base}/api/v1/vms/default/${RESTORED}?force=true`, { headers: { Authorization: `Bearer ${serve.token}` } });
        assert.equal(removed.status(), 204, "the restored VM is deleted");
        await page.goto(`${serve.base}/ui/#/vm/default/${VM}`);
        await page.locator("#vm-phase", { hasText: "Running" }).waitFor();
      }
    } finally {
      registry?.child.kill("SIGTERM");
    }

    await timed("delete", async () => {
      await page.click("#vm-delete");
      await page.check("#delete-snapshots");
      await page.fill("dialog input[type=text]", VM);
      await page.locator("dialog button", { hasText: "Delete VM" }).click();
      await page.waitForURL(/#\/$/, { timeout: 120000 });
      await page.locator(`tr[data-vm="default/${VM}"]`).waitFor({ state: "detached" });
      const response = await page.request.get(`${serve.base}/api/v1/vms/default/${VM}`, { headers: { Authorization: `Bearer ${serve.token}` } });
      assert.equal(response.status(), 404, "the VM is gone from the API");
      await page.screenshot({ path: join(screenshots, "07-list-after-delete.png") });
    });

    assert.deepEqual(policyViolations, [], "the Content-Security-Policy blocked nothing");
    assert.deepEqual(pageErrors, [], "no uncaught errors in the page");
  } catch (error) {
    const { readFileSync } = await import("node:fs");
    console.error(`--- paddock serve log (${serveLog}) ---\n${existsSync(serveLog) ? readFileSync(serveLog, "utf8").slice(-6000) : ""}`);
    if (policyViolations.length) console.error(`CSP violations: ${policyViolations.join("\n")}`);
    if (pageErrors.length) console.error(`page errors: ${pageErrors.join("\n")}`);
    throw error;
  } finally {
    await browser.close();
    // A failed run may leave the VM running; VMs outlive `paddock serve`, so delete it through
    // the API before stopping the server.
    for (const name of [VM, FROM_LIBRARY, RESTORED]) {
      await fetch(`${serve.base}/api/v1/vms/default/${name}?force=true`, { method: "DELETE", headers: { Authorization: `Bearer ${serve.token}` } }).catch(() => undefined);
    }
    serve.child.kill("SIGTERM");
    await new Promise((resolveExit) => {
      if (serve.child.exitCode !== null) resolveExit();
      else serve.child.on("exit", resolveExit);
    });
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
