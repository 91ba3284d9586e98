/**
 * Messages between the supervisor and a reader thread, by direction. Everything here must
 * survive structured cloning: no functions, no BigInt, no class instances. LSNs travel as 'X/Y'
 * strings; event rows travel as transferred ArrayBuffers, already in the buffer's binary COPY
 * format (see buffer-format.ts).
 */
import type { MessagePort } from 'node:worker_threads';
import type { Config, SourceConfig, SourceSettings } from './config.js';
import type { DatabaseIdentity } from './database-identity.js';
import type { SourceIdentity } from './source-history.js';

/** The task piscina hands to a thread: read one slot until told to stop. */
export interface ReaderTask {
  readonly source: SourceConfig;
  /**
   * What the buffer holds for this source: the checkpoint to resume from, and the furthest
   * position Philotes recorded before confirming it to the slot (null: written by a version
   * that did not record it). Null for a source new to the buffer.
   */
  readonly checkpoint: {
    readonly lsn: string;
    readonly confirmedLsn: string | null;
    /** The last stored transaction's xid (null: none, e.g. a checkpoint a gap or a start set). */
    readonly transactionId: number | null;
    /** The server and history its events came from (null: not recorded yet). */
    readonly identity: SourceIdentity | null;
  } | null;
  readonly settings: ReaderSettings;
  /** The buffer database's identity: if the source is the same database, its tables are skipped. */
  readonly buffer: DatabaseIdentity;
  /** A snapshot to run (or to resume) alongside the stream, if any. */
  readonly snapshot: PendingSnapshot | null;
  readonly port: MessagePort;
}

/** A snapshot not finished yet, and how far each of its tables got. */
export interface PendingSnapshot {
  readonly id: number;
  /** initial, when_needed or on_demand. */
  readonly reason: string;
  /** Rows it stored so far. */
  readonly rows: number;
  readonly tables: readonly SnapshotTableState[];
}

export interface SnapshotTableState {
  readonly schema: string;
  readonly table: string;
  readonly state: 'running' | 'done' | 'skipped_no_key' | 'not_published';
  /** The key of the last row copied (its columns' texts), null before the first chunk. */
  readonly lastKey: readonly string[] | null;
  readonly chunks: number;
  /**
   * Keys (their columns' texts) of copied rows to read again before the table is done: rows an
   * UPDATE touched inside their chunk's window without sending every column (TOAST).
   */
  readonly pending: ReadonlyArray<readonly string[]>;
}

/** A chunk's effect on its table's progress; stored with the chunk's events. */
export interface SnapshotProgress extends SnapshotTableState {
  readonly snapshotId: number;
  /** Rows this chunk stored. */
  readonly rows: number;
  /** Every table of the snapshot is done with this chunk. */
  readonly finished: boolean;
}

/** The reader's part of the configuration: its source's settings, and the log level. */
export interface ReaderSettings extends SourceSettings {
  readonly logLevel: Config['logLevel'];
}

export function readerSettings(config: Config, source: SourceConfig): ReaderSettings {
  return { ...source.settings, logLevel: config.logLevel };
}

/** A column as captured in cdc_schema_history. */
export interface ColumnInfo {
  readonly name: string;
  readonly type: string;
  readonly typeOid: number;
  readonly typeMod: number;
  readonly key: boolean;
  /**
   * 'text': Philotes has no rule of its own for the type (or an array's element type): values
   * are its text output as JSON strings (array elements too), read back by the type's input.
   */
  readonly encoding?: 'text';
}

export interface SchemaChange {
  readonly schema: string;
  readonly table: string;
  readonly columns: readonly ColumnInfo[];
  readonly primaryKey: readonly string[];
  /** LSN of the first transaction that uses this shape. */
  readonly lsn: string;
  /** The DDL event that made this shape, when DDL is captured: where it is, what it was. */
  readonly ddl?: SchemaDdl | undefined;
}

export interface SchemaDdl {
  /** The DDL event's lsn and seq in cdc_events. */
  readonly lsn: string;
  readonly seq: number;
  readonly command_tag: string;
  readonly statement: string;
}

export interface OperationCounts {
  insert: number;
  update: number;
  delete: number;
  truncate: number;
  message: number;
  ddl: number;
  snapshot: number;
}

