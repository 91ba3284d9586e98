/**
 * A consumer group of two processes (the consume() API, test/support/consumer-member.mjs) shares
 * four sources while the capture stores them under load. One member is killed -9 in the middle of
 * a batch (its transaction open); the other takes its sources; a new member joins and gets its
 * share back by hand-overs. The handler's effects (rows of the test's table, written through the
 * batch's transaction) must be exactly the buffer's events: nothing lost, nothing applied twice.
 * Then a member frozen mid-batch (SIGSTOP) past its lease: its sources move, and once resumed it
 * must not commit the batch it held.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startCluster, type Cluster } from '../support/cluster.js';
import { ITEMS_DDL, startLoad } from '../support/fixture.js';
import { freezeProcess, outputTail } from '../support/faults.js';
import { REPO_ROOT, startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

const SOURCES = ['s0', 's1', 's2', 's3'];
const MEMBER = join(REPO_ROOT, 'test/support/consumer-member.mjs');

describe('a consumer group of two processes', () => {
  let source: Cluster;
  let buffer: Cluster;
  let dir: string;
  const processes: PhilotesProcess[] = [];

  beforeAll(async () => {
    [source, buffer] = await Promise.all([startCluster(), startCluster()]);
    dir = mkdtempSync(join(tmpdir(), 'philotes-group-'));
  });

  afterEach(async (ctx) => {
    if (ctx.task.result?.state === 'fail')
      for (const p of processes) console.log(`process ${p.pid}:\n${outputTail(p, 20)}`);
    await Promise.all(processes.splice(0).map((p) => p.kill9()));
  });

  afterAll(async () => {
    await Promise.allSettled([source?.destroy(), buffer?.destroy()]);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  function member(group: string): PhilotesProcess {
    const p = startPhilotes(
      {
        BUFFER_URL: buffer.url('buffer'),
        GROUP: group,
        BATCH_SIZE: '40',
        HANDLER_DELAY_MS: '30',
      },
      { script: MEMBER },
    );
    processes.push(p);
    return p;
  }

  /** The group's live leases by the owner's pid. */
  async function owners(group: string): Promise<Map<number, string[]>> {
    const rows = await buffer.query<{ key: string; pid: number }>(
      `SELECT l.source_id AS key, m.pid FROM cdc_leases l JOIN cdc_members m ON m.id = l.owner
        WHERE l.expires_at > now() AND l.source_id LIKE $1 ORDER BY 1`,
      [`consumer:${group}:%`],
      'buffer',
    );
    const byPid = new Map<number, string[]>();
    for (const r of rows) byPid.set(r.pid, [...(byPid.get(r.pid) ?? []), r.key]);
    return byPid;
  }

  /** Waits until one of the member's batch transactions is open (its handler is in pg_sleep). */
  async function midBatch(p: PhilotesProcess): Promise<void> {
    const [token] = await buffer.query<{ id: string }>(
      'SELECT id FROM cdc_members WHERE pid = $1',
      [p.pid],
      'buffer',
    );
    const appName = `philotes:buffer:${token!.id.slice(token!.id.lastIndexOf(':') + 1)}`;
    await waitFor(
      async () =>
        (
          await buffer.query(
            `SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND xact_start IS NOT NULL
                AND query LIKE '%pg_sleep%'`,
            [appName],
            'buffer',
          )
        ).length > 0,
      { what: `member ${p.pid} in the middle of a batch`, timeoutMs: 30_000, intervalMs: 5 },
    );
  }

  async function applied(): Promise<number> {
    const [row] = await buffer.query<{ n: number }>(
      'SELECT count(*)::int AS n FROM applied',
      [],
      'buffer',
    );
    return row!.n;
  }

  it('delivers every event exactly once across a kill -9 mid-batch, a member joining and one frozen', async () => {
    await buffer.createDatabase('buffer');
    for (const id of SOURCES) {
      await source.createDatabase(id);
      await source.query(ITEMS_DDL, [], id);
    }
    const config = join(dir, 'philotes.yaml');
    writeFileSync(
      config,
      [
        'defaults: { snapshot: never, checkpointInterval: 1s, batchMaxRows: 50 }',
        'sources:',
        ...SOURCES.map(
          (id) =>
            `  - { id: ${id}, host: ${source.host}, port: ${source.port}, database: ${id}, user: ${source.user}, passwordEnv: SOURCE_PASSWORD, slot: philotes_${id} }`,
        ),
      ].join('\n'),
    );
    const capture = startPhilotes(
      {
        PHILOTES_BUFFER_URL: buffer.url('buffer'),
        SOURCE_PASSWORD: source.password,
        PHILOTES_METRICS_PORT: '0',
      },
      { args: ['--config', config] },
    );
    processes.push(capture);
    await waitFor(
      async () =>
        (await buffer.query('SELECT 1 FROM cdc_checkpoints', [], 'buffer').catch(() => []))
          .length === SOURCES.length,
      { what: 'every source to be captured', timeoutMs: 60_000 },
    );
    await buffer.query(
      `CREATE TABLE applied (id bigserial PRIMARY KEY, source text, lsn pg_lsn, seq int, member int)`,
      [],
      'buffer',
    );
    const loads = SOURCES.map((id) => startLoad(source, { clients: 1, database: id }));
    try {
      const a = member('billing');
      const b = member('billing');
      await waitFor(
        async () => {
          const by = await owners('billing');
          return by.get(a.pid)?.length === 2 && by.get(b.pid)?.length === 2;
        },
        { what: 'the two members to read two sources each', timeoutMs: 60_000 },
      );
      await waitFor(async () => (await applied()) > 500, {
        what: 'events to be applied',
        timeoutMs: 60_000,
      });
      await midBatch(a);
      await a.kill9();
      await waitFor(async () => (await owners('billing')).get(b.pid)?.length === 4, {
        what: 'the other member to take every source',
        timeoutMs: 60_000,
      });
      // A new member gets its share back from B, by graceful hand-overs.
      const c = member('billing');
      await waitFor(
        async () => {
          const by = await owners('billing');
          return by.get(b.pid)?.length === 2 && by.get(c.pid)?.length === 2;
        },
        { what: 'the newcomer to get two sources', timeoutMs: 60_000 },
      );
      // Frozen mid-batch past its TTL: B takes its sources (ending C's open transaction); C,
      // resumed, must not commit what it had, and gets its share back.
      await midBatch(c);
      const resume = freezeProcess(c.pid);
      try {
        await waitFor(async () => (await owners('billing')).get(b.pid)?.length === 4, {
          what: "the frozen member's sources to move",
          timeoutMs: 60_000,
        });
      } finally {
        resume();
      }
      await waitFor(
        async () => {
          const by = await owners('billing');
          return by.get(b.pid)?.length === 2 && by.get(c.pid)?.length === 2;
        },
        { what: 'the resumed member to get two sources back', timeoutMs: 60_000 },
      );
    } finally {
      await Promise.all(loads.map((l) => l.stop()));
    }
    // The capture catches up; the members apply the rest.
    for (const id of SOURCES) {
      const [target] = await source.query<{ lsn: string }>(
        'SELECT pg_current_wal_lsn()::text AS lsn',
        [],
        id,
      );
      await waitFor(
        async () =>
          (
            await source.query(
              `SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn >= $2::pg_lsn`,
              [`philotes_${id}`, target!.lsn],
            )
          ).length === 1,
        { what: `source ${id} to be captured up to ${target!.lsn}`, timeoutMs: 120_000 },
      );
    }
    const compare = async () =>
      (
        await buffer.query<{ events: number; missing: number; extra: number; twice: number }>(
          `SELECT (SELECT count(*)::int FROM cdc_events) AS events,
                  (SELECT count(*)::int FROM cdc_events e WHERE NOT EXISTS
                     (SELECT 1 FROM applied a WHERE a.source = e.source_id AND a.lsn = e.lsn AND a.seq = e.seq)) AS missing,
                  (SELECT count(*)::int FROM applied a WHERE NOT EXISTS
                     (SELECT 1 FROM cdc_events e WHERE a.source = e.source_id AND a.lsn = e.lsn AND a.seq = e.seq)) AS extra,
                  (SELECT count(*)::int FROM (SELECT 1 FROM applied GROUP BY source, lsn, seq HAVING count(*) > 1) d) AS twice`,
          [],
          'buffer',
        )
      )[0]!;
    await waitFor(async () => (await compare()).missing === 0, {
      what: 'every event to be applied',
      timeoutMs: 120_000,
    });
    const result = await compare();
    expect(result.events).toBeGreaterThan(1000);
    expect(result).toMatchObject({ missing: 0, extra: 0, twice: 0 });
    // Each member's rows of a source are a contiguous run of it: the handover never interleaved.
    const positions = await buffer.query<{ source_id: string; lsn: string; seq: number }>(
      `SELECT o.source_id, o.lsn::text, o.seq FROM cdc_consumer_offsets o WHERE consumer = 'billing'`,
      [],
      'buffer',
    );
    expect(positions.map((p) => p.source_id).sort()).toEqual(SOURCES);
  });
});
