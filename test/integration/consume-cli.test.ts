/**
 * `philotes-worker consume` as a person runs it: JSON lines on stdout, the group's position moved
 * after each batch (a clean stop and a new start print nothing twice), --exec committing only
 * after the command exited 0, and clear errors for a bad command line or a database that is not
 * a Philotes buffer.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  ITEMS_DDL,
  philotesEnv,
  startFixture,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import { waitForExit } from '../support/faults.js';
import { runPhilotesToExit, startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

describe('philotes-worker consume', () => {
  let f: Fixture;
  let capture: PhilotesProcess | undefined;
  let dir: string;

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(ITEMS_DDL, [], 'app');
    capture = startPhilotes(f.env());
    await waitForSlotActive(f.source);
    dir = mkdtempSync(join(tmpdir(), 'philotes-consume-'));
  });

  afterAll(async () => {
    await capture?.kill9();
    await f?.destroy();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** The buffer alone, as a consumer elsewhere knows it. */
  function bufferEnv(): Record<string, string> {
    const all = philotesEnv(f.source, f.buffer);
    return Object.fromEntries(
      Object.entries(all).filter(([k]) => k.startsWith('PHILOTES_BUFFER_')),
    );
  }

  function names(p: PhilotesProcess): string[] {
    return p.stdout
      .map((l) => JSON.parse(l) as { kind: string; after?: { name?: string } })
      .filter((r) => r.kind === 'event')
      .map((r) => r.after?.name ?? '');
  }

  async function insert(prefix: string, n: number): Promise<void> {
    await f.source.query(
      `INSERT INTO items (client, name) SELECT 5, $1 || g FROM generate_series(1, $2::int) g`,
      [prefix, n],
      'app',
    );
  }

  it('prints JSON lines and, after a clean stop, goes on where it was', async () => {
    await insert('first', 10);
    const args = ['consume', '--group', 'cli', '--source', 'app', '--batch-size', '4'];
    const one = startPhilotes(bufferEnv(), { args });
    await waitFor(() => names(one).filter((n) => n.startsWith('first')).length === 10, {
      what: 'the ten events on stdout',
      timeoutMs: 60_000,
    });
    const line = JSON.parse(one.stdout[0]!) as Record<string, unknown>;
    expect(line).toMatchObject({
      kind: 'event',
      source: 'app',
      table: 'items',
      operation: 'INSERT',
    });
    expect(one.stderr.join('\n')).toMatch(/at-least-once/);
    one.signal('SIGTERM');
    expect((await waitForExit(one, 30_000)).code).toBe(0);

    await insert('second', 5);
    const two = startPhilotes(bufferEnv(), { args });
    try {
      await waitFor(() => names(two).length === 5, {
        what: 'the five new events',
        timeoutMs: 60_000,
      });
      expect(names(two)).toEqual(['second1', 'second2', 'second3', 'second4', 'second5']);
    } finally {
      two.signal('SIGTERM');
      await waitForExit(two, 30_000);
    }
  });

  it('moves the position with --exec only after the command exits 0', async () => {
    await insert('exec', 3);
    const out = join(dir, 'exec.jsonl');
    const ok = join(dir, 'ok');
    writeFileSync(out, '');
    const group = 'cli_exec';
    const p = startPhilotes(
      { ...bufferEnv(), OUT: out, OK: ok },
      {
        args: [
          'consume',
          '--group',
          group,
          '--source',
          'app',
          '--exec',
          'cat >> "$OUT" && test -f "$OK"',
        ],
      },
    );
    const position = async () =>
      (
        await f.buffer.query<{ lsn: string }>(
          `SELECT lsn::text FROM cdc_consumer_offsets WHERE consumer = $1`,
          [group],
          'buffer',
        )
      )[0]?.lsn ?? null;
    try {
      // The command ran (its input is in the file) and failed: nothing committed.
      await waitFor(() => readFileSync(out, 'utf8').includes('exec3'), {
        what: 'the command to get the batch',
        timeoutMs: 60_000,
      });
      // The group's position of the source was made at its start, before everything.
      expect(await position()).toBe('0/0');
      writeFileSync(ok, '');
      await waitFor(async () => (await position()) !== '0/0', {
        what: 'the position to move once the command succeeds',
        timeoutMs: 60_000,
      });
      const lines = readFileSync(out, 'utf8').trim().split('\n');
      // The batch came again after the failure: at-least-once, and never lost.
      expect(lines.filter((l) => l.includes('"exec1"')).length).toBeGreaterThanOrEqual(2);
    } finally {
      p.signal('SIGTERM');
      await waitForExit(p, 30_000);
    }
  });

  it('status shows each group, its position and its lag', async () => {
    await insert('status', 3);
    const group = 'cli_status';
    await f.buffer.query(`SELECT philotes_create_consumer($1)`, [group], 'buffer');
    await f.buffer.query(
      `INSERT INTO cdc_consumer_offsets (consumer, source_id, lsn, seq) VALUES ($1, 'app', '0/0', -1)`,
      [group],
      'buffer',
    );
    await waitFor(
      async () =>
        (
          await f.buffer.query(
            `SELECT 1 FROM cdc_events WHERE after->>'name' = 'status3'`,
            [],
            'buffer',
          )
        ).length > 0,
      { what: 'the rows to be stored', timeoutMs: 60_000 },
    );
    const run = await runPhilotesToExit(f.env(), 30_000, { args: ['status', '--json'] });
    const report = JSON.parse(run.stdout.join('\n')) as {
      consumers: Array<{ group: string; source: string; lagEvents: number; expired: boolean }>;
      events: { partitioned: boolean; partitions: number } | null;
    };
    const row = report.consumers.find((c) => c.group === group);
    expect(row).toMatchObject({ source: 'app', expired: false });
    expect(row!.lagEvents).toBeGreaterThanOrEqual(3);
    expect(report.events).toMatchObject({ partitioned: true });
    const table = await runPhilotesToExit(f.env(), 30_000, { args: ['status'] });
    expect(table.stdout.join('\n')).toMatch(/GROUP\s+SOURCE\s+POSITION/);
  });

  it('refuses a bad --from and a database that is not a Philotes buffer, exit 2', async () => {
    const bad = await runPhilotesToExit(bufferEnv(), 30_000, {
      args: ['consume', '--group', 'g', '--from', 'yesterday'],
    });
    expect(bad.code).toBe(2);
    expect(bad.stderr.join('\n')).toMatch(/--from must be earliest, latest or an LSN/);
    await f.buffer.createDatabase('not_a_buffer');
    const elsewhere = await runPhilotesToExit(
      { ...bufferEnv(), PHILOTES_BUFFER_DATABASE: 'not_a_buffer' },
      30_000,
      { args: ['consume', '--group', 'g'] },
    );
    expect(elsewhere.code).toBe(2);
    expect(elsewhere.stderr.join('\n')).toMatch(/not a Philotes buffer/);
  });

  it('says so when a source it is asked for is not in the buffer, naming those that are', async () => {
    const typo = startPhilotes(bufferEnv(), {
      args: ['consume', '--group', 'typo', '--source', 'ap'],
    });
    try {
      await waitFor(() => typo.stderr.some((l) => l.includes('not in the buffer')), {
        what: 'the warning about source "ap"',
        timeoutMs: 30_000,
      });
      expect(typo.stderr.join('\n')).toMatch(/"ap" not in the buffer.*The buffer has: app/);
    } finally {
      typo.signal('SIGTERM');
      await waitForExit(typo, 30_000);
    }
  });
});