// ---- reader -> supervisor ----

export interface ReadyMessage {
  readonly type: 'ready';
  readonly startLsn: string;
  readonly slotCreated: boolean;
  readonly publicationCreated: boolean;
  readonly serverVersion: number;
}

/**
 * What happened to a streamed transaction (pgoutput protocol 2), in stream order: an abort of it
 * or of one of its subtransactions deletes their staged rows; a commit moves its staged rows into
 * cdc_events with the commit's LSN, time and xid.
 */
export type StreamOp =
  | { readonly op: 'abort'; readonly xid: number; readonly subXid: number | null }
  | {
      readonly op: 'commit';
      readonly xid: number;
      readonly lsn: string;
      readonly committedAtUs: number;
    };

/**
 * Bytes that belong in a batch's COPY data at `at` (a position in its own bytes) without having
 * been copied there: a large value, straight from the message it came in (its ArrayBuffer is
 * transferred with the batch). copyPieces puts own bytes and segments back in order.
 */
export interface CopySegment {
  readonly at: number;
  readonly data: Uint8Array;
}

/** A batch's COPY data as the pieces to write, in order: own bytes and segments between them. */
export function copyPieces(data: ArrayBuffer, segments: readonly CopySegment[]): Buffer[] {
  const own = Buffer.from(data);
  if (segments.length === 0) return own.length > 0 ? [own] : [];
  const pieces: Buffer[] = [];
  let at = 0;
  for (const segment of segments) {
    if (segment.at > at) pieces.push(own.subarray(at, segment.at));
    pieces.push(Buffer.from(segment.data.buffer, segment.data.byteOffset, segment.data.length));
    at = segment.at;
  }
  if (own.length > at) pieces.push(own.subarray(at));
  return pieces;
}

/** What a batch carries: rows of finished and unfinished transactions, and where they reach. */
export interface BatchPayload {
  /** Rows for cdc_events in binary COPY format, without header and trailer. Transferred. */
  readonly data: ArrayBuffer;
  /** Large values placed in `data` by reference (see CopySegment). */
  readonly segments: readonly CopySegment[];
  readonly rows: number;
  /**
   * Changes of transactions still in progress on the source, for cdc_staged, in the same format
   * (top xid in the lsn field, subtransaction in xid). Transferred.
   */
  readonly staged: ArrayBuffer | null;
  readonly stagedSegments: readonly CopySegment[];
  readonly stagedRows: number;
  /** Aborts and commits of streamed transactions, applied after the staged rows are stored. */
  readonly streamOps: readonly StreamOp[];
  /** Snapshot progress of chunks whose high watermark transaction this batch completes. */
  readonly snapshotProgress: readonly SnapshotProgress[];
  readonly counts: OperationCounts;
  /** Commit end LSN of the last transaction completed in this batch, if any. */
  readonly checkpointLsn: string | null;
  readonly checkpointXid: number | null;
  /** Source commit time (ms since epoch) of that transaction. */
  readonly checkpointCommitTimeMs: number | null;
  readonly transactions: number;
  readonly schemaChanges: readonly SchemaChange[];
}

/** A batch's size in bytes: its rows for cdc_events and its staged rows. */
export function batchBytes(batch: BatchPayload): number {
  let n = batch.data.byteLength + (batch.staged?.byteLength ?? 0);
  for (const s of batch.segments) n += s.data.length;
  for (const s of batch.stagedSegments) n += s.data.length;
  return n;
}

/** The ArrayBuffers a batch message transfers (each once): its own and its segments'. */
export function batchTransferList(batch: BatchPayload): ArrayBuffer[] {
  const list = new Set<ArrayBuffer>([batch.data]);
  if (batch.staged) list.add(batch.staged);
  for (const s of [...batch.segments, ...batch.stagedSegments])
    list.add(s.data.buffer as ArrayBuffer);
  return [...list];
}

export interface BatchMessage extends BatchPayload {
  readonly type: 'batch';
  /** Increases by one per batch within one reader run. */
  readonly seq: number;
}

