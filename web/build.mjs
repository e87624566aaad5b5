// Builds paddock's web console into dist/ (or the directory given as the first argument):
// index.html, app.js, app.css, favicon.svg and THIRD-PARTY-LICENSES.txt. The build is
// deterministic (no hashes, timestamps or source maps), so hack/check-generated.sh can rebuild
// and compare it with the committed copy that crates/paddock-console embeds.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const outdir = resolve(process.argv[2] ?? join(here, "dist"));
rmSync(outdir, { recursive: true, force: true });
mkdirSync(outdir, { recursive: true });

await build({
  entryPoints: { app: join(here, "src/main.ts") },
  outdir,
  bundle: true,
  format: "esm",
  // noVNC uses top-level await; every browser the console supports runs ES2022 modules.
  target: "es2022",
  minify: true,
  legalComments: "none",
  sourcemap: false,
  charset: "utf8",
  logLevel: "warning",
});
copyFileSync(join(here, "src/index.html"), join(outdir, "index.html"));
copyFileSync(join(here, "src/favicon.svg"), join(outdir, "favicon.svg"));

// The bundle includes these packages: ship their licences with it.
const bundled = [
  ["@novnc/novnc", "LICENSE.txt"],
  ["@novnc/novnc", "docs/LICENSE.MPL-2.0"],
  ["@novnc/novnc", "vendor/pako/LICENSE", "pako (vendored in noVNC)"],
  ["@xterm/xterm", "LICENSE"],
  ["@xterm/addon-fit", "LICENSE"],
];
const notices = bundled.map(([name, file, title]) => {
  const manifest = JSON.parse(readFileSync(join(here, "node_modules", name, "package.json"), "utf8"));
  const text = readFileSync(join(here, "node_modules", name, file), "utf8");
  const heading = title ?? `${name} ${manifest.version} (${manifest.license})`;
  return `${heading}: ${file}\n${"=".repeat(72)}\n${text.trim()}\n`;
});
writeFileSync(join(outdir, "THIRD-PARTY-LICENSES.txt"), `Third-party software in paddock's web console\n\n${notices.join("\n\n")}`);
