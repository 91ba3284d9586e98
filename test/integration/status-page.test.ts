/**
 * The status page in a real browser (Debian's chromium through playwright-core), held to what
 * /readyz answers in every state an operator meets: a source failed (its password file is wrong),
 * one in backoff (its server is not there), the failed one recovered once the file is fixed (its
 * error then history), the buffer down and back, and every source streaming. In each, the
 * headline's words and colour must say what /readyz says; and the page must refresh by itself and
 * still be a plain table with JavaScript off. A screenshot of each state is kept in test-results/.
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium, type Browser, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startCluster, type Cluster } from '../support/cluster.js';
import { ITEMS_DDL, startLoad, waitForSlotActive } from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { freePort } from '../support/ports.js';
import { waitFor } from '../support/poll.js';

const CHROMIUM = ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => existsSync(p));
const ARTIFACTS = join(dirname(fileURLToPath(import.meta.url)), '../../test-results');

interface Readiness {
  status: number;
  body: {
    status: string;
    buffer: { state: string; problem?: string | null };
    sources: Array<{ source: string; state: string }>;
  };
}

describe.skipIf(CHROMIUM === undefined)('the status page in a browser', () => {
  let source: Cluster;
  let buffer: Cluster;
  let dir: string;
  let config: string;
  let passwordFile: string;
  let philotes: PhilotesProcess | undefined;
  let browser: Browser | undefined;
  let page: Page;
  let base = '';
  let load: ReturnType<typeof startLoad> | undefined;

  let nowherePort = 0;
  let generation = 0;
  /** What the config and password file say now; 'changed' once a test has fixed the file. */
  let fleetState: 'broken' | 'healthy' | 'changed' = 'broken';
  const writeConfig = (withNowhere: boolean) =>
    writeFileSync(
      config,
      [
        `buffer: { host: ${buffer.host}, port: ${buffer.port}, database: buffer, user: ${buffer.user}, passwordEnv: BUFFER_PASSWORD }`,
        // Quick retries and a short grace: each state is reached in seconds.
        'restartMinDelay: 200ms',
        'restartMaxDelay: 1s',
        'readinessGrace: 3s',
        'defaults: { checkpointInterval: 1s, snapshot: never }',
        'sources:',
        `  - { id: shop, host: ${source.host}, port: ${source.port}, database: shop, user: ${source.user}, passwordEnv: SOURCE_PASSWORD, slot: philotes_shop }`,
        // batchMaxRows changes with each broken fleet: a SIGHUP then restarts billing.
        `  - { id: billing, host: ${source.host}, port: ${source.port}, database: billing, user: ${source.user}, passwordFile: ${passwordFile}, slot: philotes_billing, batchMaxRows: ${1000 + generation} }`,
        ...(withNowhere
          ? [
              `  - { id: nowhere, host: 127.0.0.1, port: ${nowherePort}, database: app, user: ${source.user}, password: unused, slot: philotes_nowhere }`,
            ]
          : []),
      ].join('\n'),
    );

  const readiness = async (): Promise<Readiness> => {
    const res = await fetch(`${base}readyz`, { signal: AbortSignal.timeout(5_000) });
    return { status: res.status, body: (await res.json()) as Readiness['body'] };
  };
  const summary = async () => ({
    text: (await page.locator('#summary').textContent()) ?? '',
    tone: (await page.locator('#summary').getAttribute('class')) ?? '',
  });
  const stateOf = (id: string) =>
    page.locator(`tr[data-source="${id}"]`).getAttribute('data-state');

  /**
   * Puts the fleet in the state a test starts from, whichever test ran before it. Broken: billing
   * restarted with a wrong password in its file, and a source whose server is not there.
   * Healthy: the right password and no such source.
   */
  async function fleet(state: 'broken' | 'healthy'): Promise<void> {
    // Already broken (as started, or by the test before): a SIGHUP now would only restart
    // billing, and its fresh start would look healthy for the readiness grace.
    if (state !== fleetState) {
      if (state === 'broken') {
        writeFileSync(passwordFile, 'wrong-password\n');
        generation++;
        writeConfig(true);
      } else {
        writeFileSync(passwordFile, `${source.password}\n`);
        writeConfig(false);
      }
      philotes!.signal('SIGHUP');
      fleetState = state;
    }
    if (state === 'broken')
      await waitFor(async () => (await stateOf('billing')) === 'failed', {
        what: 'billing to fail on the wrong password',
        timeoutMs: 60_000,
      });
  }

  /**
   * The page and /readyz agree: the headline begins with /readyz's status, its colour is red
   * exactly when /readyz is 503, the title is the headline, and each row's state is /readyz's.
   * Read twice around the page's own reading, so that a state change in between is not taken
   * for a disagreement.
   */
  async function expectAgreement(): Promise<void> {
    await waitFor(
      async () => {
        const before = await readiness();
        await page.reload();
        const shown = await summary();
        const rows = await page
          .locator('#sources tbody tr')
          .evaluateAll((trs) =>
            trs.map((tr) => [tr.getAttribute('data-source'), tr.getAttribute('data-state')]),
          );
        const title = await page.title();
        const after = await readiness();
        const states = (r: Readiness) => r.body.sources.map((x) => `${x.source}=${x.state}`).join();
        if (states(before) !== states(after)) return false;
        if (before.status !== after.status || before.body.buffer.state !== after.body.buffer.state)
          return false;
        expect(shown.text.startsWith(`${after.body.status}:`), shown.text).toBe(true);
        expect(shown.tone === 'bad', `${shown.tone} for ${after.status}`).toBe(
          after.status === 503,
        );
        expect(title).toBe(`Philotes: ${shown.text}`);
        expect(rows).toEqual(after.body.sources.map((s) => [s.source, s.state]));
        if (after.body.buffer.state !== 'open')
          expect(shown.text).toContain(`buffer ${after.body.buffer.state}`);
        return true;
      },
      { what: 'the page and /readyz to be read in one state', timeoutMs: 30_000 },
    );
  }

  async function screenshot(name: string): Promise<void> {
    mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: join(ARTIFACTS, `status-page-${name}.png`), fullPage: true });
  }

  beforeAll(async () => {
    [source, buffer] = await Promise.all([startCluster(), startCluster()]);
    await buffer.createDatabase('buffer');
    for (const db of ['shop', 'billing']) {
      await source.createDatabase(db);
      await source.query(ITEMS_DDL, [], db);
    }
    dir = mkdtempSync(join(tmpdir(), 'philotes-page-'));
    config = join(dir, 'fleet.yaml');
    passwordFile = join(dir, 'billing-password');
    writeFileSync(passwordFile, 'wrong-password\n');
    nowherePort = await freePort();
    writeConfig(true);
    const port = await freePort();
    base = `http://127.0.0.1:${port}/`;
    philotes = startPhilotes(
      {
        BUFFER_PASSWORD: buffer.password,
        SOURCE_PASSWORD: source.password,
        PHILOTES_METRICS_PORT: String(port),
        PHILOTES_METRICS_HOST: '127.0.0.1',
      },
      { args: ['--config', config] },
    );
    await waitForSlotActive(source, 'philotes_shop');
    load = startLoad(source, { clients: 1, database: 'shop' });
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      // As root (CI), chromium refuses its sandbox.
      args: ['--no-sandbox', '--disable-dev-shm-usage'],
    });
    page = await browser.newPage();
    await page.goto(base);
  });

  afterAll(async () => {
    await load?.stop();
    await browser?.close();
    await philotes?.kill9();
    await Promise.allSettled([source?.destroy(), buffer?.destroy()]);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('a failed source and one in backoff: not ready, in red, with short errors that open to the whole text', async () => {
    await fleet('broken');
    // The page swaps its table in every 2 s: wait for what the fleet is doing by now.
    await waitFor(
      async () =>
        (await stateOf('billing')) === 'failed' &&
        (await stateOf('nowhere')) === 'backoff' &&
        (await stateOf('shop')) === 'streaming' &&
        Number(await page.locator('tr[data-source="shop"] td.events').textContent()) > 0 &&
        (await summary()).text.startsWith('not ready'),
      { what: 'shop streaming, billing failed, nowhere in backoff, not ready', timeoutMs: 60_000 },
    );
    await expectAgreement();
    expect((await summary()).text).toMatch(
      /^not ready: 1 of 3 sources streaming, 1 failed, 1 in backoff/,
    );
    const billing = page.locator('tr[data-source="billing"]');
    expect(await billing.locator('td.state').getAttribute('class')).toContain('bad');
    const nowhere = page.locator('tr[data-source="nowhere"]');
    expect(await nowhere.locator('td.state').getAttribute('class')).toContain('warn');
    expect(await nowhere.locator('td.state').textContent()).toMatch(/next attempt (in|now)/);
    // The backoff source's error names the server that is not there, as a source.
    expect(await nowhere.locator('td.error').textContent()).toMatch(
      /connection refused by source 127\.0\.0\.1:\d+/,
    );
    // The failed one: one short line, the whole message and its fix one click away.
    const error = billing.locator('td.error');
    expect(await error.getAttribute('class')).toContain('current');
    const short = (await error.locator('summary').textContent()) ?? '';
    expect(short).toMatch(/password/i);
    expect(short.length).toBeLessThan(180);
    expect(await error.locator('.whole').isVisible()).toBe(false);
    await error.locator('summary').click();
    expect(await error.locator('.whole').isVisible()).toBe(true);
    expect(await error.locator('.whole').textContent()).toMatch(/fix: /);
    // Opened, it stays open across the page's own refresh.
    const asOf = await page.locator('time').getAttribute('datetime');
    await waitFor(async () => (await page.locator('time').getAttribute('datetime')) !== asOf, {
      what: 'the page to refresh itself',
      timeoutMs: 15_000,
    });
    expect(await page.locator('tr[data-source="billing"] td.error .whole').isVisible()).toBe(true);
    // No secret on the page: not the wrong password the file holds, nor the right ones.
    const html = await page.content();
    for (const secret of ['wrong-password', source.password, buffer.password]) {
      expect(html).not.toContain(secret);
    }
    await screenshot('failed-and-backoff');
  });

  it('the password file fixed: the failed source streams again, and its error is shown as past', async () => {
    await fleet('broken');
    writeFileSync(passwordFile, `${source.password}\n`);
    fleetState = 'changed';
    await waitFor(async () => (await stateOf('billing')) === 'streaming', {
      what: 'billing to stream with the rotated password (no signal)',
      timeoutMs: 60_000,
    });
    const billing = page.locator('tr[data-source="billing"]');
    await waitFor(
      async () => (await billing.locator('td.error').getAttribute('class'))?.includes('past'),
      { what: "billing's error to be shown as past", timeoutMs: 15_000 },
    );
    expect(await billing.locator('td.error').textContent()).toMatch(/^before it streamed again: /);
    expect(Number(await billing.locator('td.restarts').textContent())).toBeGreaterThan(0);
    await expectAgreement();
  });

  it('the buffer down: said in the headline, the page, /readyz and philotes_buffer_up, until it is back', async () => {
    await buffer.stop();
    try {
      await waitFor(async () => (await readiness()).body.buffer.state === 'unreachable', {
        what: '/readyz to say the buffer is unreachable',
        timeoutMs: 60_000,
      });
      await expectAgreement();
      const { body } = await readiness();
      expect(body.buffer.problem).toContain(`${buffer.host}:${buffer.port}`);
      expect(await page.locator('#buffer').textContent()).toMatch(/^buffer unreachable: /);
      expect((await summary()).tone).not.toBe('ok');
      const metrics = await (await fetch(`${base}metrics`)).text();
      expect(metrics).toMatch(/^philotes_buffer_up 0$/m);
      await screenshot('buffer-down');
    } finally {
      await buffer.start();
    }
    await waitFor(
      async () =>
        (await readiness()).body.buffer.state === 'open' && (await stateOf('shop')) === 'streaming',
      { what: 'the buffer open again and shop streaming', timeoutMs: 60_000 },
    );
    expect(await (await fetch(`${base}metrics`)).text()).toMatch(/^philotes_buffer_up 1$/m);
  });

  it('every source streaming: ready, in green', async () => {
    await fleet('healthy');
    await waitFor(
      async () => {
        const r = await readiness();
        return r.status === 200 && r.body.sources.every((s) => s.state === 'streaming')
          ? r.body.sources.length === 2
          : false;
      },
      { what: 'the two remaining sources streaming and /readyz 200', timeoutMs: 60_000 },
    );
    await expectAgreement();
    expect(await summary()).toEqual({ text: 'ready: 2 of 2 sources streaming', tone: 'ok' });
    await screenshot('all-streaming');
  });

  it('is a plain table with JavaScript off', async () => {
    const context = await browser!.newContext({ javaScriptEnabled: false });
    const plain = await context.newPage();
    // Read between two /readyz answers that agree: a state may change while the page loads.
    const states = async () =>
      JSON.stringify((await readiness()).body.sources.map((s) => [s.source, s.state]));
    await waitFor(
      async () => {
        const before = await states();
        await plain.goto(base);
        const rows = await plain
          .locator('#sources tbody tr')
          .evaluateAll((trs) =>
            trs.map((tr) => [tr.getAttribute('data-source'), tr.getAttribute('data-state')]),
          );
        const after = await states();
        return before === after && JSON.stringify(rows) === after;
      },
      { what: 'the plain page to show the states /readyz gives', timeoutMs: 30_000 },
    );
    await context.close();
  });
});
