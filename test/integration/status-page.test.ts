/**
 * The status page in a real browser (Debian's chromium through playwright-core): a fleet of two
 * sources from a file, one streaming under load and one failed (its password is wrong). The page
 * must show each with its state, the failed one with its error, refresh by itself, and still be a
 * plain table with JavaScript off. A screenshot is kept in test-results/ as an artifact.
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium, type Browser } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startCluster, type Cluster } from '../support/cluster.js';
import { ITEMS_DDL, startLoad, waitForSlotActive } from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { freePort } from '../support/ports.js';
import { waitFor } from '../support/poll.js';

const CHROMIUM = ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => existsSync(p));
const ARTIFACTS = join(dirname(fileURLToPath(import.meta.url)), '../../test-results');

describe.skipIf(CHROMIUM === undefined)('the status page in a browser', () => {
  let source: Cluster;
  let buffer: Cluster;
  let dir: string;
  let philotes: PhilotesProcess | undefined;
  let browser: Browser | undefined;
  let url = '';
  let load: ReturnType<typeof startLoad> | undefined;

  beforeAll(async () => {
    [source, buffer] = await Promise.all([startCluster(), startCluster()]);
    await buffer.createDatabase('buffer');
    await source.createDatabase('shop');
    await source.query(ITEMS_DDL, [], 'shop');
    await source.createDatabase('billing');
    dir = mkdtempSync(join(tmpdir(), 'philotes-page-'));
    const config = join(dir, 'fleet.yaml');
    writeFileSync(
      config,
      [
        `buffer: { host: ${buffer.host}, port: ${buffer.port}, database: buffer, user: ${buffer.user}, passwordEnv: BUFFER_PASSWORD }`,
        'defaults: { checkpointInterval: 1s, snapshot: never }',
        'sources:',
        `  - { id: shop, host: ${source.host}, port: ${source.port}, database: shop, user: ${source.user}, passwordEnv: SOURCE_PASSWORD, slot: philotes_shop }`,
        `  - { id: billing, host: ${source.host}, port: ${source.port}, database: billing, user: ${source.user}, password: wrong-password, slot: philotes_billing }`,
      ].join('\n'),
    );
    const port = await freePort();
    url = `http://127.0.0.1:${port}/`;
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
  });

  afterAll(async () => {
    await load?.stop();
    await browser?.close();
    await philotes?.kill9();
    await Promise.allSettled([source?.destroy(), buffer?.destroy()]);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('shows every source with its state, the failed one with its error, and refreshes by itself', async () => {
    const page = await browser!.newPage();
    await page.goto(url);
    // The page swaps its table in every 2 s: wait for what the fleet is doing by now.
    await waitFor(
      async () =>
        (await page.locator('tr[data-source="billing"]').getAttribute('data-state')) === 'failed' &&
        (await page.locator('tr[data-source="shop"]').getAttribute('data-state')) === 'streaming' &&
        Number(await page.locator('tr[data-source="shop"] td.events').textContent()) > 0 &&
        /B/.test((await page.locator('tr[data-source="shop"] td.lag').textContent()) ?? ''),
      {
        what: 'the page to show shop streaming with events and its lag, and billing failed',
        timeoutMs: 60_000,
      },
    );
    const billing = page.locator('tr[data-source="billing"]');
    expect(await billing.locator('td.state').getAttribute('class')).toContain('bad');
    expect(await billing.locator('td.error').textContent()).toMatch(/password/i);
    expect(await page.locator('#summary').textContent()).toContain('1 failed');
    const shop = page.locator('tr[data-source="shop"]');
    expect(await shop.locator('td.state').getAttribute('class')).toContain('ok');
    expect(await shop.locator('td.checkpoint-age').textContent()).toMatch(/^\d+s$/);
    // No secret on the page: not the wrong password the file holds, nor the right ones.
    const html = await page.content();
    for (const secret of ['wrong-password', source.password, buffer.password]) {
      expect(html).not.toContain(secret);
    }

    // Live: the "as of" time moves without a reload.
    const first = await page.locator('time').getAttribute('datetime');
    await waitFor(async () => (await page.locator('time').getAttribute('datetime')) !== first, {
      what: 'the page to refresh itself',
      timeoutMs: 15_000,
    });

    mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: join(ARTIFACTS, 'status-page.png'), fullPage: true });
    await page.close();
  });

  it('is a plain table with JavaScript off', async () => {
    const context = await browser!.newContext({ javaScriptEnabled: false });
    const page = await context.newPage();
    await page.goto(url);
    const rows = await page
      .locator('#sources tbody tr')
      .evaluateAll((trs) =>
        trs.map((tr) => [tr.getAttribute('data-source'), tr.getAttribute('data-state')]),
      );
    expect(rows).toEqual([
      ['shop', 'streaming'],
      ['billing', 'failed'],
    ]);
    await context.close();
  });
});
