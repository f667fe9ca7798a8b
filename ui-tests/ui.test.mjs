// The operator page in headless Chromium, driven by Playwright. cli/tests/it/ui.rs starts the
// server and the stores and runs this with their names in the environment; the last line printed
// is a JSON report of what was seen, which that test checks as well.
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const BASE = env("BASE_URL");
const TOKEN = env("OPERATOR_TOKEN");
const [A, B, OFFLINE] = [env("STORE_A"), env("STORE_B"), env("STORE_OFFLINE")];
const SHOTS = env("SCREENSHOT_DIR");
const HOSTILE = env("HOSTILE_TEXT");
mkdirSync(SHOTS, { recursive: true });

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok: ${what}`);
}

const report = { dialogs: 0 };

/** Every form control on the page has a label, so a screen reader names it. */
async function checkLabelled(page, view) {
  const unlabelled = await page.evaluate(() => [...document.querySelectorAll("input, select, textarea, button")]
    .filter((c) => c.offsetParent !== null)
    .filter((c) => !(c.labels && c.labels.length) && !c.getAttribute("aria-label") && !(c.tagName === "BUTTON" && c.textContent.trim()))
    .map((c) => c.outerHTML));
  check(unlabelled.length === 0, `every control of the ${view} view is labelled ${unlabelled.join(" ")}`);
}
/**
 * Chromium, on a fresh profile. A browser that dies while starting (it has crashed with SIGSEGV at
 * launch on this shared machine under load) is started again, at most three times in all: the page is
 * what this test is about, not the browser's start-up.
 */
async function launch() {
  for (let attempt = 1; ; attempt += 1) {
    const profile = mkdtempSync(join(process.env.WORK_DIR || tmpdir(), "chromium-profile-"));
    try {
      return await chromium.launchPersistentContext(profile, {
        executablePath: env("CHROMIUM"),
        headless: true,
        acceptDownloads: true,
        viewport: { width: 1280, height: 800 },
        args: [
          "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
        ],
      });
    } catch (e) {
      if (attempt >= 3) throw e;
      console.log(`chromium did not start (attempt ${attempt}): ${String(e.message).split("\n")[0]}`);
    }
  }
}
const context = await launch();
const page = context.pages()[0] || (await context.newPage());
page.setDefaultTimeout(60_000);
page.on("dialog", async (d) => { report.dialogs += 1; await d.dismiss(); });
page.on("pageerror", (e) => console.log(`page error: ${e.message}`));

try {
  // Sign in with the keyboard alone: type the token, Tab to the button, Enter.
  await page.goto(`${BASE}/ui`);
  await checkLabelled(page, "sign-in");
  await page.getByLabel("Operator token").focus();
  await page.keyboard.insertText(TOKEN);
  await page.keyboard.press("Tab");
  check(await page.evaluate(() => document.activeElement.textContent === "Sign in"), "Tab reaches the sign-in button");
  await page.keyboard.press("Enter");
  await page.locator(`tr[data-store="${A}"]`).waitFor();
  await checkLabelled(page, "stores");
  const cookies = await context.cookies(BASE);
  const session = cookies.find((c) => c.name === "backhaul_session");
  check(session && session.httpOnly && session.sameSite === "Strict", "the session cookie is HttpOnly and SameSite=Strict");
  check(!cookies.some((c) => c.value.includes(TOKEN)), "no cookie holds the token");
  check(!(await page.evaluate(() => JSON.stringify(localStorage) + JSON.stringify(sessionStorage))).includes(TOKEN),
    "the token is in no web storage");
  check(!page.url().includes(TOKEN), "the token is in no URL");

  // Two stores connected, one offline.
  const connection = async (id) => (await page.locator(`tr[data-store="${id}"] td`).nth(1).innerText()).trim();
  check((await connection(A)) === "connected", `${A} is shown connected`);
  check((await connection(B)) === "connected", `${B} is shown connected`);
  check((await connection(OFFLINE)) === "offline", `${OFFLINE} is shown offline`);
  check((await page.locator("tbody tr[data-store]").count()) === 3, "three stores are listed");
  await page.screenshot({ path: join(SHOTS, "stores.png") });

  // The filters run on the server: an id glob, then the connection.
  await page.getByLabel("Id glob").fill(A);
  await page.locator("p.muted", { hasText: "1 store matches" }).waitFor();
  check((await page.locator("tbody tr[data-store]").count()) === 1, "the id glob keeps one store");
  await page.getByLabel("Id glob").fill("");
  await page.getByLabel("Connection").selectOption("false");
  await page.locator("p.muted", { hasText: "1 store matches, 0 connected" }).waitFor();
  check((await page.locator(`tr[data-store="${OFFLINE}"]`).count()) === 1, "offline only keeps the offline store");
  await page.getByLabel("Connection").selectOption("");

  // Pull a file from A and watch it complete, without reloading.
  await page.getByRole("link", { name: A }).click();
  await page.getByRole("heading", { name: `Store ${A}` }).waitFor();
  await checkLabelled(page, "store");
  await page.evaluate(() => { window.notReloaded = true; });
  const seen = new Set();
  await page.getByRole("button", { name: "Pull now" }).click();
  const live = page.locator(".upload-live");
  await live.waitFor();
  report.partial_progress_seen = false;
  for (;;) {
    const st = await live.getAttribute("data-state");
    seen.add(st);
    const bar = live.locator("progress");
    if (st === "uploading" && (await bar.count()) === 1) {
      const [value, max] = [Number(await bar.getAttribute("value")), Number(await bar.getAttribute("max"))];
      if (value > 0 && value < max) report.partial_progress_seen = true;
    }
    if (["completed", "failed", "cancelled"].includes(st)) break;
    await page.waitForTimeout(100);
  }
  check(report.partial_progress_seen, "the progress bar showed the upload part-way");
  check(seen.has("completed"), `the upload reached completed (states seen: ${[...seen].join(", ")})`);
  check(await page.evaluate(() => window.notReloaded === true), "the page was not reloaded");
  const row = page.locator("tr[data-state=completed] a.download").first();
  await row.waitFor();
  await page.screenshot({ path: join(SHOTS, "store.png") });

  // Download it through the page's link: the server answers with a presigned GET.
  const href = await row.getAttribute("href");
  const resp = await page.request.get(new URL(href, BASE).toString());
  check(resp.ok(), `the download link answered ${resp.status()}`);
  report.downloaded_sha256 = createHash("sha256").update(await resp.body()).digest("hex");
  check(report.downloaded_sha256 === env("FILE_SHA256"), "the downloaded file has the store's SHA-256");

  // A collection over the fleet's label: the preview counts it, the summary settles.
  await page.getByRole("link", { name: "Collections" }).click();
  await page.getByLabel("Target").waitFor();
  await checkLabelled(page, "collections");
  await page.getByLabel("Target").selectOption("labels");
  await page.getByLabel("Matching").fill(env("FLEET_LABEL"));
  await page.locator(".preview", { hasText: "Matches 3 stores now: 2 connected, 1 offline." }).waitFor();
  check(true, "the preview shows 3 stores, 2 connected");
  await page.getByRole("button", { name: "Create" }).click();
  const summary = page.locator(".collection-summary");
  await page.locator('.collection-summary[data-completed="2"][data-matched="3"]').waitFor();
  const counts = await summary.locator(".counts").innerText();
  check(/completed 2/.test(counts) && /pending 1/.test(counts), `the summary counts 2 completed, 1 pending (${counts})`);
  await page.screenshot({ path: join(SHOTS, "collection.png") });
  const [download] = await Promise.all([
    page.waitForEvent("download"),
    page.getByRole("link", { name: "Download manifest (JSON)" }).click(),
  ]);
  const manifest = JSON.parse(readFileSync(await download.path(), "utf8"));
  report.manifest_entries = manifest.entries.length;
  check(manifest.entries.map((e) => e.client_id).sort().join() === [A, B].sort().join(), "the manifest lists the two completed stores");

  await page.getByRole("link", { name: "Schedules" }).click();
  await page.getByLabel("Cron").waitFor();
  await checkLabelled(page, "schedules");

  // A store's hostile error message is shown as text, and runs nothing.
  await page.goto(`${BASE}/ui#/store/${OFFLINE}`);
  const error = page.locator("tr[data-state=failed] td.error").first();
  await error.waitFor();
  check((await error.innerText()).includes(HOSTILE), "the error message is shown literally");
  check((await page.locator("main img").count()) === 0, "no image element was made from it");
  await page.waitForTimeout(500);
  check(report.dialogs === 0, "no script ran (no dialog)");

  // Requests without the cookie, or with a missing or forged CSRF token, are refused.
  const anonymous = await chromium.launch({ executablePath: env("CHROMIUM"), args: ["--no-sandbox", "--headless", "--disable-gpu"] });
  const stranger = await anonymous.newContext();
  report.no_cookie_status = (await stranger.request.get(`${BASE}/stores`)).status();
  await anonymous.close();
  check(report.no_cookie_status === 401, "a request without the cookie gets 401");
  const post = (headers) => page.evaluate(async ([url, h]) => (await fetch(url, { method: "POST", headers: h })).status,
    [`${BASE}/trigger-download/${B}`, headers]);
  report.no_csrf_status = await post({});
  report.forged_csrf_status = await post({ "x-csrf-token": "forged-token-value" });
  check(report.no_csrf_status === 403, "a POST without the CSRF token gets 403");
  check(report.forged_csrf_status === 403, "a POST with a forged CSRF token gets 403");

  // Sign out: the cookie no longer works.
  await page.goto(`${BASE}/ui`);
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByLabel("Operator token").waitFor();
  report.after_sign_out_status = await page.evaluate(async (url) => (await fetch(url)).status, `${BASE}/stores`);
  check(report.after_sign_out_status === 401, "after signing out, the API refuses the browser");
} finally {
  await context.close();
}
console.log(JSON.stringify(report));
