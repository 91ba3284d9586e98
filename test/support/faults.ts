/**
 * Helpers for the fault-injection tests (test/faults/): what the buffer and the source's slot say
 * right now, and deadlines that prove something does not hang. Every check reads data (rows in
 * the buffer, pg_replication_slots), never log lines.
 */
import { parseLsn } from '../../src/common/lsn.js';
import type { Cluster } from './cluster.js';
import type { ExitStatus, PhilotesProcess } from './philotes.js';
import { waitFor } from './poll.js';
import { onProcessEnd } from './process-end.js';

export interface StoredCheckpoint {
  lsn: string;
  transactionId: string | null;
}

export interface LastEvent {
  lsn: string;
  xid: string;
}

export interface SlotState {
  active: boolean;
  activePid: number | null;
  confirmedFlushLsn: string | null;
}

/** Events stored for a source; 0 before Philotes has created the buffer schema. */
export async function countEvents(buffer: Cluster, sourceId = 'app'): Promise<number> {
  const [table] = await buffer.query<{ exists: boolean }>(
    `SELECT to_regclass('public.cdc_events') IS NOT NULL AS exists`,
    [],
    'buffer',
  );
  if (!table?.exists) return 0;
  const [row] = await buffer.query<{ n: number }>(
    'SELECT count(*)::int AS n FROM cdc_events WHERE source_id = $1',
    [sourceId],
    'buffer',
  );
  return row?.n ?? 0;
}

/**
 * Waits until at least `atLeast` more events are stored than `from`. A restart may first remove
 * events beyond the checkpoint, so this only passes once new events have really been stored.
 */
/**
 * Rows stored for a source in cdc_events and cdc_staged: a large transaction the source streams
 * while in progress (protocol 2) reaches cdc_staged first.
 */
export async function countStoredRows(buffer: Cluster, sourceId = 'app'): Promise<number> {
  const [row] = await buffer.query<{ n: number }>(
    `SELECT (SELECT count(*) FROM cdc_events WHERE source_id = $1)
          + (SELECT count(*) FROM cdc_staged WHERE source_id = $1) AS n`,
    [sourceId],
    'buffer',
  );
  return Number(row?.n ?? 0);
}

export async function waitForEventGrowth(
  buffer: Cluster,
  from: number,
  atLeast: number,
  timeoutMs = 60_000,
  count: (buffer: Cluster) => Promise<number> = countEvents,
): Promise<number> {
  return waitFor(
    async () => {
      const n = await count(buffer);
      return n >= from + atLeast ? n : false;
    },
    { what: `at least ${from + atLeast} stored events (had ${from})`, timeoutMs, intervalMs: 200 },
  );
}

export async function readCheckpoint(
  buffer: Cluster,
  sourceId = 'app',
): Promise<StoredCheckpoint | undefined> {
  const [row] = await buffer.query<{ lsn: string; transaction_id: string | null }>(
    'SELECT lsn, transaction_id::text FROM cdc_checkpoints WHERE source_id = $1',
    [sourceId],
    'buffer',
  );
  return row ? { lsn: row.lsn, transactionId: row.transaction_id } : undefined;
}

/** The stored event with the highest commit LSN (the last transaction stored). */
export async function readLastEvent(
  buffer: Cluster,
  sourceId = 'app',
): Promise<LastEvent | undefined> {
  const [row] = await buffer.query<{ lsn: string; xid: string }>(
    `SELECT lsn::text, xid::text FROM cdc_events WHERE source_id = $1
      ORDER BY cdc_events.lsn DESC, seq DESC LIMIT 1`,
    [sourceId],
    'buffer',
  );
  return row;
}

/**
 * Events at or past the checkpoint. Events carry their transaction's commit START LSN and the
 * checkpoint is the last stored commit's END LSN, so a fully stored transaction is always below.
 */
