/**
 * The framing of cdc_events rows: transactions, batches, the staging of streamed (in-progress)
 * transactions, schema versions and their DDL links, and snapshot rows, accumulated into one
 * batch at a time. Each row itself is written by row-encoder.ts. Building the rows here, in the
 * reader thread, means the supervisor never parses or re-serializes an event: it streams the
 * bytes it is handed into the buffer. The builder is the one owner of the commit position
 * (lastCommitEnd): the batch's checkpoint and the confirmations both read it here.
 *
 * Longer than most files here, on purpose: a streamed transaction's staging shares every piece
 * of state with the framing of ordinary ones (the open block, seq, relations, schema versions,
 * the batch's counts), and split apart the two would have to reach into each other.
 */
import type {
  BatchPayload,
  OperationCounts,
  SchemaChange,
  SchemaDdl,
  StreamOp,
  CopySegment,
  SnapshotProgress,
} from '../../src/common/protocol.js';
import { formatLsn } from '../../src/common/lsn.js';
import { CopyBuffer, type TakenCopy } from './copy-buffer.js';
import { PG_EPOCH_OFFSET_US, TupleView } from './pgoutput.js';
import {
  FIELD_COUNT,
  fields,
  MAX_SEQ,
  MESSAGE_ENCODING,
  OPERATIONS,
  relationEncoding,
  tableOnlyEncoding,
  tooManyChangesError,
  tupleBytes,
  writeEventRow,
  type RelationEncoding,
  type ResolvedRelation,
  type RowFrame,
} from './row-encoder.js';

export type { ResolvedColumn, ResolvedRelation } from './row-encoder.js';

/**
 * A DDL link of a streamed transaction: its LSN is that transaction's commit, known only at the
 * commit; `xid` is the (sub)transaction that made it (gone if that one aborts).
 */
type StreamDdlLink = Omit<SchemaDdl, 'lsn'> & { readonly xid: number };

/** A link as the schema history stores it: a streamed one takes its transaction's commit LSN. */
function settledLink(link: StreamDdlLink | SchemaDdl, commitLsn: string): SchemaDdl {
  if (!('xid' in link)) return link;
  const { xid: _xid, ...rest } = link;
  return { ...rest, lsn: commitLsn };
}

/**
 * A transaction the source streams while it is in progress (protocol 2). Its changes go to the
 * staged rows (cdc_staged) as they come; its Relation messages, schema versions and DDL links
 * are its own until it commits: pgoutput sends a streamed transaction its relations separately,
 * and the shape they give is not yet that of anyone else's changes. At its commit they become
 * everyone's (pgoutput does not send them again); at its abort they are forgotten.
 */
interface StreamedTransaction {
  nextSeq: number;
  readonly relations: Map<number, RelationEncoding>;
  readonly schemaChanges: Array<
    Omit<SchemaChange, 'lsn' | 'ddl'> & {
      ddl: StreamDdlLink | SchemaDdl | undefined;
      /** The (sub)transaction whose change first used the shape, and the shape's encoding. */
      subXid: number;
      enc: RelationEncoding;
    }
  >;
  readonly ddlByTable: Map<string, StreamDdlLink>;
  /** Counts per (sub)transaction: a subtransaction's go when it aborts. */
  readonly counts: Map<number, OperationCounts>;
}

function eventsPart(taken: TakenCopy): { data: ArrayBuffer; segments: readonly CopySegment[] } {
  return { data: taken.data, segments: taken.segments };
}

function stagedPart(taken: TakenCopy | null): {
  staged: ArrayBuffer | null;
  stagedSegments: readonly CopySegment[];
} {
  return { staged: taken?.data ?? null, stagedSegments: taken?.segments ?? [] };
}

function noCounts(): OperationCounts {
  return { insert: 0, update: 0, delete: 0, truncate: 0, message: 0, ddl: 0, snapshot: 0 };
}

/** A snapshot chunk's rows (workers/snapshot/chunk-rows.ts), row i located in a TupleView. */
export interface SnapshotRowSource {
  view(i: number, tuple: TupleView): TupleView;
}

/** A batch as the builder hands it over: what a batch message carries. */
export type TakenBatch = BatchPayload;

const PG_EPOCH_OFFSET_US_NUMBER = Number(PG_EPOCH_OFFSET_US);

/** PostgreSQL timestamps (µs since 2000-01-01) as Unix milliseconds. */
export function pgTimeToMs(pgMicros: number): number {
  return Math.floor((pgMicros + PG_EPOCH_OFFSET_US_NUMBER) / 1000);
}

