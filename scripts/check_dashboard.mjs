// The dashboard in headless Chromium (puppeteer-core, driving the machine's chromium) against a
// server with a real job: the jobs list, a job page whose state turns from queued to succeeded
// without a reload (the SSE stream) with its epoch curves and per-layer charts drawn, the
// models pages; no console errors. Screenshots of each page go to target/dashboard/.
// Run by scripts/check_dashboard.sh, which starts the server and the worker.
import puppeteer from "puppeteer-core";
import { writeFileSync, mkdirSync } from "node:fs";
import { execFileSync } from "node:child_process";

const [url, jobId, modelId, startWorker, apiKey] = process.argv.slice(2);
const shots = process.env.SHOTS || "target/dashboard";
mkdirSync(shots, { recursive: true });
const errors = [];
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  headless: true,
});
const page = await browser.newPage();
await page.setViewport({ width: 1366, height: 900 });
let keyEntered = false; // before the key is entered, the 401s are expected
page.on("console", (m) => {
  if (m.type() === "error" && !(m.text().includes("401") && !keyEntered)) errors.push(`console: ${m.text()}`);
});
page.on("pageerror", (e) => errors.push(`page: ${e.message}`));
page.on("requestfailed", (r) => { if (!r.url().includes("/events")) errors.push(`request failed: ${r.url()}`); });

const step = async (name, f) => {
  try { await f(); console.log(`ok   ${name}`); }
  catch (e) { errors.push(`${name}: ${e.message}`); console.log(`FAIL ${name}: ${e.message}`); }
  await page.screenshot({ path: `${shots}/${name.replace(/\W+/g, "-")}.png`, fullPage: true });
};

await step("without a key the dashboard asks for one", async () => {
  await page.goto(`${url}/#/jobs`, { waitUntil: "networkidle2" });
  await page.waitForFunction(() => document.body.innerText.includes("needs an API key"), { timeout: 10000 });
  await page.type("#api-key", apiKey);
  keyEntered = true;
  await page.click("#key-form button");
});

await step("jobs list shows the queued job", async () => {
  await page.waitForFunction((id) => document.body.innerText.includes(id.slice(0, 8)) &&
    document.body.innerText.includes("queued"), { timeout: 10000 }, jobId);
});

await step("job page turns succeeded live", async () => {
  await page.goto(`${url}/#/jobs/${jobId}`, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => (document.getElementById("job-state") || {}).innerText === "queued", { timeout: 10000 });
  // Only now does a worker start: the page must follow without a reload.
  execFileSync("sh", ["-c", startWorker]);
  await page.waitForFunction(() => (document.getElementById("job-state") || {}).innerText === "succeeded", { timeout: 60000 });
});

await step("epoch curves and per-layer charts are drawn", async () => {
  await page.waitForSelector("#epoch-chart canvas", { timeout: 10000 });
  await page.waitForSelector(".layer-chart canvas", { timeout: 10000 });
  const text = await page.evaluate(() => document.body.innerText);
  for (const want of ["compression ratio", "accuracy", "download"]) {
    if (!text.includes(want)) throw new Error(`missing "${want}"`);
  }
});

await step("models list and model page", async () => {
  await page.goto(`${url}/#/models`, { waitUntil: "networkidle2" });
  await page.waitForFunction(() => document.querySelectorAll("main table tbody tr").length >= 2, { timeout: 10000 });
  await page.goto(`${url}/#/models/${modelId}`, { waitUntil: "networkidle2" });
  await page.waitForFunction(() => document.body.innerText.includes("fc1.weight") && document.body.innerText.includes("Jobs on this model"), { timeout: 10000 });
});

await step("datasets list", async () => {
  await page.goto(`${url}/#/datasets`, { waitUntil: "networkidle2" });
  await page.waitForFunction(() => document.body.innerText.includes("csv"), { timeout: 10000 });
});

await browser.close();
writeFileSync(`${shots}/errors.txt`, errors.join("\n"));
if (errors.length) { console.error(errors.join("\n")); process.exit(1); }
console.log(`dashboard ok; screenshots in ${shots}/`);
