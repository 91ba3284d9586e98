/**
 * The reader's flow without a server: a SlotReader whose connections are fakes (the factory of
 * workers/source-session.ts), fed recorded pgoutput messages as the walsender frames them, with
 * this test as its supervisor on the other end of the MessagePort. What it holds: batches carry
 * whole transactions in stream order; nothing is confirmed to the source before the supervisor
 * says it is durable; an idle WAL end is recorded before it is confirmed; with no room in flight
 * reading pauses and resumes in order; a change waits for its relation's catalog lookup; a stop
 * stores what is in flight and confirms it; a slot moved by someone else stops the reader.
 */
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import { afterEach, describe, expect, it } from 'vitest';
import { loadConfig } from '../../src/common/config.js';
import { formatLsn } from '../../src/common/lsn.js';
import {
  readerSettings,
  type ReaderMessage,
  type ReaderResult,
  type ReaderSettings,
  type SupervisorMessage,
} from '../../src/common/protocol.js';
import type { SlotState } from '../../src/common/source-admin.js';
import type { ResolvedRelation } from '../../workers/decode/event-rows.js';
import { BUILTIN_TYPES } from '../../workers/decode/values.js';
import { SlotReader } from '../../workers/reader.js';
import type { StreamEvents } from '../../workers/replication-stream.js';
import type {
  ReaderConnections,
  ReplicationConnection,
  SourceSession,
} from '../../workers/source-session.js';
import type { StreamRelation } from '../../workers/catalog-resolver.js';
import type { PreparedSource } from '../../workers/source-setup.js';
import { Msg } from '../support/pgoutput.js';
import { waitFor } from '../support/poll.js';

/** Polls a condition of the reader's flow (it reacts within a few event-loop turns). */
function pollUntil(condition: () => boolean, what: string): Promise<boolean> {
  return waitFor(() => condition() || undefined, { what, timeoutMs: 10_000, intervalMs: 5 });
}

const START = 0x1000_0000n;
const ORDERS_OID = 16_400;

const config = loadConfig({
  PHILOTES_CDC_SOURCE_DATABASE: 'app',
  PHILOTES_CDC_SOURCE_USER: 'cdc',
  PHILOTES_BUFFER_DATABASE: 'buffer',
  PHILOTES_BUFFER_USER: 'philotes',
  PHILOTES_LOG_LEVEL: 'silent',
});
const SOURCE = config.sources[0]!;

// ---- the walsender's framing ----

/** XLogData: 'w', start LSN, end LSN, send time, then the pgoutput message. */
function xlog(message: Buffer, lsn = 0n): Buffer {
  return Buffer.concat([new Msg('w').uint64(lsn).uint64(lsn).int64(0n).build(), message]);
}

/** Primary keepalive: 'k', WAL end, send time, reply requested. */
function keepalive(walEnd: bigint, reply: boolean): Buffer {
  return new Msg('k')
    .uint64(walEnd)
    .int64(0n)
    .int8(reply ? 1 : 0)
    .build();
}

const relation = () =>
  xlog(
    new Msg('R')
      .uint32(ORDERS_OID)
      .string('shop')
      .string('orders')
      .byte('d')
      .int16(2)
      .int8(1)
      .string('id')
      .uint32(20)
      .int32(-1)
      .int8(0)
      .string('note')
      .uint32(25)
      .int32(-1)
      .build(),
  );
const begin = (finalLsn: bigint, xid: number) =>
  xlog(new Msg('B').uint64(finalLsn).int64(0n).uint32(xid).build());
const insert = (id: number) =>
  xlog(
    new Msg('I')
      .uint32(ORDERS_OID)
      .byte('N')
      .tuple([String(id), `note ${id}`])
      .build(),
  );
const commit = (commitLsn: bigint, endLsn: bigint) =>
  xlog(new Msg('C').int8(0).uint64(commitLsn).uint64(endLsn).int64(0n).build());

/** One transaction of `rows` inserts, committed at `end`. */
function transaction(end: bigint, xid: number, ids: number[]): Buffer[] {
  return [begin(end - 8n, xid), ...ids.map(insert), commit(end - 8n, end)];
}

// ---- the fakes ----