/** What the reader needs of a DDL message (src/common/ddl-capture.ts writes it). */
interface DdlPayload {
  command_tag?: string;
  statement?: string;
  commands?: Array<{
    table?: { schema: string; name: string; primary_key?: string[] } | null;
  }>;
  dropped?: Array<{ object_type?: string; schema?: string; name?: string; original?: boolean }>;
}

const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true });

export class BatchBuilder {
  private readonly relations = new Map<number, RelationEncoding>();
  private readonly sourceField: Uint8Array;

  // The open transaction, if any. Its fixed fields are prepared once, as bytes.
  private inTransaction = false;
  private readonly frame: RowFrame;
  private txSeq = 0;
  private currentXid = 0;

  // The batch being filled: the rows, written as they come; cdc_events rows in `events`, the
  // changes of streamed transactions in `staged`; `out` is the one being written.
  private readonly events: CopyBuffer;
  private readonly staged: CopyBuffer;
  private out: CopyBuffer;
  private rowCount = 0;
  private stagedRowCount = 0;
  private counts: OperationCounts = noCounts();
  /** Where the operation being written is counted: the batch, or a streamed subtransaction. */
  private tally: OperationCounts = this.counts;
  private streamOps: StreamOp[] = [];
  /** Progress of snapshot chunks in the open transaction; the batch takes it at its commit. */
  private txProgress: SnapshotProgress[] = [];
  private ownTransaction = false;
  private snapshotProgress: SnapshotProgress[] = [];
  private readonly streams = new Map<number, StreamedTransaction>();
  /** The streamed transaction whose block is open, and the (sub)transaction of its change. */
  private stream: StreamedTransaction | null = null;
  private streamSubXid = 0;
  /** The end of the last commit read: the one owner of the commit position (see lastCommitEnd). */
  private commitEnd = 0;
  /** A commit was read since the last batch was taken: the batch moves the checkpoint to it. */
  private committed = false;
  /** The pending checkpoint completes a transaction with events in an earlier batch. */
  private commitMustBeStored = false;
  private checkpointXid = 0;
  private checkpointCommitTime = 0;
  private transactions = 0;
  private schemaChanges: SchemaChange[] = [];
  /** The last DDL event that touched each table ('schema.table'), for its next schema version. */
  private readonly ddlByTable = new Map<string, SchemaDdl>();

  /** @param batchMaxBytes the batch size limit: the working buffer is kept up to twice that. */
  constructor(
    private readonly sourceId: string,
    batchMaxBytes = 4 * 1024 * 1024,
    /** The file that configures the source, for the commands its errors suggest. */
    configFile?: string,
  ) {
    this.sourceField = fields((out) => out.textField(sourceId));
    this.frame = {
      head: new CopyBuffer(64),
      middle: new CopyBuffer(64),
      sourceId,
      source: { id: sourceId, configFile },
      finalLsn: 0,
    };
    this.events = new CopyBuffer(1 << 20, Math.max(16 << 20, 2 * batchMaxBytes));
    this.staged = new CopyBuffer(1 << 16, Math.max(16 << 20, 2 * batchMaxBytes));
    this.out = this.events;
  }

  get rows(): number {
    return this.rowCount;
  }

  /** Bytes of the pending rows. */
  get bytes(): number {
    return this.events.size + this.staged.size;
  }

  /**
   * Whether there is anything to store: events, a schema version, or the commit of a transaction
   * whose events went out in an earlier batch. That commit must be stored: until the checkpoint
   * passes it, those events count as an incomplete transaction (a restart deletes them), yet the
   * reader, having nothing else pending, would confirm the source past it.
   *
   * The commit of a transaction without events is not sent alone; it rides with the next batch.
   * Storing it by itself would gain nothing (it holds nothing to lose, and the idle confirmation
   * already frees its WAL), and when the source is the buffer database, every such store would
   * be a new transaction to read.
   */
  get hasContent(): boolean {
    return (
      this.rowCount > 0 ||
      this.schemaChanges.length > 0 ||
      this.commitMustBeStored ||
      this.streamOps.length > 0 ||
      this.snapshotProgress.length > 0
    );
  }

  get isInTransaction(): boolean {
    return this.inTransaction;
  }

  /**
   * The end of the last commit read (0: none yet): the position the next batch's checkpoint
   * moves to, and, for the confirmations, how far the server's WAL is known to reach.
   */
  get lastCommitEnd(): number {
    return this.commitEnd;
  }

