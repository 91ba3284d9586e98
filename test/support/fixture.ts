/**
 * A source cluster and a buffer cluster, the environment that points Philotes at them, a write
 * load whose every change can be checked, and the checks themselves: every change exactly once,
 * in order, and a replay of the buffer that reproduces the source table.
 */
import pg from 'pg';
import type { ConnectionConfig } from '../../src/common/config.js';
import { startCluster, type Cluster } from './cluster.js';
import { waitFor } from './poll.js';

export interface Fixture {
  source: Cluster;
  buffer: Cluster;
  env(overrides?: Record<string, string>): Record<string, string>;
  destroy(): Promise<void>;
}

/** A table whose rows record their own history: `version` counts the updates applied to a row. */
export const ITEMS_DDL = `
  CREATE TABLE items (
    id bigserial PRIMARY KEY,
    client int NOT NULL,
    version int NOT NULL DEFAULT 0,
    name text,
    qty int,
    price numeric(12, 3),
    ratio float8,
    flag boolean,
    data jsonb,
    tags text[],
    created timestamptz NOT NULL DEFAULT clock_timestamp(),
    day date,
    blob bytea,
    big text
  )`;

/** The environment of a Philotes for source database `app` on `source`, buffer `buffer`. */
export function philotesEnv(
  source: Cluster,
  buffer: Cluster,
  overrides: Record<string, string> = {},
): Record<string, string> {
  return {
    PHILOTES_CDC_SOURCE_HOST: source.host,
    PHILOTES_CDC_SOURCE_PORT: String(source.port),
    PHILOTES_CDC_SOURCE_DATABASE: 'app',
    PHILOTES_CDC_SOURCE_USER: source.user,
    PHILOTES_CDC_SOURCE_PASSWORD: source.password,
    PHILOTES_CDC_SOURCE_ID: 'app',
    PHILOTES_BUFFER_HOST: buffer.host,
    PHILOTES_BUFFER_PORT: String(buffer.port),
    PHILOTES_BUFFER_DATABASE: 'buffer',
    PHILOTES_BUFFER_USER: buffer.user,
    PHILOTES_BUFFER_PASSWORD: buffer.password,
    PHILOTES_METRICS_PORT: '0',
    PHILOTES_CDC_CHECKPOINT_INTERVAL: '1s',
    PHILOTES_RESTART_MIN_DELAY: '100ms',
    PHILOTES_RESTART_MAX_DELAY: '2s',
    PHILOTES_LOG_LEVEL: 'info',
    ...overrides,
  };
}

export async function startFixture(
  opts: { sourceSettings?: Record<string, string>; bufferSettings?: Record<string, string> } = {},
): Promise<Fixture> {
  const [source, buffer] = await Promise.all([
    startCluster({ settings: opts.sourceSettings ?? {} }),
    startCluster({ settings: opts.bufferSettings ?? {} }),
  ]);
  await Promise.all([source.createDatabase('app'), buffer.createDatabase('buffer')]);
  return {
    source,
    buffer,
    env: (overrides = {}) => philotesEnv(source, buffer, overrides),
    destroy: async () => {
      await Promise.allSettled([source.destroy(), buffer.destroy()]);
    },
  };
}

/** A database of a test cluster as Philotes' modules take it (BufferStore.open, BufferKeeper). */
export function connectionOf(cluster: Cluster, database: string): ConnectionConfig {
  return {
    host: cluster.host,
    port: cluster.port,
    database,
    user: cluster.user,
    password: cluster.password,
    sslmode: 'disable',
    sslRootCert: undefined,
  };
}

export async function connect(cluster: Cluster, database: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: cluster.url(database) });
  client.on('error', () => undefined); // a killed server must not crash the test process
  await client.connect();
  return client;
}

/** Waits until Philotes has created its slot and started streaming from it. */
export async function waitForSlotActive(source: Cluster, slot = 'philotes_cdc'): Promise<void> {
  // Streaming, not only held: a slot being created is active too (its walsender in 'startup',
  // waiting for a consistent point under load), before anything of the run is recorded.
  await waitFor(
    async () => {
      const rows = await source.query<{ state: string | null }>(
        `SELECT r.state FROM pg_replication_slots s
           JOIN pg_stat_replication r ON r.pid = s.active_pid
          WHERE s.slot_name = $1`,
        [slot],
      );
      return rows[0]?.state === 'streaming' || rows[0]?.state === 'catchup';
    },
    { what: `slot ${slot} to be active`, timeoutMs: 60_000 },
  );
}

export interface LoadStats {
  committedTransactions: number;
  errors: number;
}

/**
 * Several clients, each inserting, updating and deleting its own rows in small transactions until
 * `stop` is called. Errors (a server going away) are counted and the client reconnects: the
 * source table is the truth, not what the client believes it committed.
 */
