/**
 * Generated columns: a stored generated column is in the events exactly when the publication
 * publishes it (PostgreSQL 18's publish_generated_columns = stored); the publication Philotes
 * creates does not, so by default the events carry the columns a replay may insert. On servers
 * before 18 generated columns are never published.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startFixture, waitForSlotActive, type Fixture } from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

const DDL = `CREATE TABLE priced (id int PRIMARY KEY, net numeric, gross numeric GENERATED ALWAYS AS (net * 1.2) STORED)`;

describe('generated columns', () => {
  let f: Fixture;
  let version = 0;
  const running: PhilotesProcess[] = [];

  beforeAll(async () => {
    f = await startFixture();
    const [row] = await f.source.query<{ v: string }>(
      `SELECT current_setting('server_version_num') AS v`,
    );
    version = Number(row!.v);
  });

  afterAll(async () => {
    await Promise.all(running.map((p) => p.kill9()));
    await f?.destroy();
  });

  /** Captures `database` as source `id`, inserts two rows, returns their `after` images. */
  async function capture(database: string, setup: string): Promise<Array<Record<string, unknown>>> {
    await f.source.createDatabase(database);
    await f.source.query(`${DDL}; ${setup}`, [], database);
    const philotes = startPhilotes(
      f.env({
        PHILOTES_CDC_SOURCE_DATABASE: database,
        PHILOTES_CDC_SOURCE_ID: database,
        PHILOTES_CDC_REPLICATION_SLOT: `philotes_${database}`,
      }),
    );
    running.push(philotes);
    await waitForSlotActive(f.source, `philotes_${database}`);
    await f.source.query(`INSERT INTO priced (id, net) VALUES (1, 10), (2, 2.5)`, [], database);
    const rows = await waitFor(
      async () => {
        const found = await f.buffer.query<{ after: Record<string, unknown> }>(
          `SELECT after FROM cdc_events WHERE source_id = $1 ORDER BY seq`,
          [database],
          'buffer',
        );
        return found.length === 2 ? found : false;
      },
      { what: `the rows of ${database}`, timeoutMs: 30_000 },
    );
    return rows.map((r) => r.after);
  }

  it('are left out with the publication Philotes creates', async () => {
    expect(await capture('plain', '')).toEqual([
      { id: 1, net: '10' },
      { id: 2, net: '2.5' },
    ]);
  });

  it('are captured when the publication publishes them (PostgreSQL 18+)', async ({ skip }) => {
    if (version < 180000) skip();
    expect(
      await capture(
        'withgen',
        'CREATE PUBLICATION philotes_pub FOR ALL TABLES WITH (publish_generated_columns = stored)',
      ),
    ).toEqual([
      { id: 1, net: '10', gross: '12.0' },
      { id: 2, net: '2.5', gross: '3.00' },
    ]);
  });
});