  private noteCommitEnd(endLsn: number): void {
    if (endLsn > this.commitEnd) this.commitEnd = endLsn;
    this.committed = true;
  }

  /** LSNs and times are Numbers here (see PgoutputHandler); times are µs since 2000-01-01. */
  begin(finalLsn: number, commitTime: number, xid: number): void {
    this.inTransaction = true;
    this.frame.finalLsn = finalLsn;
    this.txSeq = 0;
    this.currentXid = xid;
    const head = this.frame.head;
    head.length = 0;
    head.int16(FIELD_COUNT);
    head.bytes(this.sourceField);
    head.int64Field(finalLsn);
    const middle = this.frame.middle;
    middle.length = 0;
    middle.int64Field(xid);
    // timestamptz's binary form is this very number: µs since 2000-01-01 UTC.
    middle.int64Field(commitTime);
  }

  /** The open transaction is Philotes' own (a snapshot watermark): not counted as the source's. */
  markOwnTransaction(): void {
    this.ownTransaction = true;
  }

  commit(endLsn: number, commitTime: number): void {
    this.inTransaction = false;
    if (this.ownTransaction) {
      this.ownTransaction = false;
      this.transactions--; // counted again just below
    }
    if (this.txProgress.length > 0) {
      // Stored in the buffer transaction that moves the checkpoint past this commit, never
      // before: a restart must not find the progress of a chunk whose events it deleted.
      this.snapshotProgress.push(...this.txProgress);
      this.txProgress = [];
      this.commitMustBeStored = true;
    }
    this.transactions++;
    this.noteCommitEnd(endLsn);
    this.checkpointXid = this.currentXid;
    this.checkpointCommitTime = commitTime;
    // Its events (txSeq of them) are in this batch or an earlier one; either way it must go out.
    if (this.txSeq > 0) this.commitMustBeStored = true;
  }

  /**
   * Registers (or replaces) a relation. A new shape is a schema version, recorded with the first
   * change that uses it, not here: pgoutput also sends the Relation of a partition whose rows it
   * publishes as the root's (publish_via_partition_root), and a shape no change uses is no version
   * of anything a consumer sees.
   */
  relation(relation: ResolvedRelation): void {
    const relations = this.stream?.relations ?? this.relations;
    const previous = relations.get(relation.oid) ?? this.relations.get(relation.oid);
    relations.set(relation.oid, relationEncoding(relation, previous));
  }

  hasRelation(oid: number): boolean {
    return this.relations.has(oid);
  }

  insert(relationOid: number, after: TupleView): void {
    this.push(this.encoding(relationOid), OPERATIONS.INSERT, null, false, after, null);
    this.tally.insert++;
  }

  update(
    relationOid: number,
    beforeKind: 'K' | 'O' | null,
    before: TupleView | null,
    after: TupleView,
  ): void {
    // With REPLICA IDENTITY FULL the old row carries the real value of an unchanged TOAST column.
    const fallback = beforeKind === 'O' ? before : null;
    this.push(
      this.encoding(relationOid),
      OPERATIONS.UPDATE,
      before,
      beforeKind === 'K',
      after,
      fallback,
    );
    this.tally.update++;
  }

  delete(relationOid: number, beforeKind: 'K' | 'O', before: TupleView): void {
    this.push(
      this.encoding(relationOid),
      OPERATIONS.DELETE,
      before,
      beforeKind === 'K',
      null,
      null,
    );
    this.tally.delete++;
  }

  /**
   * One TRUNCATE event per table, each with the command's options and every table it truncated
   * (one command may truncate several, and CASCADE adds those that reference them).
   */
  truncate(relationOids: number[], cascade: boolean, restartIdentity: boolean): void {
    const encodings = relationOids.map((oid) => this.encoding(oid));
    const details = JSON.stringify({
      cascade,
      restart_identity: restartIdentity,
      tables: encodings.map((e) => `${e.relation.schema}.${e.relation.table}`),
    });
    for (const enc of encodings) {
      this.push(enc, OPERATIONS.TRUNCATE, null, false, null, null, details);
      this.tally.truncate++;
    }
  }