function slot(confirmedFlushLsn: bigint): SlotState {
  return {
    plugin: 'pgoutput',
    slotType: 'logical',
    database: 'app',
    active: true,
    activePid: 1,
    walStatus: 'reserved',
    invalidationReason: null,
    confirmedFlushLsn,
    restartLsn: confirmedFlushLsn,
    safeWalSize: null,
    failover: null,
    synced: null,
  };
}

function resolved(r: StreamRelation): ResolvedRelation {
  const columns = r.columns.map((c) => ({
    name: c.name,
    type: BUILTIN_TYPES.get(c.typeOid)!,
    typeMod: c.typeMod,
    key: (c.flags & 1) !== 0,
  }));
  return {
    oid: r.relationOid,
    schema: r.schema,
    table: r.name,
    columns,
    primaryKey: columns.filter((c) => c.key).map((c) => c.name),
  };
}

class FakeStream implements ReplicationConnection {
  readonly acks: bigint[] = [];
  paused = false;
  private ended: (() => void) | null = null;
  constructor(readonly events: StreamEvents) {}
  start(): Promise<unknown> {
    return new Promise<void>((resolve) => (this.ended = resolve));
  }
  acknowledge(lsn: bigint): Promise<unknown> {
    this.acks.push(lsn);
    return Promise.resolve();
  }
  pause(): void {
    this.paused = true;
  }
  resume(): void {
    this.paused = false;
  }
  destroy(): Promise<unknown> {
    this.ended?.();
    return Promise.resolve();
  }
  dropSocket(): void {}
  /** The walsender sends: each message as its own CopyData, as pg hands them over. */
  send(...chunks: Buffer[]): void {
    for (const chunk of chunks) this.events.copyData(chunk, true);
  }
  get lastAck(): bigint | undefined {
    return this.acks[this.acks.length - 1];
  }
}

interface Harness {
  readonly stream: FakeStream;
  readonly result: Promise<ReaderResult>;
  /** Every message the reader sent, in order. */
  readonly received: ReaderMessage[];
  batches(): Array<Extract<ReaderMessage, { type: 'batch' }>>;
  tell(message: SupervisorMessage): void;
  /** Answers every batch with 'durable' from now on (or stops answering). */
  autoDurable(on: boolean): void;
  /** Lets the catalog lookups that wait go on. */
  releaseCatalog(): void;
}

const open: MessagePort[] = [];
afterEach(() => {
  for (const port of open.splice(0)) port.close();
});