export async function countEventsBeyondCheckpoint(
  buffer: Cluster,
  sourceId = 'app',
): Promise<number> {
  const [row] = await buffer.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM cdc_events e
      WHERE e.source_id = $1
        AND e.lsn >= coalesce((SELECT lsn::pg_lsn FROM cdc_checkpoints WHERE source_id = $1), '0/0')`,
    [sourceId],
    'buffer',
  );
  return row?.n ?? 0;
}

export async function readSlot(
  source: Cluster,
  slot = 'philotes_cdc',
): Promise<SlotState | undefined> {
  const [row] = await source.query<{
    active: boolean;
    active_pid: number | null;
    confirmed_flush_lsn: string | null;
  }>(
    `SELECT active, active_pid, confirmed_flush_lsn::text
       FROM pg_replication_slots WHERE slot_name = $1`,
    [slot],
    'app',
  );
  return row
    ? { active: row.active, activePid: row.active_pid, confirmedFlushLsn: row.confirmed_flush_lsn }
    : undefined;
}

/** LSNs compared as numbers: their text forms do not sort. */
export function lsn(text: string): bigint {
  return parseLsn(text);
}

/**
 * Resolves with `p`, or rejects once `ms` have passed. Only for proving that something does not
 * hang: the deadline is generous, never a measure of speed.
 */
export async function withDeadline<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, deadline]);
  } finally {
    clearTimeout(timer);
  }
}

/** Waits for the process to exit by itself; on the deadline, the error carries its last output. */
export async function waitForExit(p: PhilotesProcess, ms: number): Promise<ExitStatus> {
  try {
    return await withDeadline(p.exited, ms, `philotes (pid ${p.pid}) exit`);
  } catch (error) {
    throw new Error(`${(error as Error).message}\n${outputTail(p)}`, { cause: error });
  }
}

/** The end of a process's output, to make a failed assertion explain itself. */
export function outputTail(p: PhilotesProcess, lines = 30): string {
  return `--- philotes stdout (last ${lines}) ---\n${p.stdout.slice(-lines).join('\n')}\n--- stderr ---\n${p.stderr.slice(-lines).join('\n')}`;
}

/** Rows in the source's items table: the truth the buffer is compared with. */
export async function countSourceItems(source: Cluster): Promise<number> {
  const [row] = await source.query<{ n: number }>(
    'SELECT count(*)::int AS n FROM items',
    [],
    'app',
  );
  return row?.n ?? 0;
}

/**
 * The sum of a metric's samples for one source in Philotes' /metrics (served on `port`), or
 * undefined when the family has no sample for that source.
 */
export async function readMetric(
  port: number,
  name: string,
  sourceId = 'app',
): Promise<number | undefined> {
  const res = await fetch(`http://127.0.0.1:${port}/metrics`, {
    signal: AbortSignal.timeout(10_000),
  });
  if (!res.ok) throw new Error(`/metrics answered ${res.status}`);
  const body = await res.text();
  let sum: number | undefined;
  for (const line of body.split('\n')) {
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\} (\S+)$/.exec(line);
    if (!match || match[1] !== name || !match[2]!.includes(`source="${sourceId}"`)) continue;
    sum = (sum ?? 0) + Number(match[3]);
  }
  return sum;
}

/** Waits until a counter on /metrics has reached `atLeast`; resolves with its value. */
export async function waitForMetric(
  port: number,
  name: string,
  atLeast: number,
  timeoutMs = 60_000,
): Promise<number> {
  return waitFor(
    async () => {
      const value = await readMetric(port, name);
      return value !== undefined && value >= atLeast ? value : false;
    },
    { what: `${name} >= ${atLeast}`, timeoutMs, intervalMs: 200 },
  );
}

/** Waits until the slot is active again, held by a walsender other than `previousPid`. */
export async function waitForNewWalsender(
  source: Cluster,
  previousPid: number | null,
  timeoutMs = 60_000,
): Promise<number> {
  return waitFor(
    async () => {
      const slot = await readSlot(source);
      return slot?.active === true && slot.activePid !== null && slot.activePid !== previousPid
        ? slot.activePid
        : false;
    },
    { what: `the slot to be active with a walsender other than ${previousPid}`, timeoutMs },
  );
}

/**
 * Calls `sample` every `intervalMs` for `durationMs` (at least twice) and resolves with what it
 * returned. Unlike `waitFor`, a throw ends the sampling and rejects: it is a failed check.
 */
export async function sampleFor<T>(
  durationMs: number,
  what: string,
  sample: () => Promise<T>,
  intervalMs = 250,
): Promise<T[]> {
  const samples: T[] = [];
  const until = Date.now() + durationMs;
  let failure: { error: unknown } | undefined;
  await waitFor(
    async () => {
      try {
        samples.push(await sample());
      } catch (error) {
        failure = { error };
        return true;
      }
      return samples.length >= 2 && Date.now() >= until;
    },
    { what: `sampling ${what}`, timeoutMs: durationMs + 60_000, intervalMs },
  );
  if (failure) throw failure.error;
  return samples;
}

/**
 * Freezes a process with SIGSTOP (a hung server process: it holds its sockets and answers
 * nothing). Returns the function that thaws it; the thaw also runs when the test process ends, so
 * a failing test never leaves a frozen process behind. Thawing twice is harmless.
 */
export function freezeProcess(pid: number): () => void {
  let thawed = false;
  const thaw = (): void => {
    if (thawed) return;
    thawed = true;
    try {
      process.kill(pid, 'SIGCONT');
    } catch {
      // Already gone.
    }
  };
  onProcessEnd(thaw);
  process.kill(pid, 'SIGSTOP');
  return thaw;
}

/**
 * Runs `body`, failing at once if Philotes exits meanwhile: a test waiting for a recovery then
 * reports the crash and its output, instead of timing out on some later wait.
 */
export async function whileRunning<T>(p: PhilotesProcess, body: () => Promise<T>): Promise<T> {
  const exited = p.exited.then((status) => {
    throw new Error(
      `philotes (pid ${p.pid}) exited during the test (code ${status.code}, signal ${status.signal})\n${outputTail(p)}`,
    );
  });
  return Promise.race([body(), exited]);
}