  /**
   * A transactional logical message with a captured prefix: a MESSAGE event at its place in the
   * transaction. Its content goes in details as text when it is UTF-8 without NUL (what jsonb
   * can hold), else as hex.
   */
  message(prefix: string, content: Uint8Array, transactional = true): void {
    let text: string | null;
    try {
      text = STRICT_UTF8.decode(content);
      if (text.includes('\0')) text = null;
    } catch {
      text = null;
    }
    const details = JSON.stringify({
      prefix,
      transactional,
      ...(text !== null
        ? { content: text }
        : { content_hex: Buffer.from(content).toString('hex') }),
    });
    this.push(MESSAGE_ENCODING, OPERATIONS.MESSAGE, null, false, null, null, details);
    this.tally.message++;
  }

  /**
   * A DDL command, as the source's event trigger wrote it: a DDL event at its place in the
   * transaction, naming the table the command made, changed or dropped (none for, say, CREATE
   * SCHEMA), with the whole message as details. The table's next schema version links to it.
   */
  ddl(content: Uint8Array): void {
    let text = Buffer.from(content).toString('utf8');
    let payload: DdlPayload;
    try {
      payload = JSON.parse(text) as DdlPayload;
    } catch {
      // Not written by our trigger: kept as it came, never dropped.
      payload = {};
      text = JSON.stringify({ malformed: text });
    }
    const tables = new Map<string, { schema: string; name: string; primaryKey: string[] }>();
    for (const c of payload.commands ?? []) {
      if (c.table)
        tables.set(`${c.table.schema}.${c.table.name}`, {
          schema: c.table.schema,
          name: c.table.name,
          primaryKey: c.table.primary_key ?? [],
        });
    }
    for (const d of payload.dropped ?? []) {
      if (d.object_type === 'table' && d.original && d.schema && d.name)
        tables.set(`${d.schema}.${d.name}`, { schema: d.schema, name: d.name, primaryKey: [] });
    }
    const first = tables.values().next().value;
    const enc = first
      ? tableOnlyEncoding(first.schema, first.name, first.primaryKey)
      : MESSAGE_ENCODING;
    this.push(enc, OPERATIONS.DDL, null, false, null, null, text);
    this.tally.ddl++;
    const link = {
      seq: this.txSeq,
      command_tag: payload.command_tag ?? '',
      statement: payload.statement ?? '',
    };
    if (this.stream) {
      const streamLink: StreamDdlLink = { ...link, xid: this.streamSubXid };
      for (const key of tables.keys()) this.stream.ddlByTable.set(key, streamLink);
    } else {
      const settled: SchemaDdl = { ...link, lsn: formatLsn(BigInt(this.frame.finalLsn)) };
      for (const key of tables.keys()) this.ddlByTable.set(key, settled);
    }
  }

  /** A chunk's progress, taken into the batch with its transaction's commit. */
  noteSnapshotProgress(progress: SnapshotProgress): void {
    if (!this.inTransaction) throw new Error('snapshot: progress outside a transaction');
    this.txProgress.push(progress);
  }

  /** The relation registered for `oid` (the stream's), if any. */
  relationOf(oid: number): ResolvedRelation | undefined {
    return (this.stream?.relations.get(oid) ?? this.relations.get(oid))?.relation;
  }

  /**
   * Rows of a snapshot chunk (those at `indexes`), as SNAPSHOT events (`after` set, `before`
   * null) at the current place of the open transaction: the high watermark's (see
   * workers/snapshot/window.ts). Each row is the texts of the table's columns as the chunk query
   * printed them (a DataRow), encoded exactly as the stream's tuples are.
   */
  snapshotRows(
    relationOid: number,
    rows: SnapshotRowSource,
    indexes: readonly number[],
    /** For each of the relation's columns, its place in the rows (-1: none), if they differ. */
    positions: readonly number[] | null,
  ): void {
    const enc = this.encoding(relationOid);
    const read = new TupleView();
    const remapped = new TupleView();
    for (const i of indexes) {
      let tuple = rows.view(i, read);
      if (positions !== null) {
        // The table's shape changed since its copy began (rare): the row rebuilt in the
        // relation's column order, through texts.
        const row = tuple;
        remapped.read(
          tupleBytes(positions.map((p) => (p < 0 || row.isNull(p) ? null : row.text(p)))),
          0,
        );
        tuple = remapped;
      }
      this.push(enc, OPERATIONS.SNAPSHOT, null, false, tuple, null);
      this.tally.snapshot++;
    }
  }