async function startReader(
  options: {
    settings?: Partial<ReaderSettings>;
    slotConfirmed?: bigint;
    holdCatalog?: boolean;
    /** Wait for the reader's ready message (false: for a start that fails). */
    ready?: boolean;
  } = {},
): Promise<Harness> {
  const { port1, port2 } = new MessageChannel();
  open.push(port1, port2);
  const received: ReaderMessage[] = [];
  let durable = true;
  let catalogWaiters: Array<() => void> = [];
  let holdCatalog = options.holdCatalog ?? false;
  let stream: FakeStream | null = null;
  const prepared: PreparedSource = {
    serverVersion: 150000,
    identity: { systemId: '7000000000000000001', timeline: 1, databaseOid: 16_384 },
    ddlGap: null,
    nextXid: 1_000n,
    protocol: 1,
    slotCreated: false,
    publicationCreated: false,
    startLsn: START,
    recordedLsn: START,
    mustRecord: false,
  };
  const session: SourceSession = {
    catalog: {
      noteType: () => undefined,
      resolveRelation: async (r) => {
        if (holdCatalog) await new Promise<void>((resolve) => catalogWaiters.push(resolve));
        return resolved(r);
      },
      resolveCatalogRelation: () => Promise.reject(new Error('no snapshots here')),
    },
    prepare: () => Promise.resolve(prepared),
    databaseIdentity: () => Promise.resolve('another database'),
    slotState: () => Promise.resolve(slot(options.slotConfirmed ?? START)),
    takeOverSlot: () => Promise.resolve(null),
    slotConfirmedFlush: () => Promise.resolve(stream?.lastAck ? formatLsn(stream.lastAck) : null),
    slotDecodingStats: () => Promise.resolve(null),
    currentWal: () => Promise.resolve(START + 0x10_0000n),
    nextXid: () => Promise.resolve(1_000n),
    ddlTriggerState: () =>
      Promise.resolve({
        version: null,
        triggersEnabled: false,
        canInstall: false,
        restartedAt: null,
      }),
    end: () => Promise.resolve(),
    drop: () => undefined,
  };
  const connections: ReaderConnections = {
    openSession: () => Promise.resolve(session),
    openStream: (_publication, events) => (stream = new FakeStream(events)),
    snapshotConnection: () => ({}),
  };
  const settings: ReaderSettings = {
    ...readerSettings(config, SOURCE),
    // Timers that would confirm or poll on their own stay out of the way: the test drives.
    checkpointIntervalMs: 3_600_000,
    sourceTimeoutMs: 3_600_000,
    ...options.settings,
  };
  const reader = new SlotReader(
    {
      source: SOURCE,
      checkpoint: {
        lsn: formatLsn(START),
        confirmedLsn: formatLsn(START),
        transactionId: null,
        identity: prepared.identity,
      },
      settings,
      buffer: { identity: 'the buffer', schema: 'public' },
      snapshot: null,
      port: port2,
    },
    connections,
  );
  const tell = (message: SupervisorMessage) => port1.postMessage(message);
  port1.on('message', (message: ReaderMessage) => {
    received.push(message);
    if (message.type === 'record')
      tell({
        type: 'recorded',
        lsn: message.lsn,
        ...(message.ticket === undefined ? {} : { ticket: message.ticket }),
      });
    if (message.type === 'batch' && durable)
      tell({ type: 'durable', seq: message.seq, lsn: message.checkpointLsn });
  });
  const result = reader.run();
  await pollUntil(() => stream !== null, 'the reader opens its stream');
  stream!.events.started();
  if (options.ready ?? true)
    await pollUntil(() => received.some((m) => m.type === 'ready'), 'the reader is ready');
  return {
    stream: stream!,
    result,
    received,
    batches: () =>
      received.filter((m): m is Extract<ReaderMessage, { type: 'batch' }> => m.type === 'batch'),
    tell,
    autoDurable: (on) => (durable = on),
    releaseCatalog: () => {
      holdCatalog = false;
      for (const w of catalogWaiters.splice(0)) w();
      catalogWaiters = [];
    },
  };
}

const rowsIn = (h: Harness) => h.batches().reduce((n, b) => n + b.rows, 0);

