/**
 * A failover slot (PostgreSQL 17+): `failover: true` creates the slot with FAILOVER; a physical
 * standby with sync_replication_slots keeps a copy of it, and the primary hands logical changes
 * to Philotes only once the standby has them (synchronized_standby_slots). The primary is
 * stopped under load and the standby promoted; Philotes, pointed at it, resumes from the
 * buffer's checkpoint on the synced slot: the buffer replays to the new primary's table, and no
 * gap is recorded. The standby is a copy of the stopped primary's data directory that streams
 * from it (the embedded PostgreSQL has no pg_basebackup). Skipped before 17.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startCluster, startClusterFromCopy, type Cluster } from '../support/cluster.js';
import {
  assertReplayMatchesSource,
  checkItemHistories,
  ITEMS_DDL,
  philotesEnv,
  readEvents,
  startLoad,
  waitForSlotActive,
} from '../support/fixture.js';
import { countEvents, outputTail, waitForEventGrowth } from '../support/faults.js';
import { runPhilotesToExit, startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

describe('a failover slot across a promotion', () => {
  let primary: Cluster;
  let standby: Cluster | undefined;
  let buffer: Cluster;
  let version = 0;
  let philotes: PhilotesProcess | undefined;

  beforeAll(async () => {
    [primary, buffer] = await Promise.all([startCluster(), startCluster()]);
    const [row] = await primary.query<{ v: string }>(
      `SELECT current_setting('server_version_num') AS v`,
    );
    version = Number(row!.v);
    if (version < 170000) return;
    await buffer.createDatabase('buffer');
    await primary.createDatabase('app');
    await primary.query(ITEMS_DDL, [], 'app');
    // The standby's own physical slot, then a copy of the stopped primary that streams from it.
    await primary.query(`SELECT pg_create_physical_replication_slot('standby1', true)`);
    await primary.stop('fast');
    const copy = await primary.copyData();
    await primary.start();
    standby = await startClusterFromCopy(primary, copy, {
      standby: true,
      settings: {
        primary_conninfo: `host=${primary.host} port=${primary.port} user=${primary.user} password=${primary.password} dbname=postgres`,
        primary_slot_name: 'standby1',
        hot_standby_feedback: 'on',
        sync_replication_slots: 'on',
      },
    });
    // Logical changes reach Philotes only once the standby has them.
    await primary.query(`ALTER SYSTEM SET synchronized_standby_slots = 'standby1'`);
    await primary.query('SELECT pg_reload_conf()');
    await waitFor(
      async () =>
        (
          await primary.query<{ active: boolean }>(
            `SELECT active FROM pg_replication_slots WHERE slot_name = 'standby1'`,
          )
        )[0]?.active === true,
      { what: 'the standby to stream', timeoutMs: 60_000 },
    );
  });

  afterAll(async () => {
    await philotes?.kill9();
    await Promise.allSettled([primary?.destroy(), standby?.destroy(), buffer?.destroy()]);
  });

  const env = (source: Cluster) =>
    philotesEnv(source, buffer, { PHILOTES_CDC_FAILOVER: 'on', PHILOTES_CDC_SNAPSHOT: 'never' });

  // The standby's slot sync worker naps up to 30 s between rounds: about 25 s here for the
  // slot to be synced and persistent, more on a loaded machine. Room for that, not a hang.
  it('resumes exactly on the promoted standby, with no gap', { timeout: 240_000 }, async (ctx) => {
    if (version < 170000) ctx.skip();
    const promoted = standby!;
    philotes = startPhilotes(env(primary));
    await waitForSlotActive(primary).catch((error: unknown) => {
      throw new Error(`${(error as Error).message}\n${outputTail(philotes!)}`);
    });
    const [created] = await primary.query<{ failover: boolean }>(
      `SELECT failover FROM pg_replication_slots WHERE slot_name = 'philotes_cdc'`,
    );
    expect(created!.failover).toBe(true);
    // check says so, and that the primary waits for the standby's slot before decoding.
    const checked = await runPhilotesToExit(env(primary), 60_000, { args: ['check', '--json'] });
    const { findings } = JSON.parse(checked.stdout.join('\n')) as {
      findings: Array<{ check: string; verdict: string; detail: string }>;
    };
    expect(findings.find((f) => f.check === 'failover')).toMatchObject({
      verdict: 'ok',
      detail: expect.stringContaining('standby slot(s) standby1') as unknown,
    });

    const load = startLoad(primary, { clients: 2, database: 'app' });
    try {
      await waitForEventGrowth(buffer, 0, 300);
      // The standby holds the slot, synced from the primary's and ready for failover: a synced
      // slot stays temporary (dropped at a promotion) until the standby has caught up with it.
      await waitFor(
        async () => {
          const [slot] = await promoted.query<{ synced: boolean; temporary: boolean }>(
            `SELECT synced, temporary FROM pg_replication_slots WHERE slot_name = 'philotes_cdc'`,
          );
          return slot?.synced === true && !slot.temporary;
        },
        { what: 'the standby to sync the failover slot', timeoutMs: 120_000 },
      );
      await waitForEventGrowth(buffer, await countEvents(buffer), 200);
      // The failover, under load: the primary goes, the standby is promoted.
      await primary.stop('fast');
    } finally {
      await load.stop();
    }
    await promoted.promote(); // pg_ctl promote -w: returns once it is a primary
    await philotes.kill9();

    // Pointed at the new primary: it resumes from the buffer's checkpoint on the synced slot.
    philotes = startPhilotes(env(promoted));
    await waitForSlotActive(promoted).catch((error: unknown) => {
      throw new Error(`${(error as Error).message}\n${outputTail(philotes!)}`);
    });
    const more = startLoad(promoted, { clients: 2, database: 'app', maxTransactions: 100 });
    await more.finished();
    const [end] = await promoted.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn');
    await waitFor(
      async () =>
        (
          await promoted.query<{ ok: boolean }>(
            `SELECT confirmed_flush_lsn >= $1::pg_lsn AS ok FROM pg_replication_slots WHERE slot_name = 'philotes_cdc'`,
            [end!.lsn],
          )
        )[0]?.ok === true,
      { what: 'Philotes to confirm the new primary’s load', timeoutMs: 60_000 },
    );
    expect(philotes.proc.exitCode, outputTail(philotes)).toBeNull();
    const rows = checkItemHistories(await readEvents(buffer));
    await assertReplayMatchesSource(promoted, rows);
    const [count] = await promoted.query<{ n: number }>(
      'SELECT count(*)::int AS n FROM items',
      [],
      'app',
    );
    expect(rows.size).toBe(count!.n);
    expect(await buffer.query('SELECT reason FROM cdc_gaps', [], 'buffer')).toEqual([]);
  });
});