  /**
   * A non-transactional logical message: it belongs to no transaction, so it is stored as one of
   * its own, with the time Philotes read it (no commit time exists). pgoutput gives the END of its
   * WAL record, `endLsn`, as a commit gives its end: the checkpoint moves there. Resuming at it,
   * the server skips this message (it skips non-transactional messages that start before the
   * start position) and delivers every record after it; every commit before it came before it in
   * the stream. The event's lsn is endLsn - 1, inside its own record: after every earlier commit,
   * before any later one (a commit record may start right at endLsn), and below the checkpoint,
   * which a restart's clean-up needs. Call it only between transactions.
   */
  standaloneMessage(endLsn: number, readAt: number, prefix: string, content: Uint8Array): void {
    if (this.inTransaction)
      throw new Error('pgoutput: non-transactional message inside a transaction');
    this.begin(endLsn - 1, readAt, 0);
    this.message(prefix, content, false);
    this.commit(endLsn, readAt);
    this.transactions--; // not a source transaction
  }

  /**
   * A block of the in-progress transaction `xid` begins (protocol 2): its changes are written as
   * staged rows — `lsn` holds `xid` and `xid` the subtransaction, until the commit moves them
   * into cdc_events with the commit's LSN, time and xid. `seq` runs on across blocks.
   */
  streamStart(xid: number): void {
    if (this.inTransaction) throw new Error('pgoutput: stream start inside a transaction');
    let stream = this.streams.get(xid);
    if (!stream) {
      stream = {
        nextSeq: 0,
        relations: new Map(),
        schemaChanges: [],
        ddlByTable: new Map(),
        counts: new Map(),
      };
      this.streams.set(xid, stream);
    }
    this.stream = stream;
    this.begin(xid, 0, xid); // txHead's lsn field: the top xid (cdc_staged.top_xid)
    this.txSeq = stream.nextSeq;
    this.out = this.staged;
    this.streamChange(xid);
  }

  /** The (sub)transaction of the next change in the open block. */
  streamChange(subXid: number): void {
    const stream = this.stream;
    if (stream === null || subXid === this.streamSubXid) return;
    this.streamSubXid = subXid;
    const middle = this.frame.middle;
    middle.length = 0;
    middle.int64Field(subXid);
    middle.int64Field(0); // committed_at: set at the commit
    let counts = stream.counts.get(subXid);
    if (!counts) stream.counts.set(subXid, (counts = noCounts()));
    this.tally = counts;
  }

  streamStop(): void {
    if (this.stream === null) throw new Error('pgoutput: stream stop outside a stream');
    this.stream.nextSeq = this.txSeq;
    this.stream = null;
    this.streamSubXid = 0;
    this.inTransaction = false;
    this.out = this.events;
    this.tally = this.counts;
  }

  /** Whether a streamed transaction has begun and not yet committed or aborted. */
  get hasOpenStreams(): boolean {
    return this.streams.size > 0;
  }

  streamAbort(xid: number, subXid: number): void {
    if (this.stream !== null) throw new Error('pgoutput: stream abort inside a stream');
    this.streamOps.push({ op: 'abort', xid, subXid: subXid === xid ? null : subXid });
    const stream = this.streams.get(xid);
    if (!stream) return;
    if (subXid === xid) {
      this.streams.delete(xid);
      return;
    }
    stream.counts.delete(subXid);
    for (const [key, link] of stream.ddlByTable)
      if (link.xid === subXid) stream.ddlByTable.delete(key);
    // A shape first used by the aborted subtransaction's changes is used by no event now: it
    // waits for the next change that uses it (if any), and its DDL link, if it was not the
    // subtransaction's own, goes back with it.
    for (let i = stream.schemaChanges.length - 1; i >= 0; i--) {
      const change = stream.schemaChanges[i]!;
      if (change.subXid !== subXid) continue;
      stream.schemaChanges.splice(i, 1);
      const { ddl, subXid: _sub, enc, ...schema } = change;
      enc.pendingSchema = schema;
      if (ddl !== undefined && 'xid' in ddl && ddl.xid !== subXid)
        stream.ddlByTable.set(`${schema.schema}.${schema.table}`, ddl);
    }
  }

