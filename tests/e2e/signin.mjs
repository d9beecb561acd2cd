// Signs one user in, in real headless Chromium (Debian's), and hands the session
// over to the test: after the IdP's login page, app 1 (one proxy) and app 2 (the
// other) each hold a session cookie, printed as one JSON line
//   {"app1": "<cookie value>", "app2": "<cookie value>"}
// so that the test can use the session from plain HTTP clients.
// Environment: APP1, APP2 (base URLs ending in /), ISSUER, USER. Exits 1 on failure.
import { chromium } from 'playwright-core';

const { APP1, APP2, ISSUER, USER } = process.env;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--host-resolver-rules=MAP *.vigil.test 127.0.0.1',
  ],
});
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  await page.goto(`${APP1}hello`);
  await page.waitForURL((u) => u.href.startsWith(ISSUER));
  await page.fill('input[name=login]', USER);
  await page.fill('input[name=password]', 'any password');
  await page.click('button[type=submit]');
  await page.waitForURL((u) => u.href === `${APP1}hello`);
  await page.goto(`${APP2}hello`);
  await page.waitForURL((u) => u.href === `${APP2}hello`);
  const value = async (url) =>
    (await context.cookies(url)).find((c) => c.name === '__Host-vigil_session')?.value;
  const out = { app1: await value(APP1), app2: await value(APP2) };
  if (!out.app1 || !out.app2) {
    console.error(`FAIL: no session cookie on ${out.app1 ? 'app 2' : 'app 1'}`);
    process.exit(1);
  }
  console.log(JSON.stringify(out));
} catch (e) {
  console.error(`FAIL: ${e}`);
  process.exit(1);
} finally {
  await browser.close();
}