export function startLoad(
  source: Cluster,
  opts: { clients?: number; database?: string; maxTransactions?: number } = {},
): { stop: () => Promise<LoadStats>; finished: () => Promise<LoadStats>; stats: LoadStats } {
  const clients = opts.clients ?? 4;
  const stats: LoadStats = { committedTransactions: 0, errors: 0 };
  let stopped = false;
  const loops = Array.from({ length: clients }, async (_, clientNo) => {
    let client: pg.Client | null = null;
    let n = 0;
    while (
      !stopped &&
      (opts.maxTransactions === undefined || stats.committedTransactions < opts.maxTransactions)
    ) {
      try {
        client ??= await connect(source, opts.database ?? 'app');
        await client.query('BEGIN');
        await client.query(
          `INSERT INTO items (client, name, qty, price, ratio, flag, data, tags, day, blob, big)
           SELECT $1, 'n' || g || E'\\t"q"', g, g * 1.125, g / 3.0, g % 2 = 0,
                  jsonb_build_object('g', g, 'nested', jsonb_build_array(1, 'two', null)),
                  ARRAY['a', 'b c', NULL, 'd"e'], DATE '2024-02-29' + g, decode('00ff' || lpad(to_hex(g), 4, '0'), 'hex'),
                  CASE WHEN g % 2 = 1 THEN (SELECT string_agg(md5(random()::text || i), '') FROM generate_series(1, 300) i) END
             FROM generate_series(1, 1 + ($2::int % 3)) g`,
          [clientNo, n],
        );
        await client.query(
          `UPDATE items SET version = version + 1, qty = qty + 1, ratio = ratio * 2
            WHERE id IN (SELECT id FROM items WHERE client = $1 ORDER BY random() LIMIT 2)`,
          [clientNo],
        );
        if (n % 4 === 3) {
          await client.query(
            `DELETE FROM items WHERE id IN (SELECT id FROM items WHERE client = $1 ORDER BY id LIMIT 1)`,
            [clientNo],
          );
        }
        await client.query('COMMIT');
        stats.committedTransactions++;
        n++;
      } catch {
        stats.errors++;
        await client?.end().catch(() => undefined);
        client = null;
        if (!stopped) await new Promise((r) => setTimeout(r, 100)); // back off while the server is down
      }
    }
    await client?.end().catch(() => undefined);
  });
  return {
    stats,
    /** Resolves once maxTransactions have committed. */
    finished: async () => {
      await Promise.all(loops);
      return stats;
    },
    stop: async () => {
      stopped = true;
      await Promise.all(loops);
      return stats;
    },
  };
}

export interface EventRow {
  lsn: string;
  seq: number;
  operation: string;
  table_name: string;
  before: Record<string, unknown> | null;
  after: Record<string, unknown> | null;
  primary_key: string[];
  unchanged_columns: string[] | null;
}

export async function readEvents(
  buffer: Cluster,
  sourceId = 'app',
  table?: string,
  database = 'buffer',
): Promise<EventRow[]> {
  return buffer.query<EventRow & Record<string, unknown>>(
    `SELECT lsn::text, seq, operation, table_name, before, after, primary_key, unchanged_columns
       FROM cdc_events WHERE source_id = $1 ${table ? 'AND table_name = $2' : ''}
      ORDER BY cdc_events.lsn, seq`,
    table ? [sourceId, table] : [sourceId],
    database,
  ) as Promise<EventRow[]>;
}

/**
 * Checks the history of every item row: one INSERT at version 0, then UPDATEs at versions
 * 1, 2, 3… with nothing missing or repeated, and at most one DELETE, last. Returns the state the
 * events describe, keyed by id.
 */
export function checkItemHistories(events: EventRow[]): Map<string, Record<string, unknown>> {
  const rows = new Map<string, Record<string, unknown>>();
  const deleted = new Set<string>();
  for (const e of events) {
    if (e.table_name !== 'items') continue;
    if (e.operation === 'TRUNCATE') {
      rows.clear();
      continue;
    }
    const id = String((e.after ?? e.before)!.id);
    if (deleted.has(id)) throw new Error(`event after DELETE for id ${id} at ${e.lsn}/${e.seq}`);
    const prev = rows.get(id);
    if (e.operation === 'INSERT') {
      if (prev) throw new Error(`duplicate INSERT for id ${id} at ${e.lsn}/${e.seq}`);
      if (e.after!.version !== 0)
        throw new Error(`INSERT of id ${id} with version ${String(e.after!.version)}`);
      rows.set(id, e.after!);
    } else if (e.operation === 'UPDATE') {
      if (!prev) throw new Error(`UPDATE of unknown id ${id} at ${e.lsn}/${e.seq}`);
      const expected = (prev.version as number) + 1;
      if (e.after!.version !== expected) {
        throw new Error(
          `id ${id}: UPDATE to version ${String(e.after!.version)} after ${String(prev.version)} (lost or repeated change) at ${e.lsn}/${e.seq}`,
        );
      }
      // An unchanged TOASTed column is left out of `after` and named in unchanged_columns.
      const merged: Record<string, unknown> = { ...e.after! };
      for (const col of e.unchanged_columns ?? []) merged[col] = prev[col];
      rows.set(id, merged);
    } else if (e.operation === 'DELETE') {
      if (!prev) throw new Error(`DELETE of unknown id ${id} at ${e.lsn}/${e.seq}`);
      rows.delete(id);
      deleted.add(id);
    }
  }
  return rows;
}