  /**
   * The streamed transaction committed: its staged rows move into cdc_events at its commit LSN
   * (in the buffer transaction that stores this batch), and the checkpoint moves past it.
   */
  streamCommit(xid: number, commitLsn: number, endLsn: number, commitTime: number): void {
    if (this.stream !== null) throw new Error('pgoutput: stream commit inside a stream');
    const stream = this.streams.get(xid);
    this.streams.delete(xid);
    const lsn = formatLsn(BigInt(commitLsn));
    this.streamOps.push({ op: 'commit', xid, lsn, committedAtUs: commitTime });
    if (stream) {
      for (const counts of stream.counts.values()) {
        for (const key of Object.keys(counts) as Array<keyof OperationCounts>)
          this.counts[key] += counts[key];
      }
      for (const { ddl, subXid: _sub, enc: _enc, ...change } of stream.schemaChanges) {
        this.schemaChanges.push({ ...change, lsn, ...(ddl ? { ddl: settledLink(ddl, lsn) } : {}) });
      }
      // pgoutput counts the relations it sent a committed stream as sent to us (its
      // cleanup_rel_sync_cache): they are the current ones now, and are not sent again.
      for (const [oid, enc] of stream.relations) this.relations.set(oid, enc);
      for (const [key, link] of stream.ddlByTable) this.ddlByTable.set(key, settledLink(link, lsn));
    }
    this.transactions++;
    this.noteCommitEnd(endLsn);
    this.checkpointXid = xid;
    this.checkpointCommitTime = commitTime;
    this.commitMustBeStored = true;
  }

  /** Hands over the batch as one transferable buffer and starts a new one. */
  take(): TakenBatch {
    const committed = this.committed;
    const batch: TakenBatch = {
      // Exactly the used bytes, transferable (see CopyBuffer.take), and large values by reference.
      ...eventsPart(this.events.takeAll()),
      rows: this.rowCount - this.stagedRowCount,
      ...stagedPart(this.stagedRowCount > 0 ? this.staged.takeAll() : null),
      stagedRows: this.stagedRowCount,
      streamOps: this.streamOps,
      snapshotProgress: this.snapshotProgress,
      counts: this.counts,
      checkpointLsn: committed ? formatLsn(BigInt(this.commitEnd)) : null,
      checkpointXid: committed ? this.checkpointXid : null,
      checkpointCommitTimeMs: committed ? pgTimeToMs(this.checkpointCommitTime) : null,
      transactions: this.transactions,
      schemaChanges: this.schemaChanges,
    };
    this.rowCount = 0;
    this.stagedRowCount = 0;
    this.streamOps = [];
    this.snapshotProgress = [];
    this.counts = noCounts();
    if (this.stream === null) this.tally = this.counts;
    this.committed = false;
    this.commitMustBeStored = false;
    this.transactions = 0;
    this.schemaChanges = [];
    return batch;
  }

  private encoding(oid: number): RelationEncoding {
    const enc = this.stream?.relations.get(oid) ?? this.relations.get(oid);
    // pgoutput always sends a Relation message before the first change that needs it.
    if (!enc) throw new Error(`pgoutput: change for unknown relation ${oid}`);
    if (enc.pendingSchema === null) return enc;
    const key = `${enc.relation.schema}.${enc.relation.table}`;
    if (this.stream !== null) {
      // Recorded if and when the transaction commits, at its commit LSN.
      const ddl = this.stream.ddlByTable.get(key) ?? this.ddlByTable.get(key);
      this.stream.ddlByTable.delete(key);
      this.stream.schemaChanges.push({ ...enc.pendingSchema, ddl, subXid: this.streamSubXid, enc });
    } else {
      // LSN of the first transaction that uses this shape.
      const ddl = this.ddlByTable.get(key);
      this.ddlByTable.delete(key);
      this.schemaChanges.push({
        ...enc.pendingSchema,
        lsn: formatLsn(BigInt(this.frame.finalLsn)),
        ...(ddl ? { ddl } : {}),
      });
    }
    enc.pendingSchema = null;
    return enc;
  }

  /** Writes one cdc_events row. */
  private push(
    enc: RelationEncoding,
    operation: Uint8Array,
    before: TupleView | null,
    beforeKeyOnly: boolean,
    after: TupleView | null,
    fallback: TupleView | null,
    details: string | null = null,
  ): void {
    if (!this.inTransaction) throw new Error('pgoutput: change outside a transaction');
    // cdc_events.seq is an int: a transaction's 2,147,483,648th change has no number. Loud,
    // never a wrap (a negative seq would sort before the transaction's first change).
    if (this.txSeq >= MAX_SEQ) throw tooManyChangesError(this.frame, enc, this.txSeq);
    writeEventRow(
      this.out,
      this.frame,
      this.txSeq + 1,
      enc,
      operation,
      before,
      beforeKeyOnly,
      after,
      fallback,
      details,
    );
    this.txSeq++;
    this.rowCount++;
    if (this.stream !== null) this.stagedRowCount++;
  }
}
