/**
 * Two Philotes processes started for the same source and buffer (a rolling deploy, a duplicated
 * config). Only one may capture at a time: the second stands by while the first holds the
 * source's lease and takes over when the first stops, and the buffer still holds every change
 * exactly once.
 * Small batches split load transactions across buffer transactions, so a second process that
 * cleaned up "beyond the checkpoint" while the first was storing would cut a transaction.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  assertReplayMatchesSource,
  checkItemHistories,
  ITEMS_DDL,
  readEvents,
  startFixture,
  startLoad,
  waitForCatchUp,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import {
  countEvents,
  countSourceItems,
  waitForEventGrowth,
  waitForExit,
} from '../support/faults.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { freePort } from '../support/ports.js';
import { waitFor } from '../support/poll.js';

describe('two processes for one source', () => {
  let f: Fixture;
  const processes: PhilotesProcess[] = [];

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(ITEMS_DDL, [], 'app');
  });

  afterAll(async () => {
    for (const p of processes) await p.kill9();
    await f?.destroy();
  });

  it('lets one capture at a time and hands over without losing or repeating a change', async () => {
    const env = f.env({ PHILOTES_CDC_BATCH_MAX_ROWS: '3', PHILOTES_RESTART_MAX_DELAY: '500ms' });
    const first = startPhilotes(env);
    processes.push(first);
    await waitForSlotActive(f.source);
    const load = startLoad(f.source, { clients: 3 });
    try {
      const port = await freePort();
      const second = startPhilotes({
        ...env,
        PHILOTES_METRICS_PORT: String(port),
        PHILOTES_METRICS_HOST: '127.0.0.1',
        PHILOTES_READINESS_GRACE: '2s',
      });
      processes.push(second);
      // It stands by, and says so: its own state, ready (the first captures the source), and
      // not a reader down for the alert rules.
      const readyz = async () => {
        const res = await fetch(`http://127.0.0.1:${port}/readyz`, {
          signal: AbortSignal.timeout(5_000),
        });
        return {
          status: res.status,
          body: (await res.json()) as { sources: Array<{ state: string; lastError: unknown }> },
        };
      };
      await waitFor(
        async () => (await readyz().catch(() => null))?.body.sources[0]?.state === 'standby',
        {
          what: 'the second process to stand by',
          timeoutMs: 30_000,
        },
      );
      // Both run side by side under load for a while; the second keeps asking for the lease.
      await waitForEventGrowth(f.buffer, await countEvents(f.buffer), 400);
      const members = await f.buffer.query<{ id: string; pid: number }>(
        `SELECT id, pid FROM cdc_members ORDER BY started_at`,
        [],
        'buffer',
      );
      expect(members.map((m) => m.pid)).toEqual([first.proc.pid, second.proc.pid]);
      const leases = await f.buffer.query<{ owner: string }>(
        `SELECT owner FROM cdc_leases`,
        [],
        'buffer',
      );
      expect(leases).toEqual([{ owner: members[0]!.id }]);
      expect(second.proc.exitCode).toBeNull();
      // Longer than the grace period by now: still ready, still standby, no error.
      const standing = await readyz();
      expect(standing.status).toBe(200);
      expect(standing.body.sources[0]).toMatchObject({ state: 'standby', lastError: null });
      const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      expect(metrics).toMatch(/^philotes_source_state\{[^}]*state="standby"[^}]*\} 1$/m);
      expect(metrics).toMatch(/^philotes_reader_up\{[^}]*\} 0$/m);

      first.signal('SIGTERM');
      expect((await waitForExit(first, 30_000)).code).toBe(0);
      // The second takes over the slot and keeps storing.
      await waitFor(
        async () => {
          const rows = await f.source.query<{ active: boolean }>(
            `SELECT active FROM pg_replication_slots WHERE slot_name = 'philotes_cdc'`,
            [],
            'app',
          );
          return rows[0]?.active === true;
        },
        { what: 'the second process to stream', timeoutMs: 60_000 },
      );
      await waitForEventGrowth(f.buffer, await countEvents(f.buffer), 200);
    } finally {
      await load.stop();
    }
    await waitForCatchUp(f);
    const rows = checkItemHistories(await readEvents(f.buffer));
    await assertReplayMatchesSource(f.source, rows);
    expect(rows.size).toBe(await countSourceItems(f.source));
  });
});
