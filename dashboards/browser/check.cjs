// Drives the collector's dashboard in headless Chromium and prints what it saw as
// JSON on stdout; the Rust test (cli/tests/dashboards.rs) makes the assertions.
// Env: PLAYWRIGHT_CORE (path to the playwright-core package), DASHBOARD_URL,
// SCREENSHOT_DIR, CHROMIUM (default /usr/bin/chromium), ROUTE, EMPTY_ROUTE.
"use strict";
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const url = process.env.DASHBOARD_URL;
const shots = process.env.SCREENSHOT_DIR;
const route = process.env.ROUTE || "orders";
const emptyRoute = process.env.EMPTY_ROUTE || "no-such-route";

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  const out = { errors: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.on("pageerror", (e) => out.errors.push("pageerror: " + e.message));
    page.on("console", (m) => m.type() === "error" && out.errors.push("console: " + m.text()));
    page.on("requestfailed", (r) => out.errors.push("requestfailed: " + r.url()));

    // Overview
    await page.goto(url + "/#/");
    await page.waitForSelector("#routes tbody tr[data-route]", { timeout: 15000 });
    await page.waitForSelector("#burndown canvas", { timeout: 15000 });
    out.overview = await page.$$eval("#routes tbody tr", (trs) =>
      trs.map((tr) => ({
        route: tr.dataset.route,
        cells: Object.fromEntries(
          [...tr.querySelectorAll("td[data-col]")].map((td) => [td.dataset.col, td.textContent.replace(/\s+/g, " ").trim()]),
        ),
        sparkline: !!tr.querySelector("svg.spark polyline"),
      })),
    );
    out.burndownPoints = Number(await page.getAttribute("#burndown", "data-points-legacy"));
    out.legacyEndpoints = await page.$$eval("#legacy-endpoints tbody tr", (trs) =>
      trs.map((tr) => [...tr.querySelectorAll("td")].map((td) => td.textContent.replace(/\s+/g, " ").trim()).join(" | ")),
    );
    // Sorting: by requests, descending on the first click.
    await page.click('th[data-key="requests"]');
    out.sortedByRequests = await page.$$eval("#routes tbody tr", (trs) => trs.map((tr) => tr.dataset.route));
    await page.screenshot({ path: shots + "/overview.png", fullPage: true });

    // Route page
    await page.click(`a[href="#/route/${route}"]`);
    await page.waitForSelector("#c-latency canvas", { timeout: 15000 });
    await page.waitForTimeout(300);
    out.route = {
      charts: await page.$$eval(".chart", (els) =>
        els.map((e) => ({
          id: e.id,
          points: Object.fromEntries(
            [...e.attributes].filter((a) => a.name.startsWith("data-points-")).map((a) => [a.name.slice(12), Number(a.value)]),
          ),
          markers: [...e.querySelectorAll(".marker")].map((m) => m.textContent.trim()),
          legend: [...e.querySelectorAll(".u-legend .u-series .u-label")].map((l) => l.textContent.trim()),
        })),
      ),
      sides: await page.$$eval("#sides tbody tr", (trs) => trs.map((tr) => tr.textContent.replace(/\s+/g, " ").trim())),
      matchRate: (await page.textContent("#match-rate")).trim(),
      diffPaths: await page.$$eval("#diff-paths tbody tr", (trs) => trs.map((tr) => tr.textContent.replace(/\s+/g, " ").trim())),
      samples: await page.$$eval(".sample", (els) => els.map((e) => [...e.querySelectorAll("pre")].map((p) => p.textContent))),
      marked: await page.$$eval(".sample", (els) => els.map((e) => [...e.querySelectorAll("pre")].map((p) => [...p.querySelectorAll("mark.diff")].map((m) => m.textContent)))),
      differences: await page.$$eval(".sample ul.differences li", (lis) => lis.map((li) => li.textContent.trim())),
      changes: await page.$$eval("#changes tbody tr", (trs) => trs.map((tr) => tr.textContent.replace(/\s+/g, " ").trim())),
    };
    await page.screenshot({ path: shots + "/route.png", fullPage: true });

    // Trace page, from the first sample's link
    await page.click(".sample a[href^='#/trace/']");
    await page.waitForSelector("#waterfall .row", { timeout: 15000 });
    out.trace = await page.$$eval("#waterfall .row", (rows) =>
      rows.map((r) => ({ label: r.querySelector(".label").textContent.trim(), width: r.querySelector(".span").style.width })),
    );
    await page.screenshot({ path: shots + "/trace.png", fullPage: true });

    // A route with no data reads as such
    await page.goto(url + "/#/route/" + emptyRoute);
    await page.waitForSelector("#no-traffic", { timeout: 15000 });
    out.emptyRoute = (await page.textContent("#no-traffic")).trim();
    out.emptyCharts = await page.$$eval(".chart .empty", (els) => els.length);

    // Narrow screen: nothing wider than the viewport
    const phone = await browser.newPage({ viewport: { width: 390, height: 844 } });
    phone.on("pageerror", (e) => out.errors.push("pageerror (narrow): " + e.message));
    await phone.goto(url + "/#/route/" + route);
    await phone.waitForSelector("#c-latency canvas", { timeout: 15000 });
    out.narrow = {
      scrollWidth: await phone.evaluate(() => document.documentElement.scrollWidth),
      width: 390,
      // What sticks out, if anything (for the failure message).
      offenders: await phone.evaluate(() =>
        [...document.querySelectorAll("body *")]
          .filter((e) => e.getBoundingClientRect().right > 391 && !e.closest(".scroll"))
          .slice(0, 5)
          .map((e) => `${e.tagName}.${e.className} ${Math.round(e.getBoundingClientRect().right)}`),
      ),
    };
    await phone.screenshot({ path: shots + "/route-narrow.png", fullPage: true });
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => {
  process.stderr.write(String(e && e.stack ? e.stack : e) + "\n");
  process.exit(1);
});