describe('the reader flow (no server)', () => {
  it('sends whole transactions and confirms only what the supervisor reports durable', async () => {
    const h = await startReader();
    h.autoDurable(false);
    const end = START + 0x100n;
    h.stream.send(relation(), ...transaction(end, 700, [1, 2, 3]));
    await pollUntil(() => rowsIn(h) === 3, 'the transaction is sent');
    const batch = h.batches()[0]!;
    expect(batch.checkpointLsn).toBe(formatLsn(end));
    expect(batch.transactions).toBe(1);
    // The server asks for a reply: nothing past the start is durable, so nothing past it goes.
    h.stream.send(keepalive(end, true));
    await pollUntil(() => h.stream.acks.length > 0, 'the reply');
    expect(h.stream.acks.every((lsn) => lsn <= START)).toBe(true);
    h.tell({ type: 'durable', seq: batch.seq, lsn: batch.checkpointLsn });
    await pollUntil(() => h.stream.lastAck === end, 'the durable commit is confirmed');
    h.tell({ type: 'stop' });
    expect(await h.result).toEqual({ confirmedLsn: formatLsn(end), error: null });
  });

  it('records an idle WAL end before confirming it', async () => {
    const h = await startReader();
    const end = START + 0x100n;
    h.stream.send(relation(), ...transaction(end, 700, [1]));
    await pollUntil(() => rowsIn(h) === 1, 'the transaction is sent');
    const idleEnd = START + 0x9000n;
    h.stream.send(keepalive(idleEnd, true));
    await pollUntil(() => h.stream.lastAck === idleEnd, 'the idle WAL end is confirmed');
    const record = h.received.findIndex((m) => m.type === 'record' && m.lsn === formatLsn(idleEnd));
    expect(record).toBeGreaterThanOrEqual(0);
    h.tell({ type: 'stop' });
    expect((await h.result).confirmedLsn).toBe(formatLsn(idleEnd));
  });

  it('with no room in flight, pauses reading and goes on in order once a batch is durable', async () => {
    const h = await startReader({ settings: { maxInFlightBatches: 1, batchMaxRows: 2 } });
    h.autoDurable(false);
    const ends = [START + 0x100n, START + 0x200n, START + 0x300n];
    h.stream.send(relation(), ...transaction(ends[0]!, 700, [1, 2]));
    await pollUntil(() => h.batches().length === 1, 'the first batch');
    h.stream.send(...transaction(ends[1]!, 701, [3, 4]), ...transaction(ends[2]!, 702, [5, 6]));
    await pollUntil(() => h.stream.paused, 'reading pauses for room in flight');
    expect(h.batches()).toHaveLength(1);
    // A full batch (two rows) goes out mid-transaction: its commit rides with a later one.
    while (h.batches()[h.batches().length - 1]!.checkpointLsn !== formatLsn(ends[2]!)) {
      const sent = h.batches().length;
      const last = h.batches()[sent - 1]!;
      h.tell({ type: 'durable', seq: last.seq, lsn: last.checkpointLsn });
      await pollUntil(() => h.batches().length > sent, 'the next batch after room is made');
    }
    const batches = h.batches();
    expect(batches.map((b) => b.seq)).toEqual(batches.map((_, i) => i + 1));
    const checkpoints = batches.flatMap((b) => (b.checkpointLsn === null ? [] : [b.checkpointLsn]));
    expect(checkpoints).toEqual(ends.map(formatLsn));
    expect(rowsIn(h)).toBe(6);
    expect(h.stream.paused).toBe(false);
    const last = batches[batches.length - 1]!;
    h.tell({ type: 'durable', seq: last.seq, lsn: last.checkpointLsn });
    h.tell({ type: 'stop' });
    expect((await h.result).confirmedLsn).toBe(formatLsn(ends[2]!));
  });

  it("holds a relation's changes until its catalog lookup is done", async () => {
    const h = await startReader({ holdCatalog: true });
    const end = START + 0x100n;
    h.stream.send(relation(), ...transaction(end, 700, [1, 2]), keepalive(end, false));
    await pollUntil(() => h.stream.paused, 'reading pauses for the catalog');
    expect(h.batches()).toHaveLength(0);
    h.releaseCatalog();
    await pollUntil(() => rowsIn(h) === 2, 'the changes after the lookup');
    expect(h.stream.paused).toBe(false);
    h.tell({ type: 'stop' });
    expect((await h.result).confirmedLsn).toBe(formatLsn(end));
  });

  it('at a stop, stores what is pending and confirms it before it ends', async () => {
    const h = await startReader({ settings: { batchMaxWaitMs: 60_000 } });
    const end = START + 0x100n;
    h.stream.send(relation(), ...transaction(end, 700, [1, 2]));
    // The batch waits (batchMaxWait) until the stop sends it.
    await new Promise((resolve) => setImmediate(resolve));
    expect(h.batches()).toHaveLength(0);
    h.tell({ type: 'stop' });
    expect(await h.result).toEqual({ confirmedLsn: formatLsn(end), error: null });
    expect(rowsIn(h)).toBe(2);
    expect(h.stream.lastAck).toBe(end);
  });

  it('fails on a message type it does not know instead of skipping it', async () => {
    const h = await startReader();
    h.stream.send(Buffer.from([0x7a, 0, 0]));
    const result = await h.result;
    expect(result.error?.message).toMatch(/unexpected message type 0x7a/);
    expect(h.stream.acks.every((lsn) => lsn <= START)).toBe(true);
  });

  it('stops when the slot was moved past the checkpoint by someone else', async () => {
    const moved = START + 0x5000n;
    const h = await startReader({ slotConfirmed: moved, ready: false });
    h.stream.send(relation(), ...transaction(START + 0x100n, 700, [1]));
    const result = await h.result;
    expect(result.error).toMatchObject({ code: 'SLOT_ADVANCED', fatal: true });
    expect(h.received.some((m) => m.type === 'ready' || m.type === 'batch')).toBe(false);
    expect(h.stream.acks).toEqual([]);
  });
});