export interface ProgressMessage {
  readonly type: 'progress';
  /** Latest server WAL end seen in the stream. */
  readonly serverWalEnd: string | null;
  /** Position last confirmed to the source. */
  readonly confirmedLsn: string | null;
  /** Everything of the source's database up to here is stored (Confirmations.capturedUpTo). */
  readonly capturedLsn: string | null;
}

/** The slot as the source sees it, polled while the reader runs: the WAL it holds back. */
export interface SlotStatusMessage {
  readonly type: 'slot';
  /** WAL the source keeps for this slot: its WAL position minus the slot's restart_lsn. */
  readonly retainedWalBytes: number | null;
  /** How much more WAL it may hold before max_slot_wal_keep_size invalidates it (null: no limit). */
  readonly safeWalSizeBytes: number | null;
  /** reserved, extended, unreserved or lost (PostgreSQL 13+). */
  readonly walStatus: string | null;
  /** The server's spill and stream counts for the slot (PostgreSQL 14+). */
  readonly decoding: SlotDecodingStats | null;
}

export interface SlotDecodingStats {
  readonly spillTxns: number;
  readonly spillBytes: number;
  readonly streamTxns: number;
  readonly streamBytes: number;
}

export interface ErrorInfo {
  readonly name: string;
  readonly message: string;
  readonly code?: string;
  readonly fatal: boolean;
  /** Structured facts of a fatal source error (positions, the gap). */
  readonly details?: Readonly<Record<string, string | number | boolean | null>>;
  readonly stack?: string;
}

/**
 * Record in the buffer that Philotes may confirm the slot up to `lsn` (a position past the stored
 * checkpoint that holds nothing of ours). Sent before confirming such a position, so that a slot
 * found further on at the next start was moved by someone else.
 */
export interface RecordMessage {
  readonly type: 'record';
  readonly lsn: string;
  /** Sent with the start's record: the server's identity, stored with the checkpoint. */
  readonly identity?: SourceIdentity;
  /** Also with the start's: DDL that may have gone uncaptured, for cdc_gaps (ddl_not_captured). */
  readonly ddlGap?: { readonly fromLsn: string; readonly toLsn: string };
  /**
   * Echoed by the answer to this very message. A waiter that needs what it sent along (a gap,
   * an identity) to be stored waits for its ticket: an answer to an earlier record of the same
   * or a later position may arrive first, while this one's transaction is still in flight.
   */
  readonly ticket?: number;
}

export type ReaderMessage =
  ReadyMessage | BatchMessage | ProgressMessage | RecordMessage | SlotStatusMessage;

// ---- supervisor -> reader ----

/** Everything up to and including batch `seq` is committed in the buffer. */
export interface DurableMessage {
  readonly type: 'durable';
  readonly seq: number;
  /** The checkpoint now stored, if these batches moved it. */
  readonly lsn: string | null;
}

/** Stop reading, send what is pending, wait until it is durable, confirm it, then return. */
export interface StopMessage {
  readonly type: 'stop';
}

/** Stop at once: the supervisor will not store anything more from this run. */
export interface AbortMessage {
  readonly type: 'abort';
}

/** The buffer now records `lsn` as confirmable (the answer to a RecordMessage). */
export interface RecordedMessage {
  readonly type: 'recorded';
  readonly lsn: string;
  /** The ticket of the RecordMessage this answers, if it had one. */
  readonly ticket?: number;
}

/**
 * The buffer writes are behind across all sources (their bytes in flight passed the cap): stop
 * reading the slot (while answering keepalives) until told to carry on.
 */
export interface HoldMessage {
  readonly type: 'hold';
  readonly held: boolean;
}

/** A snapshot to run alongside the stream (asked for while the reader runs: on demand). */
export interface SnapshotMessage {
  readonly type: 'snapshot';
  readonly snapshot: PendingSnapshot;
}

export type SupervisorMessage =
  DurableMessage | StopMessage | AbortMessage | RecordedMessage | HoldMessage | SnapshotMessage;

/**
 * What a reader task resolves with. A failure is returned rather than thrown: a thrown error
 * loses its fields crossing the thread boundary, and `fatal` decides whether we retry.
 * (A thread that crashes outright still rejects the task.)
 */
export interface ReaderResult {
  readonly confirmedLsn: string | null;
  readonly error: ErrorInfo | null;
}