/**
 * Replays the rows the events describe into a fresh copy of the table (in a scratch database on
 * the source cluster, through jsonb_populate_record, so every value must parse back as its type)
 * and compares it with the source table, row for row and column for column.
 */
export async function assertReplayMatchesSource(
  source: Cluster,
  rows: Map<string, Record<string, unknown>>,
  database = 'app',
): Promise<void> {
  const scratch = `verify_${Math.random().toString(36).slice(2, 8)}`;
  await source.createDatabase(scratch);
  const client = await connect(source, scratch);
  try {
    await client.query(ITEMS_DDL);
    for (const row of rows.values()) {
      await client.query(
        'INSERT INTO items SELECT * FROM jsonb_populate_record(NULL::items, $1::jsonb)',
        [JSON.stringify(row)],
      );
    }
    const digest = `SELECT count(*)::int AS n, coalesce(md5(string_agg(t::text, E'\\n' ORDER BY id)), '') AS md5 FROM items t`;
    const [replayed] = (await client.query<{ n: number; md5: string }>(digest)).rows;
    const [actual] = await source.query<{ n: number; md5: string }>(digest, [], database);
    if (replayed!.n !== actual!.n || replayed!.md5 !== actual!.md5) {
      const diff = await findDifference(source, client, database);
      throw new Error(
        `replayed buffer differs from source: ${replayed!.n} rows vs ${actual!.n}; ${diff}`,
      );
    }
  } finally {
    await client.end();
  }
}

async function findDifference(
  source: Cluster,
  replica: pg.Client,
  database: string,
): Promise<string> {
  const a = await source.query<{ id: string; t: string }>(
    'SELECT id::text, t::text AS t FROM items t ORDER BY id',
    [],
    database,
  );
  const b = (
    await replica.query<{ id: string; t: string }>(
      'SELECT id::text, t::text AS t FROM items t ORDER BY id',
    )
  ).rows;
  const mb = new Map(b.map((r) => [r.id, r.t]));
  for (const r of a) {
    const other = mb.get(r.id);
    if (other !== r.t)
      return `first difference at id ${r.id}: source ${r.t.slice(0, 300)} / replay ${String(other).slice(0, 300)}`;
    mb.delete(r.id);
  }
  const extra = [...mb.keys()][0];
  return extra === undefined ? 'no row-level difference found' : `replay has extra id ${extra}`;
}

/** Waits until the stored checkpoint has reached the source's current WAL position. */
export async function waitForCatchUp(f: Fixture, timeoutMs = 120_000): Promise<void> {
  const [target] = await f.source.query<{ lsn: string }>(
    'SELECT pg_current_wal_lsn()::text AS lsn',
    [],
    'app',
  );
  // A transaction touching no published table leaves nothing to store, so compare against the
  // slot's own progress as well: caught up when the slot has passed the target.
  await waitFor(
    async () => {
      const [slot] = await f.source.query<{ ok: boolean }>(
        `SELECT confirmed_flush_lsn >= $1::pg_lsn AS ok FROM pg_replication_slots WHERE slot_name = 'philotes_cdc'`,
        [target!.lsn],
      );
      return slot?.ok === true;
    },
    { what: `slot to confirm ${target!.lsn}`, timeoutMs },
  );
}

/**
 * After the load has stopped: waits until Philotes has caught up, then checks the whole buffer
 * (every item's history exactly once and in order, the replay equals the source, nothing missing).
 */
export async function expectEveryChangeOnce(f: Fixture): Promise<void> {
  await waitForCatchUp(f);
  const rows = checkItemHistories(await readEvents(f.buffer));
  await assertReplayMatchesSource(f.source, rows);
  const [count] = await f.source.query<{ n: number }>(
    'SELECT count(*)::int AS n FROM items',
    [],
    'app',
  );
  if (rows.size !== count!.n)
    throw new Error(`buffer describes ${rows.size} items, source has ${count!.n}`);
}

/**
 * Runs `step(1)`, `step(2)`, … one after another until stopped: a writer that changes tables
 * while something else runs. `rounds()` says how far it got; `stop()` waits for the step in
 * flight and resolves with the rounds done (a step's error rejects it).
 */
export function writeUntilStopped(step: (round: number) => Promise<void>): {
  rounds: () => number;
  stop: () => Promise<number>;
} {
  let stopped = false;
  let round = 0;
  const loop = (async () => {
    while (!stopped) await step(++round);
  })();
  loop.catch(() => undefined); // surfaced by stop()
  return {
    rounds: () => round,
    stop: async () => {
      stopped = true;
      await loop;
      return round;
    },
  };
}
