// The browser sign-in flow in real headless Chromium (Debian's), driven by
// playwright-core. Two route hosts behind two different proxies, one identity
// provider:
//   1. an unauthenticated visit to app 1 lands on the IdP's login page;
//   2. after the password, the browser is back on app 1 with a session (the
//      upstream sees the user), and the handoff code cannot be used again;
//   3. app 2, behind the other proxy, gets its session with no password; a
//      link to sign-out from another site only asks;
//   4. sign-out on app 1 ends up on the authenticate host's page;
//   5. app 1 and then app 2 (after the revocation reaches its proxy) send the
//      browser back to the IdP.
// Environment: APP1, APP2 (base URLs ending in /), AUTH (the authenticate URL),
// ISSUER, USER. Prints one line per step; exits 1 on the first failure.
import { chromium } from 'playwright-core';

const { APP1, APP2, AUTH, ISSUER, USER } = process.env;
const started = Date.now();
const log = (m) => console.log(`[${((Date.now() - started) / 1000).toFixed(2)}s] ${m}`);
function check(ok, what) {
  if (!ok) {
    console.error(`FAIL: ${what}`);
    process.exit(1);
  }
  log(`ok: ${what}`);
}

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
    // Every test host name is this machine.
    '--host-resolver-rules=MAP *.vigil.test 127.0.0.1',
  ],
});
try {
  // The proxies' certificates come from the test's own CA.
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  const seen = [];
  page.on('request', (r) => {
    if (r.isNavigationRequest()) seen.push(r.url());
  });
  const wentToIdp = () => seen.some((u) => u.startsWith(`${ISSUER}/auth`));
  const upstreamSaw = async () => JSON.parse(await page.textContent('body'));

  // 1. Unauthenticated: to the IdP's login page, through the authenticate host.
  await page.goto(`${APP1}hello?x=1`);
  await page.waitForURL((u) => u.href.startsWith(ISSUER));
  check(seen.some((u) => u.startsWith(`${AUTH}/.vigil/sign_in?`)), 'app 1 sent the browser to the authenticate host');
  check(wentToIdp(), 'the authenticate host sent the browser to the IdP');
  await page.fill('input[name=login]', USER);
  await page.fill('input[name=password]', 'any password');
  await page.click('button[type=submit]');

  // 2. Back on app 1, signed in.
  await page.waitForURL((u) => u.href === `${APP1}hello?x=1`);
  const one = await upstreamSaw();
  check(one.target === '/hello?x=1', `app 1's upstream got the page asked for (${one.target})`);
  const user = one.headers['x-vigil-user'];
  check(typeof user === 'string' && user.startsWith('usr_'), `app 1's upstream saw user ${user}`);
  check(one.headers['x-vigil-email'] === undefined || one.headers['x-vigil-email'] === `${USER}@example.com`, 'the email, if sent, is the IdP\'s');
  check(!(one.headers.cookie || '').includes('vigil_session'), 'the session cookie never reaches the upstream');
  const handoff = seen.find((u) => u.startsWith(`${APP1}.vigil/handoff?`));
  check(Boolean(handoff), 'the session came to app 1 by a handoff code');
  const replay = await page.goto(handoff);
  check(replay.status() === 400, `a handoff code works once (again: ${replay.status()})`);
  const elsewhere = await page.goto(handoff.replace(APP1, APP2));
  check(elsewhere.status() === 400, `a handoff code works on its own host only (${elsewhere.status()})`);

  // 3. App 2, behind the other proxy: a session without the password.
  seen.length = 0;
  await page.goto(`${APP2}two`);
  await page.waitForURL((u) => u.href === `${APP2}two`);
  const two = await upstreamSaw();
  check(two.headers['x-vigil-user'] === user, 'app 2 knows the same user');
  check(!wentToIdp(), 'app 2 signed in without the IdP');

  // 3b. Another site (the IdP's origin stands in for one) links to app 1's
  // sign-out: Chromium says `Sec-Fetch-Site: cross-site`, and Vigil asks
  // first instead of ending the session.
  await page.goto(`${ISSUER}/.well-known/openid-configuration`);
  await Promise.all([
    page.waitForNavigation(),
    page.evaluate((u) => { window.location.href = u; }, `${APP1}.vigil/sign_out`),
  ]);
  check(
    page.url() === `${APP1}.vigil/sign_out` && (await page.textContent('h1')) === 'Sign out?',
    `a cross-site link to sign-out only asks (${page.url()})`,
  );
  seen.length = 0;
  await page.goto(`${APP1}still`);
  await page.waitForURL((u) => u.href === `${APP1}still`);
  check(!seen.some((u) => u.includes('/.vigil/sign_in')), 'the session survived the cross-site link');

  // 4. Sign out on app 1: the authenticate host's page.
  const kept = (await context.cookies(APP1)).find((c) => c.name === '__Host-vigil_session');
  check(Boolean(kept), 'app 1 holds a session cookie');
  // The authenticate host ends the session at the IdP too (RP-Initiated
  // Logout): the IdP asks, and sends the browser back to Vigil's page.
  seen.length = 0;
  await page.goto(`${APP1}.vigil/sign_out`);
  await page.waitForURL((u) => u.href.startsWith(ISSUER));
  check(
    seen.some((u) => u.startsWith(`${AUTH}/.vigil/sign_out`)),
    'app 1 sent the browser to the authenticate host to sign out',
  );
  const endSession = seen.find((u) => u.startsWith(ISSUER));
  check(
    endSession.includes('post_logout_redirect_uri=') && endSession.includes('client_id='),
    `the IdP was asked to end its session: ${endSession}`,
  );
  await page.click('button[name=logout][value=yes]');
  await page.waitForURL((u) => u.href.startsWith(`${AUTH}/.vigil/signed_out`));
  check((await page.textContent('h1')) === 'Signed out', 'signed out');

  // 5. Neither app accepts the session any more: each sends the browser to sign
  // in again (whether the IdP then asks for a password is the IdP's own session).
  const sentToSignIn = () => seen.some((u) => u.startsWith(`${AUTH}/.vigil/sign_in?`));
  const t0 = Date.now();
  let revoked = false;
  while (!revoked && Date.now() - t0 < 15000) {
    seen.length = 0;
    await page.goto(`${APP2}two`).catch(() => {});
    revoked = sentToSignIn();
    if (!revoked) await new Promise((r) => setTimeout(r, 100));
  }
  check(revoked, `app 2 (the other proxy) refused the session ${Date.now() - t0} ms after sign-out`);
  // The old cookie, put back as a thief would, is refused too.
  await context.addCookies([
    { name: kept.name, value: kept.value, url: APP1, secure: true, httpOnly: true, sameSite: 'Lax' },
  ]);
  seen.length = 0;
  await page.goto(`${APP1}hello`).catch(() => {});
  check(sentToSignIn(), "app 1 refuses the signed-out session's cookie");
  // 6. The IdP's own session ended too: signing in again asks for the password.
  // (Without that, the IdP would sign the browser straight back into app 1.)
  await page.waitForSelector('input[name=login]', { timeout: 10000 });
  check(page.url().startsWith(ISSUER), `the IdP asks for the password again (${page.url()})`);
  log('PASS');
} finally {
  await browser.close();
}
