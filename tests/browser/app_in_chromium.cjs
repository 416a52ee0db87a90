// Drives the Gradio app in Debian's Chromium (headless) through playwright-core: upload an image, ask,
// ask a follow-up, save a screenshot. Prints one JSON line with what the page showed.
//
//   NODE_PATH=build/browser/node_modules node tests/browser/app_in_chromium.cjs URL IMAGE SCREENSHOT
//
// Requests to anything but the app's own host are blocked and reported: the app must work offline.
const fs = require("fs");
const os = require("os");
const path = require("path");
const { chromium } = require("playwright-core");

const [url, imagePath, screenshotPath] = process.argv.slice(2);
const appHost = new URL(url).host;

(async () => {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "vma-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    viewport: { width: 1280, height: 900 },
  });
  const externalRequests = [];
  await context.route("**/*", (route) => {
    const requestUrl = new URL(route.request().url());
    if (requestUrl.protocol.startsWith("http") && requestUrl.host !== appHost) {
      externalRequests.push(requestUrl.origin);
      return route.abort();
    }
    return route.continue();
  });
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(90000);
    await page.goto(url, { waitUntil: "domcontentloaded" });
    await page.locator("#upload input[type=file]").setInputFiles(imagePath);
    await page.locator("#panel").getByText("Expert: radiology").waitFor();
    const bot = page.locator('#chat [data-testid="bot"]');

    const ask = async (question, expectedReplies) => {
      await page.locator("#question textarea").fill(question);
      await page.locator("#ask").click();
      await bot.nth(expectedReplies - 1).waitFor();
      // Done when the panel counts the finished turn (it changes only with the stream's final update).
      await page.locator("#panel").getByText(`Turns so far: ${expectedReplies}`).waitFor();
      return (await bot.nth(expectedReplies - 1).innerText()).trim();
    };
    const firstAnswer = await ask("What abnormality is seen?", 1);
    const followUpAnswer = await ask("Which side is affected?", 2);
    await page.screenshot({ path: screenshotPath, fullPage: true });
    const result = {
      firstAnswer,
      followUpAnswer,
      userMessages: await page.locator('#chat [data-testid="user"]').allInnerTexts(),
      panel: await page.locator("#panel").innerText(),
      externalRequests: [...new Set(externalRequests)],
    };
    console.log(JSON.stringify(result));
  } finally {
    await context.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
})().catch((error) => {
  console.error(`browser test failed: ${error.message}`);
  process.exit(1);
});
